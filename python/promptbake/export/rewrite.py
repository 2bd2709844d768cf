"""Small tools that rewrite an ONNX graph in place without changing what it computes, shared by
the export's passes (``shapes.py``, ``branches.py``): merging nodes that compute the same thing,
dropping what nothing reads, putting nodes in an order that runs.

None of them looks inside control-flow subgraphs (``If``, ``Loop``, ``Scan`` bodies), which may
read the outer graph's names: a pass asks ``has_subgraphs`` first and leaves such a graph alone
(the traced causal LMs have none).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Weights' bytes above which a graph is written (or handed to onnxruntime) with its weights in a
# file beside it: protobuf's limit is 2 GB.
INLINE_LIMIT = 1_800_000_000
# Operators whose result is not a function of their inputs, or that hold a graph: never merged.
UNMERGED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
            "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan"}


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a node of ``graph`` holds a graph (control flow)."""
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for n in graph.node for a in n.attribute)


def merge_duplicates(graph: onnx.GraphProto) -> int:
    """Nodes that compute the same thing as an earlier node (the same operator, attributes and
    inputs; small constants compared by value) removed, their readers reading the earlier
    node's outputs, in place; returns how many. The graph's own outputs, the operators in
    ``UNMERGED`` and a graph with subgraphs are left."""
    if has_subgraphs(graph):
        return 0
    fed = {i.name for i in graph.input}  # an initializer a caller may override is no constant
    values = {i.name: ("value", i.data_type, tuple(i.dims), numpy_helper.to_array(i).tobytes())
              for i in graph.initializer if np.prod(i.dims) <= 64 and i.name not in fed}
    graph_outputs = {o.name for o in graph.output}
    first: dict = {}
    renamed: dict[str, str] = {}
    kept, merged = [], 0
    for n in graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)
        key = (n.domain, n.op_type, len(n.output),
               tuple(sorted(a.SerializeToString() for a in n.attribute)),
               tuple(values.get(name, name) for name in n.input))
        if key in first and n.op_type not in UNMERGED and not set(n.output) & graph_outputs:
            renamed.update(zip(n.output, first[key].output))
            merged += 1
            continue
        first.setdefault(key, n)
        kept.append(n)
    del graph.node[:]
    graph.node.extend(kept)
    return merged


def drop_dead(graph: onnx.GraphProto) -> int:
    """Nodes none of whose outputs is read (by a node or as a graph output) removed, in place,
    until none is left, and then the initializers nothing reads; returns how many nodes. A
    graph with subgraphs is left."""
    if has_subgraphs(graph):
        return 0
    dropped = 0
    while True:
        read = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if any(o in read for o in n.output)]
        if len(keep) == len(graph.node):
            break
        dropped += len(graph.node) - len(keep)
        del graph.node[:]
        graph.node.extend(keep)
    fed = {i.name for i in graph.input}
    for init in [i for i in graph.initializer if i.name not in read and i.name not in fed]:
        graph.initializer.remove(init)
    return dropped


def in_order(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after what it reads, otherwise as given."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    out, waiting = [], list(nodes)
    while waiting:
        later = []
        for node in waiting:
            if all(name in ready for name in node.input):
                out.append(node)
                ready.update(node.output)
            else:
                later.append(node)
        if len(later) == len(waiting):
            raise AssertionError(f"{len(later)} nodes read names nothing computes, e.g. "
                                 f"{later[0].name}")
        waiting = later
    return out
