"""int8 weights for an exported graph, with onnxruntime's quantizers.

Two methods, both from ``onnxruntime.quantization``:

* ``blockwise`` (the default): ``MatMulNBitsQuantizer`` with 8 bits. Each MatMul weight becomes a
  ``MatMulNBits`` node: symmetric 8-bit codes with one fp32 scale per block of ``block_size``
  input rows of each output column; at ``accuracy_level`` 4 the activations are quantised to
  int8 on the fly per block of the same size, so an outlier only coarsens its own block. On
  Llama models SmoothQuant (``smooth.py``) first moves activation outliers into the weights.
* ``dynamic``: ``quantize_dynamic`` (MatMulInteger): int8 weights per output channel, uint8
  activations with one scale per tensor per call. On SmolLM2 it loses the bake and more: its
  MLP inputs carry "massive activations" (|x| ~ 3000 at the first token, ~5 elsewhere), so a
  prompt shares one activation scale whose step is larger than every other value; and without
  ``reduce_range`` the u8s8 kernels of x86 CPUs without VNNI saturate. Kept for comparison and
  for models without such outliers; the parity check's int8 criterion rejects it on SmolLM2.

Measured on the README's pirate bake of SmolLM2-135M (held-out KL to the prompted model, share of
the bake's KL reduction kept; the export report has the commands): blockwise with SmoothQuant
keeps 99.1%, blockwise alone 97.8%, dynamic -169% (worse than the unbaked model).

A tied LM head is one matrix used twice: by the head's MatMul and by the embedding lookup. The
quantizers quantise the MatMul's use and leave the lookup reading the fp32 matrix, which would
keep the largest matrix of a small model (28 M of SmolLM2's 135 M weights) in fp32. The lookup
is rewired to dequantise rows of the int8 matrix instead, so the matrix is stored once, in int8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from promptbake.export.graph import TIED_HEAD, save

log = logging.getLogger("promptbake")

METHODS = ("blockwise", "dynamic")


@dataclasses.dataclass
class Int8Options:
    """How the weights are quantised (see the module docstring for the methods).

    ``block_size`` and ``accuracy_level`` apply to ``blockwise`` (accuracy level 4: int8
    compute; 0: fp32 compute with dequantised weights, far slower on CPU). ``per_channel`` and
    ``reduce_range`` (7-bit weights, which avoids the int16 saturation of onnxruntime's u8s8
    kernels on x86 CPUs without VNNI) apply to ``dynamic``. ``exclude``: regular expressions of
    MatMul node names kept in fp32 (node names follow the module path, e.g.
    ``/model/layers.11/mlp/down_proj/MatMul``); ``keep_head_fp32`` keeps the LM head (and with a
    tied head, the embedding) in fp32. ``smooth``: SmoothQuant's migration strength
    (``smooth.py``; applied to Llama models), None to skip it; ``calibration``: how many built-in training contexts
    measure the activation ranges it needs.
    """

    method: str = "blockwise"
    smooth: float | None = 0.5
    calibration: int = 32
    block_size: int = 32
    accuracy_level: int = 4
    per_channel: bool = True
    reduce_range: bool = True
    exclude: tuple[str, ...] = ()
    keep_head_fp32: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"int8 method {self.method!r}: choose blockwise or dynamic")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of 2, at least 16")
        if self.smooth is not None and not 0 <= self.smooth <= 1:
            raise ValueError(f"smooth={self.smooth}: SmoothQuant's migration strength must be in "
                             f"[0, 1]")
        if self.calibration < 1:
            raise ValueError(f"calibration={self.calibration} must be >= 1")
        if self.accuracy_level not in (0, 1, 4):
            raise ValueError(f"accuracy_level={self.accuracy_level}: choose 4 (int8 compute) or "
                             f"0 / 1 (fp32 compute)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def _quiet_quantizers():
    """Keeps onnxruntime's quantizers from changing the application's logging: the blockwise
    one calls ``logging.basicConfig(level=INFO)`` when imported (a no-op when the root logger
    already has a handler) and logs every node; quantize_dynamic logs advice to the root."""
    root = logging.getLogger()
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)

    def drop(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root.addFilter(drop)
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = nbits.level
    nbits.setLevel(logging.WARNING)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401 (see above)

        yield
    finally:
        nbits.setLevel(level)
        root.removeFilter(drop)
        root.removeHandler(placeholder)


def _excluded(model: onnx.ModelProto, options: Int8Options) -> list[str]:
    # quantize_dynamic rewrites a Gemm (GPT-2's Conv1D layers) as MatMul + Add before it
    # quantises MatMuls, so both kinds can be excluded by name.
    names = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    patterns = [re.compile(p) for p in options.exclude]
    found = [n for n in names if any(p.search(n) for p in patterns)]
    if options.keep_head_fp32:
        head = [n.name for n in model.graph.node if n.op_type == "MatMul" and TIED_HEAD in n.input]
        head = head or [n.name for n in model.graph.node
                        if n.op_type == "MatMul" and n.output[0] == "logits"]
        found += [n for n in head if n not in found]
    return found


def int8(source: Path, target: Path, options: Int8Options | None = None) -> dict:
    """Quantises the fp32 graph at ``source`` into ``target``; returns what was quantised."""
    options = options or Int8Options()
    options.validate()
    fp32 = onnx.load(str(source))
    excluded = _excluded(fp32, options)
    with _quiet_quantizers():
        if options.method == "blockwise":
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            _gemm_to_matmul(fp32)
            quantizer = MatMulNBitsQuantizer(fp32, bits=8, block_size=options.block_size,
                                             is_symmetric=True,
                                             accuracy_level=options.accuracy_level,
                                             nodes_to_exclude=excluded,
                                             op_types_to_quantize=("MatMul",))
            quantizer.process()
            model = quantizer.model.model
            shared = _share_blockwise_head(model)
            kind = "MatMulNBits"
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            del fp32
            quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"],
                             per_channel=options.per_channel, reduce_range=options.reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                             use_external_data_format=True,
                             extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True})
            model = onnx.load(str(target))
            shared = _share_dynamic_head(model)
            kind = "MatMulInteger"
    _drop_unused(model)
    save(model, target)
    return {"excluded_nodes": excluded, "tied_head_shared": shared,
            "quantized_matmuls": sum(n.op_type == kind for n in model.graph.node)}


def _gemm_to_matmul(model: onnx.ModelProto) -> None:
    """Gemm(A, B, C) with a constant B as MatMul(A, B) + C, which the blockwise quantizer
    handles (GPT-2's Conv1D layers trace to Gemm; quantize_dynamic does this itself)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for gemm in [n for n in graph.node if n.op_type == "Gemm" and n.input[1] in inits]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or \
                attrs.get("transA", 0):
            continue
        weight = gemm.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), weight + "_t")
            graph.initializer.append(transposed)
            weight = transposed.name
        product = gemm.output[0] + "_matmul" if len(gemm.input) > 2 else gemm.output[0]
        nodes = [helper.make_node("MatMul", [gemm.input[0], weight], [product],
                                  name=gemm.name + "_MatMul")]
        if len(gemm.input) > 2:
            nodes.append(helper.make_node("Add", [product, gemm.input[2]], [gemm.output[0]],
                                          name=gemm.name + "_Add"))
        _replace(graph, [gemm], nodes)


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    stale = [i for i in model.graph.initializer if i.name not in used]
    for init in stale:
        model.graph.initializer.remove(init)


