"""One computation of each size the traced graph uses, and no node computed twice.

TorchScript's tracer records every ``view``, rotary split and ``repeat_kv`` of every layer with
its own chain of ``Shape`` -> ``Gather`` -> ``Unsqueeze`` -> ``Concat`` nodes: SmolLM2-135M's
graph has 517 ``Shape`` nodes and about 2,800 nodes of such size arithmetic among its 7,845,
each a few microseconds of onnxruntime's dispatch at every decode step, which here is a fifth
of an int8 decode step (``share``'s docstring has the measurement). All of those sizes are the
same few numbers: the batch b, the new tokens s, the cached ones p, p + s and constants such as
the head dim.

``share`` finds what each ``Shape`` node computes by running the graph at several sizes
(``PROBES``) and fitting each of its output's entries as a whole-number combination of 1, b, s,
p and b s; a fit must also hold at the sizes it was not fitted on, one of them 519 tokens long
(a size that is such a combination only up to a bound, a sliding window of more tokens say,
would pass: the architectures exported have none). Each node so explained is replaced by one
shared computation of that shape from the inputs' shapes (a constant when no entry depends on
the sizes), and ``rewrite.merge_duplicates`` then merges the nodes that compute the same thing
from the same inputs, which folds the layers' copies of the arithmetic into one. A ``Shape``
node that no fit explains keeps its place. The graph's inputs and outputs are unchanged, and so
are its results (to the bit on the default model's exports, within 1e-5 on the tiny test
models: tested); the sizes assume what every caller of a KV-cache graph feeds, an
``attention_mask`` as long as the cached and the new tokens together. A graph with control
flow, or below opset 15 (``Shape``'s start and end), is left as it is.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from promptbake.export import rewrite

log = logging.getLogger("promptbake")

# (batch, new tokens, cached tokens, logits_to_keep) the graph is run at; the first FIT fit each
# Shape node's entries, every one of them must agree (the last a long sequence).
PROBES = ((1, 1, 6, 0), (2, 3, 0, 1), (3, 2, 5, 0), (2, 5, 9, 2), (4, 7, 3, 1), (5, 1, 2, 0),
          (3, 4, 11, 3), (1, 6, 1, 2), (2, 2, 4, 0), (1, 2, 517, 1))
FIT = 6
TERMS = ("1", "b", "s", "p", "bs")  # what a size may combine
PREFIX = "shared_shape/"  # the names of the nodes and constants ``share`` adds


def share(model: onnx.ModelProto, past: str) -> dict:
    """The graph's ``Shape`` nodes replaced by shared computations and its duplicate nodes
    merged, in place (module docstring). ``past``: the name of one past key/value input, whose
    third dimension is the cached length. Returns the counts before and after.

    What it does to decoding is measured in ``bench/results/infer-graph`` (the default model's
    int8 export: 16.8 against 13.9 ms a token) and in the infer suite.
    """
    graph = model.graph
    before = {"nodes": len(graph.node), "shape_nodes": _count(graph, "Shape")}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    if rewrite.has_subgraphs(graph) or opset < 15:
        log.info("the graph's shapes stay as traced (control flow, or opset %d < 15)", opset)
        return {"before": before, "after": before, "shape_nodes_replaced": 0}
    shapes = [n.output[0] for n in graph.node if n.op_type == "Shape"]
    values = _probe(model, shapes, past) if shapes else None
    replaced = _replace(graph, _fit(values) if values else {}, past)
    merged = rewrite.merge_duplicates(graph)
    dropped = rewrite.drop_dead(graph)
    after = {"nodes": len(graph.node), "shape_nodes": _count(graph, "Shape")}
    log.info("shared the graph's shapes: %d nodes -> %d (%d Shape nodes replaced, %d merged, "
             "%d no longer read)", before["nodes"], after["nodes"], replaced, merged, dropped)
    return {"before": before, "after": after, "shape_nodes_replaced": replaced}


def _count(graph: onnx.GraphProto, op: str) -> int:
    return sum(n.op_type == op for n in graph.node)


def _probe(model: onnx.ModelProto, names: list[str],
           past: str) -> list[dict[str, np.ndarray]] | None:
    """The values of ``names`` (Shape outputs) at each of ``PROBES``, computed by onnxruntime
    with its graph optimisations off, so that every node runs as written; None, with a warning,
    when onnxruntime cannot run the graph (it is right as it is, only slower). The names are
    made graph outputs for the while (the model is not copied: it may be large)."""
    import onnxruntime as ort

    graph = model.graph
    count = len(graph.output)
    present = {o.name for o in graph.output}
    graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)
                        for name in names if name not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if sum(len(t.raw_data) for t in graph.initializer) < rewrite.INLINE_LIMIT:
                source = model.SerializeToString()
            else:
                source = str(Path(scratch) / "probe.onnx")
                try:
                    onnx.save_model(model, source, save_as_external_data=True,
                                    all_tensors_to_one_file=True, location="probe.onnx.data")
                finally:  # saving moves the weights out of the model: back in, or fail loudly
                    onnx.external_data_helper.load_external_data_for_model(model, scratch)
            try:
                session = ort.InferenceSession(source, options,
                                               providers=["CPUExecutionProvider"])
                inputs = {i.name: i for i in (*session.get_inputs(),
                                              *session.get_overridable_initializers())}
                return [dict(zip(names, session.run(names, _feed(inputs, past, *sizes))))
                        for sizes in PROBES]
            except Exception as err:  # onnxruntime's own exception types
                log.warning("onnxruntime could not run the traced graph to share its shapes "
                            "(%s); it keeps them", err)
                return None
    finally:
        del graph.output[count:]


def _feed(inputs: dict, past: str, batch: int, new: int, cached: int, keep: int) -> dict:
    kv_heads, head_dim = inputs[past].shape[1], inputs[past].shape[3]
    feed = {"input_ids": np.ones((batch, new), np.int64),
            "attention_mask": np.ones((batch, cached + new), np.int64),
            "position_ids": np.tile(np.arange(cached, cached + new), (batch, 1))}
    if "logits_to_keep" in inputs:
        feed["logits_to_keep"] = np.array(keep, np.int64)
    for name, meta in inputs.items():
        if name.startswith("past_key_values."):
            dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
            feed[name] = np.zeros((batch, kv_heads, cached, head_dim), dtype)
    return {k: v for k, v in feed.items() if k in inputs}


def _fit(values: list[dict[str, np.ndarray]]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Each Shape output whose every entry is a whole-number combination of ``TERMS`` at all the
    probes: its name -> one coefficient tuple per entry."""
    terms = np.array([[1, b, s, p, b * s] for b, s, p, _ in PROBES], dtype=np.float64)
    found = {}
    for name in values[0]:
        seen = [v[name] for v in values]
        if any(v.ndim != 1 or v.shape != seen[0].shape for v in seen):
            continue
        entries = []
        for k in range(seen[0].shape[0]):
            target = np.array([v[k] for v in seen], dtype=np.float64)
            coef = np.linalg.lstsq(terms[:FIT], target[:FIT], rcond=None)[0].round()
            if not np.array_equal(terms @ coef, target):
                break
            entries.append(tuple(int(c) for c in coef))
        else:
            found[name] = tuple(entries)
    return found


