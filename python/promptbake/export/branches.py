"""The small terms beside the 4-bit MatMuls, each input's computed in two MatMuls.

An int4 export adds to a ``MatMulNBits`` node's output low-rank terms of its input x, each
``(x @ L) @ R`` with constant L and R: HQQ's folded zero points (``quantize.fold_zero_points``:
L the 0/1 block-sum matrix, R the blocks' (8 - z) s), the bake's LoRA kept beside the base
(``quantize.add_adapters``: A, then B) and any correction branch. On SmolLM2-135M that is 30
small nodes a layer, each a few microseconds of onnxruntime's dispatch at every decode step.
``fuse`` computes the terms of every MatMul that reads the same x as one ``side = x @ [L1 L2
...]`` and gives each MatMul one ``side @ [R rows for its own L, zeros for the others']`` and
one Add: 18 nodes a layer, and the same sums (up to float rounding: the terms are added inside
one MatMul). The concatenations and zeros are computed from the stored factors when onnxruntime
loads the graph with its graph optimisations on (constant folding; on by default, and in
``OnnxLM``), so the file stores nothing more than each block of zeros' shape, and every reader
of the factors by name (``quantize.store_half``, ``blocks_4bit``) finds them as before.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from promptbake.export import rewrite

FUSED = "side_terms/"  # the names of the nodes ``fuse`` adds


class Term(NamedTuple):
    """One ``(x @ left) @ right`` added to a MatMul's output: the factors' names, and the Add and
    the MatMul by ``right`` that ``fuse`` replaces."""

    left: str
    right: str
    add: onnx.NodeProto
    up: onnx.NodeProto


def fuse(model: onnx.ModelProto) -> int:
    """The low-rank terms added to each ``MatMulNBits`` output fused by input, in place
    (module docstring); returns how many terms were fused (0 when the graph has none)."""
    graph = model.graph
    if rewrite.has_subgraphs(graph):
        return 0
    nodes = list(graph.node)  # held, so that each node keeps its identity (``removed``)
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    constant = _constants(graph)
    outputs = {o.name for o in graph.output}

    def dims(name: str) -> list[int] | None:
        """An L factor's stored shape: an initializer's, or a Cast's of one (fp16 storage)."""
        node = producer.get(name)
        if node is not None and node.op_type == "Cast":
            name = node.input[0]
        return list(inits[name].dims) if name in inits else None

    def term(add: onnx.NodeProto, out: str, x: str) -> Term | None:
        """The term ``add`` adds to ``out``, when it is ``(x @ L) @ R``."""
        if add.op_type != "Add" or len(add.input) != 2 or out not in add.input:
            return None
        other = add.input[1] if add.input[0] == out else add.input[0]
        up = producer.get(other)
        if up is None or up.op_type != "MatMul" or len(readers.get(other, [])) != 1 \
                or up.input[1] not in constant:
            return None
        down = producer.get(up.input[0])
        if down is None or down.op_type != "MatMul" or down.input[0] != x \
                or down.input[1] not in constant or dims(down.input[1]) is None:
            return None
        return Term(down.input[1], up.input[1], add, up)

    groups: dict[str, list] = {}  # x -> [(node, [(L, R)], the chain's last output)]
    removed: set[int] = set()
    for node in nodes:
        if node.op_type != "MatMulNBits":
            continue
        x, out, found = node.input[0], node.output[0], []
        while out not in outputs and len(readers.get(out, [])) == 1:
            hit = term(readers[out][0], out, x)
            if hit is None:
                break
            found.append((hit.left, hit.right))
            removed.update((id(hit.add), id(hit.up)))
            out = hit.add.output[0]
        if found:
            groups.setdefault(x, []).append((node, found, out))
    added, made = [], set()
    for g, (x, members) in enumerate(groups.items()):
        lefts = list(dict.fromkeys(left for _, found, _ in members for left, _ in found))
        key = f"{FUSED}{g}"
        side_weights = lefts[0] if len(lefts) == 1 else key + "/L"
        if len(lefts) > 1:
            added.append(helper.make_node("Concat", lefts, [side_weights], name=side_weights,
                                          axis=1))
        added.append(helper.make_node("MatMul", [x, side_weights], [key + "/side"],
                                      name=key + "/side"))
        for node, found, out in members:
            n = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "N")
            rows = []
            for left in lefts:
                mine = [right for lf, right in found if lf == left]
                if not mine:  # another MatMul's term: zero rows
                    size = f"{dims(left)[1]}x{n}"
                    zeros, shape = f"{key}/zeros_{size}", f"{FUSED}shape_{size}"
                    if shape not in made:
                        graph.initializer.append(numpy_helper.from_array(
                            np.array([dims(left)[1], n], np.int64), shape))
                    if zeros not in made:
                        added.append(helper.make_node(
                            "ConstantOfShape", [shape], [zeros], name=zeros,
                            value=numpy_helper.from_array(np.zeros(1, np.float32))))
                    made.update((shape, zeros))
                    mine = [zeros]
                while len(mine) > 1:  # two terms of one MatMul through the same L
                    total = f"{mine[0]}+{mine[1]}"
                    added.append(helper.make_node("Add", mine[:2], [total], name=total))
                    mine = [total, *mine[2:]]
                rows.append(mine[0])
            name = f"{key}/{(node.name or node.output[0]).strip('/')}"
            right = rows[0] if len(rows) == 1 else name + "/R"
            if len(rows) > 1:
                added.append(helper.make_node("Concat", rows, [right], name=right, axis=0))
            added += [helper.make_node("MatMul", [key + "/side", right], [name + "/term"],
                                       name=name + "/term"),
                      helper.make_node("Add", [node.output[0], name + "/term"], [out],
                                       name=name + "/add")]
    fused = sum(len(found) for members in groups.values() for _, found, _ in members)
    if fused:
        kept = [n for n in nodes if id(n) not in removed] + added
        del graph.node[:]
        graph.node.extend(rewrite.in_order(kept, graph))
        rewrite.drop_dead(graph)  # the MatMuls by L that only the fused terms read
    return fused


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Names whose values do not depend on the graph's inputs: initializers, and the outputs of
    nodes that read only such names."""
    inputs = {i.name for i in graph.input}
    found = {i.name for i in graph.initializer} - inputs
    for node in graph.node:
        if all(name in found for name in node.input if name):
            found.update(node.output)
    return found
