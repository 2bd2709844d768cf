"""Compact storage of pruned weights inside a standard ONNX graph.

What onnxruntime offers and why it is not used: ONNX sparse initializers (COO values + int64
linear indices) are densified by onnxruntime at load, but their indices cost 8 bytes per
non-zero (4 with int32), more than an 8-bit weight itself, so a 50%-pruned int8 matrix would
grow 2.5x (4.5x with int64 indices). Block-sparse and structured kernels (the com.microsoft
contrib ops) do not take unstructured masks or quantised weights.

Stored instead: for each weight with enough pruned elements, a bitmask (1 bit per element,
numpy's ``packbits`` order) and the other elements in row-major order (``Packed``); pruned
elements are those equal to the fill value (0, or 128 for MatMulNBits' uint8 codes). A small
subgraph of standard ONNX operators rebuilds the dense weight from them (BitShift and Mod unpack
the mask, a CumSum of it indexes the values; see ``_expand``). Every input of that subgraph is an
initializer and every intermediate has a static shape, so onnxruntime's constant folding runs it
once when the session is created and the dense weight is an initializer of the optimised graph,
exactly what the kernels saw before packing (their weight prepacking included). The file stays a
plain ONNX model: ``onnx.checker`` accepts it and any runtime can execute it.

At 50% unstructured sparsity an 8-bit weight takes 0.5 + 0.125 = 0.625 bytes per element
instead of 1; an fp32 one 2.125 instead of 4. (The blockwise scales stay dense.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_ELEMENTS = 4096  # smaller tensors are not worth a subgraph
_PACKABLE = {onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.FLOAT: 4,
             onnx.TensorProto.FLOAT16: 2}


@dataclasses.dataclass
class Packed:
    """One weight in packed form: ``mask`` = packbits(weight != fill), ``values`` = the fill
    value, then the other elements in row-major order.

    The fill is what a pruned weight is stored as: 0 for float and int8 weights, 128 for the
    uint8 codes of symmetric 8-bit MatMulNBits (code = round(w / scale) + 128).
    """

    shape: tuple[int, ...]
    mask: np.ndarray  # uint8 [ceil(n / 8)]
    values: np.ndarray  # weight dtype [1 + n - count(fill)]

    @classmethod
    def of(cls, weight: np.ndarray, fill=0) -> Packed:
        flat = weight.reshape(-1)
        kept = flat != fill
        return cls(tuple(weight.shape), np.packbits(kept),
                   np.concatenate([np.full(1, fill, flat.dtype), flat[kept]]))

    @property
    def fill(self):
        return self.values[0]

    def dense(self) -> np.ndarray:
        n = int(np.prod(self.shape))
        kept = np.unpackbits(self.mask, count=n).astype(bool)
        flat = np.full(n, self.fill, dtype=self.values.dtype)
        flat[kept] = self.values[1:]
        return flat.reshape(self.shape)

    def nbytes(self) -> int:
        return self.mask.nbytes + self.values.nbytes


def pack(model: onnx.ModelProto, min_saving: float = 0.1) -> list[dict]:
    """Replaces every initializer that packing makes at least ``min_saving`` smaller by its
    packed form and the subgraph that expands it; returns one record per packed weight."""
    graph = model.graph
    consumers = {name for node in graph.node for name in node.input}
    records, expansions, constants = [], [], []
    for init in list(graph.initializer):
        width = _PACKABLE.get(init.data_type)
        count = int(np.prod(init.dims)) if init.dims else 1
        if width is None or count < MIN_ELEMENTS or init.name not in consumers:
            continue
        weight = numpy_helper.to_array(init)
        packed = Packed.of(weight, _fill(weight))
        if packed.nbytes() > (1 - min_saving) * weight.nbytes:
            continue
        graph.initializer.remove(init)
        graph.initializer.extend([numpy_helper.from_array(packed.mask, init.name + ".mask"),
                                  numpy_helper.from_array(packed.values, init.name + ".values")])
        nodes, small = _expand(init.name, packed.shape)
        expansions += nodes
        constants += small
        records.append({"name": init.name, "shape": list(packed.shape),
                        "dtype": str(weight.dtype), "fill": packed.fill.item(),
                        "kept": int(packed.values.size - 1),
                        "dense_bytes": int(weight.nbytes), "packed_bytes": packed.nbytes()})
    if expansions:
        # The expansions go first: a graph's nodes must be in topological order.
        nodes = expansions + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(constants + _constants())
    return records


def _fill(weight: np.ndarray):
    """The value pruned weights are stored as: the most frequent byte of 1-byte codes (0 for
    int8, 128 for MatMulNBits' uint8), else 0."""
    if weight.dtype.itemsize != 1:
        return weight.dtype.type(0)
    counts = np.bincount(weight.reshape(-1).view(np.uint8), minlength=256)
    return np.array([counts.argmax()], dtype=np.uint8).view(weight.dtype)[0]


def unpack(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The dense weights of a packed graph, rebuilt with numpy (to verify a packed file
    without onnxruntime)."""
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for name in [i[:-len(".mask")] for i in inits if i.endswith(".mask")]:
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[name + ".shape"]))
        found[name] = Packed(shape, numpy_helper.to_array(inits[name + ".mask"]),
                             numpy_helper.to_array(inits[name + ".values"])).dense()
    return found


_SHIFTS, _TWO, _FLAT = "promptbake.sparse.shifts", "promptbake.sparse.two", "promptbake.sparse.flat"


def _constants() -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.arange(7, -1, -1, dtype=np.uint8), _SHIFTS),
            numpy_helper.from_array(np.array(2, dtype=np.uint8), _TWO),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), _FLAT)]


def _expand(name: str, shape: tuple[int, ...]) -> tuple[list[onnx.NodeProto],
                                                         list[onnx.TensorProto]]:
    """Nodes computing ``name`` (the dense weight) from ``name.mask`` and ``name.values``, and
    the small constants they read.

    Every intermediate has a shape known before execution (onnxruntime constant-folds only
    such nodes: NonZero, say, would stay in the graph and run at every call). The k-th
    non-zero element sits where the running count of mask bits reaches k, so with the values
    stored behind the fill value, element i is ``values[cumsum(mask)[i] * mask[i]]``.
    """
    n = int(np.prod(shape))
    t = name + ".expand/"
    consts = {t + "axes": np.array([1], dtype=np.int64), t + "start": np.array([0], dtype=np.int64),
              t + "stop": np.array([n], dtype=np.int64), t + "axis": np.array(0, dtype=np.int64),
              name + ".shape": np.array(shape, dtype=np.int64)}
    nodes = [
        # Bit j of byte i (most significant first, as numpy.packbits) is element 8 i + j.
        helper.make_node("Unsqueeze", [name + ".mask", t + "axes"], [t + "bytes"]),
        helper.make_node("BitShift", [t + "bytes", _SHIFTS], [t + "shifted"], direction="RIGHT"),
        helper.make_node("Mod", [t + "shifted", _TWO], [t + "bits"]),
        helper.make_node("Reshape", [t + "bits", _FLAT], [t + "flat_bits"]),
        helper.make_node("Slice", [t + "flat_bits", t + "start", t + "stop"], [t + "mask_bits"]),
        helper.make_node("Cast", [t + "mask_bits"], [t + "mask"], to=onnx.TensorProto.INT32),
        helper.make_node("CumSum", [t + "mask", t + "axis"], [t + "count"]),
        helper.make_node("Mul", [t + "count", t + "mask"], [t + "index"]),
        helper.make_node("Gather", [name + ".values", t + "index"], [t + "flat"], axis=0),
        helper.make_node("Reshape", [t + "flat", name + ".shape"], [name]),
    ]
    for node in nodes:
        node.name = t + node.output[0].rsplit("/", 1)[-1]
    return nodes, [numpy_helper.from_array(v, k) for k, v in consts.items()]