def _replace(graph: onnx.GraphProto, sizes: dict, past: str) -> int:
    """Every Shape node in ``sizes`` replaced by one shared computation of its value, made at the
    top of the graph from the inputs' shapes. Returns how many were replaced."""
    made: dict = {}
    added: list[onnx.NodeProto] = []

    def constant(values) -> str:
        key = ("constant", tuple(values))
        if key not in made:
            made[key] = f"{PREFIX}constant_{len(made)}"
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64),
                                                             made[key]))
        return made[key]

    def node(op: str, inputs: list[str], key, **attrs) -> str:
        if key not in made:
            made[key] = f"{PREFIX}{op.lower()}_{len(made)}"
            added.append(helper.make_node(op, inputs, [made[key]], name=made[key], **attrs))
        return made[key]

    def term(name: str) -> str:
        where = {"b": ("input_ids", 0), "s": ("input_ids", 1), "p": (past, 2)}
        if name == "bs":
            return node("Mul", [term("b"), term("s")], "bs")
        source, axis = where[name]
        return node("Shape", [source], name, start=axis, end=axis + 1)

    def entry(coef: tuple[int, ...]) -> str:
        parts = []
        for c, name in zip(coef[1:], TERMS[1:]):
            if c:
                parts.append(term(name) if c == 1 else
                             node("Mul", [term(name), constant([c])], (name, c)))
        if coef[0] or not parts:
            parts.append(constant([coef[0]]))
        total = parts[0]
        for part in parts[1:]:
            total = node("Add", [total, part], ("add", total, part))
        return total

    graph_outputs = {o.name for o in graph.output}
    renamed, kept = {}, []
    for n in graph.node:
        if n.op_type != "Shape" or n.output[0] not in sizes or n.output[0] in graph_outputs:
            kept.append(n)
            continue
        entries = sizes[n.output[0]]
        if all(not any(c[1:]) for c in entries):
            renamed[n.output[0]] = constant([c[0] for c in entries])
        else:
            parts = [entry(c) for c in entries]
            renamed[n.output[0]] = node("Concat", parts, ("shape", entries), axis=0)
    for n in kept:
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)
    del graph.node[:]
    graph.node.extend(added + kept)
    return len(renamed)