def _lookups(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(Gather, Transpose) pairs that read embeddings from the tied head (see graph.py): a
    Gather of columns of the [hidden, vocab] matrix, then [hidden, b, s] -> [b, s, hidden]."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] == TIED_HEAD:
            after = consumers.get(node.output[0], [])
            perm = [list(a.ints) for a in after[0].attribute if a.name == "perm"] if after else []
            if len(after) != 1 or after[0].op_type != "Transpose" or perm != [[1, 2, 0]]:
                raise AssertionError("unexpected embedding lookup in the traced graph")
            pairs.append((node, after[0]))
    return pairs


def _replace(graph: onnx.GraphProto, old: list[onnx.NodeProto],
             new: list[onnx.NodeProto]) -> None:
    """Puts ``new`` where the first of ``old`` was and removes ``old`` (matched by content:
    rebuilding ``graph.node`` copies the messages, so earlier references are not identical)."""
    nodes = list(graph.node)
    at = next(i for i, n in enumerate(nodes) if n == old[0])
    nodes = [n for n in nodes if not any(n == o for o in old)]
    nodes[at:at] = new
    del graph.node[:]
    graph.node.extend(nodes)


def _share_blockwise_head(model: onnx.ModelProto) -> bool:
    """Embedding rows from the head's MatMulNBits codes: row v of the embedding is column v of
    the head, stored as ``codes[v]`` ([blocks, block] uint8, value + 128) times ``scales[v]``."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    codes, scales = TIED_HEAD + "_Q8", TIED_HEAD + "_scales"
    if codes not in inits:
        return False  # no tied head, or it was kept in fp32
    hidden = int(inits[TIED_HEAD].dims[0])
    padded = int(np.prod(inits[codes].dims[1:]))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(128, dtype=np.float32), TIED_HEAD + "_offset"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), TIED_HEAD + "_last_axis"),
        numpy_helper.from_array(np.array([0, 0, padded], dtype=np.int64), TIED_HEAD + "_row"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), TIED_HEAD + "_start"),
        numpy_helper.from_array(np.array([hidden], dtype=np.int64), TIED_HEAD + "_stop"),
    ])
    for lookup, transpose in _lookups(graph):
        ids, out, t = lookup.input[1], transpose.output[0], lookup.name + "_q8/"
        nodes = [
            # [b, s, blocks, block] codes and [b, s, blocks] scales of the tokens' columns
            helper.make_node("Gather", [codes, ids], [t + "codes"], axis=0),
            helper.make_node("Cast", [t + "codes"], [t + "float"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Sub", [t + "float", TIED_HEAD + "_offset"], [t + "centred"]),
            helper.make_node("Gather", [scales, ids], [t + "scales"], axis=0),
            helper.make_node("Unsqueeze", [t + "scales", TIED_HEAD + "_last_axis"],
                             [t + "block_scales"]),
            helper.make_node("Mul", [t + "centred", t + "block_scales"], [t + "blocks"]),
            helper.make_node("Reshape", [t + "blocks", TIED_HEAD + "_row"], [t + "padded"]),
            helper.make_node("Slice", [t + "padded", TIED_HEAD + "_start", TIED_HEAD + "_stop",
                                       TIED_HEAD + "_last_axis"], [out]),
        ]
        for node in nodes:
            node.name = node.output[0] if node.output[0] != out else t + "row"
        _replace(graph, [lookup, transpose], nodes)
    return True


def _share_dynamic_head(model: onnx.ModelProto) -> bool:
    """Embedding rows from the head's MatMulInteger weight: column v of the int8 [hidden,
    vocab] matrix times its scale (per channel) or the matrix's scale."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    quantized = TIED_HEAD + "_quantized"
    if quantized not in inits:
        return False
    scale = numpy_helper.to_array(inits[TIED_HEAD + "_scale"])
    if np.any(numpy_helper.to_array(inits[TIED_HEAD + "_zero_point"]) != 0):
        raise AssertionError("symmetric int8 weights must have zero points of 0")
    for lookup, _ in _lookups(graph):
        out, t = lookup.output[0], lookup.name + "_int8/"
        nodes = [helper.make_node("Gather", [quantized, lookup.input[1]], [t + "codes"], axis=1),
                 helper.make_node("Cast", [t + "codes"], [t + "float"],
                                  to=onnx.TensorProto.FLOAT)]
        if scale.ndim == 0:
            nodes.append(helper.make_node("Mul", [t + "float", TIED_HEAD + "_scale"], [out]))
        else:  # per channel: token v's column has scale[v]
            nodes += [helper.make_node("Gather", [TIED_HEAD + "_scale", lookup.input[1]],
                                       [t + "scales"], axis=0),
                      helper.make_node("Mul", [t + "float", t + "scales"], [out])]
        for node in nodes:
            node.name = node.output[0] if node.output[0] != out else t + "column"
        _replace(graph, [lookup], nodes)
    return True
