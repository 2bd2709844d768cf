"""``y = x W^T + b`` for a pruned weight, fast at batch 1 (decode) and small batches.

The weight ``W [out, in]`` is stored as:

* ``bitmap``: ``[out, ceil(in / 32)]`` int32 holding uint32 bit patterns; bit j of word w marks
  column ``32 w + j`` as kept.
* ``values``: ``[nnz]`` float32 (default), bfloat16 or float16: the kept weights row by row, in
  column order.
* ``row_offsets``: ``[out + 1]`` int64; row r's values are
  ``values[row_offsets[r]:row_offsets[r + 1]]``.

Decoding one token is memory-bound, so the layer is as fast as it reads few bytes: fp32 values
plus the bitmap read ``4 (1 - s) + 1/8`` bytes per weight at sparsity s, against dense's 4 (at 70%
1.33, at 2:4 2.13; CSR with 16-bit column indices would read 1.8 and 3). The kernels
(csrc/sparse_linear_impl.h, promptbake/kernels/sparse_linear.py) read each weight once per call and
use it for every row of x. Inference only: the weights are constant, x may require a gradient.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from promptbake.ops import _dispatch

WORD_BITS = 32
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def pack(weight: Tensor, mask: Tensor | None = None, *,
         dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(bitmap, values, row_offsets)`` of a dense ``[out, in]`` weight.

    Args:
        mask: bool ``[out, in]``: keep where True (kept zeros are stored as zeros). Default: keep
            the non-zeros.
        dtype: the values' dtype (float32, bfloat16 or float16); default the weight's.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a 2-D float tensor [out, in], got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    out_features, in_features = weight.shape
    if out_features == 0 or in_features == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: both dimensions must be >= 1")
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in VALUE_DTYPES + (torch.float64,):
        raise ValueError(f"values dtype {dtype} is not supported: use float32, bfloat16 or float16")
    weight = weight.detach()
    if mask is None:
        keep = weight != 0
    else:
        if not isinstance(mask, Tensor) or mask.shape != weight.shape:
            raise ValueError(f"mask must be a tensor of the weight's shape {tuple(weight.shape)}, "
                             f"got {tuple(getattr(mask, 'shape', ()))}")
        keep = mask.to(device=weight.device, dtype=torch.bool)
    words = -(-in_features // WORD_BITS)
    padded = torch.zeros(out_features, words * WORD_BITS, dtype=torch.int64, device=weight.device)
    padded[:, :in_features] = keep
    powers = torch.ones((), dtype=torch.int64, device=weight.device) << torch.arange(
        WORD_BITS, device=weight.device)
    bits = (padded.view(out_features, words, WORD_BITS) * powers).sum(-1)
    bitmap = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # uint32 bits
    values = weight[keep].to(dtype).contiguous()
    row_offsets = torch.zeros(out_features + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(keep.sum(1), 0, out=row_offsets[1:])
    return bitmap, values, row_offsets


def kept(bitmap: Tensor, in_features: int) -> Tensor:
    """The bool ``[out, in]`` mask of kept weights."""
    bits = (bitmap.to(torch.int64)[..., None] >> torch.arange(WORD_BITS, device=bitmap.device)) & 1
    return bits.view(bitmap.shape[0], -1)[:, :in_features].bool()


def unpack(bitmap: Tensor, values: Tensor, row_offsets: Tensor, in_features: int) -> Tensor:
    """The dense ``[out, in]`` weight (zeros where pruned), in the values' dtype."""
    keep = kept(bitmap, in_features)
    dense = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    dense[keep] = values
    return dense


def check_format(bitmap: Tensor, values: Tensor, row_offsets: Tensor, in_features: int) -> None:
    """Raises ``ValueError`` unless the three tensors are a consistent packed ``[out, in]`` weight.

    The compiled kernel trusts them (a wrong offset reads out of bounds), so everything it relies
    on is checked: dtypes, shapes, devices, contiguity, offsets against the bitmap's counts, and
    no bit set at or beyond ``in_features``.
    """
    for name, t in (("bitmap", bitmap), ("values", values), ("row_offsets", row_offsets)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: pass {name}.contiguous()")
        if t.device != bitmap.device:
            raise ValueError(f"{name} is on {t.device} but bitmap on {bitmap.device}: move the "
                             f"packed weight to one device")
    if bitmap.dtype != torch.int32 or bitmap.dim() != 2:
        raise ValueError(f"bitmap must be int32 [out, words], got {bitmap.dtype} "
                         f"{tuple(bitmap.shape)}: build it with promptbake.ops.sparse_linear.pack")
    out_features, words = bitmap.shape
    if in_features < 1 or words != -(-in_features // WORD_BITS):
        raise ValueError(f"bitmap has {words} words per row, which does not fit in_features="
                         f"{in_features} (needs {-(-in_features // WORD_BITS)})")
    if out_features < 1:
        raise ValueError("bitmap has no rows: out_features must be >= 1")
    if values.dtype not in VALUE_DTYPES + (torch.float64,) or values.dim() != 1:
        raise ValueError(f"values must be 1-D float32, bfloat16 or float16, got {values.dtype} "
                         f"{tuple(values.shape)}")
    if row_offsets.dtype != torch.int64 or row_offsets.shape != (out_features + 1,):
        raise ValueError(f"row_offsets must be int64 of shape ({out_features + 1},), got "
                         f"{row_offsets.dtype} {tuple(row_offsets.shape)}")
    keep = kept(bitmap, words * WORD_BITS)
    if bool(keep[:, in_features:].any()):
        raise ValueError(f"bitmap marks columns at or beyond in_features={in_features} as kept")
    counts = torch.diff(row_offsets)
    if int(row_offsets[0]) != 0 or int(row_offsets[-1]) != values.numel() \
            or not torch.equal(counts, keep.sum(1)):
        raise ValueError(f"row_offsets do not match the bitmap (first {int(row_offsets[0])}, last "
                         f"{int(row_offsets[-1])}, {values.numel()} values): rebuild with pack()")


def sparse_linear(x: Tensor, bitmap: Tensor, values: Tensor, row_offsets: Tensor,
                  bias: Tensor | None = None, *, in_features: int | None = None,
                  backend: str | None = None, check: bool = True) -> Tensor:
    """``x W^T + b`` for a weight packed by ``pack`` (module form: ``promptbake.nn.SparseLinear``).

    Args:
        x: ``[..., in]`` float32, bfloat16, float16 or float64 (any strides). The result has x's
            dtype and shape ``[..., out]``; the sum is accumulated in fp32 (float64 for float64).
        bias: ``[out]`` or None.
        in_features: the weight's width; default ``x.shape[-1]``, which must then match it.
        check: validate the packed weight's contents (a few small torch ops per call);
            ``SparseLinear`` checks once at construction or load and passes False.

    Inference only: the gradient flows to x, never to the weight or the bias (ValueError if
    they require one while grad is enabled). A pruned weight counts as a zero, as in the dense
    layer: a NaN or inf in x reaches the output through ``0 * inf`` there too.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x has dtype {x.dtype}: expected float32, bfloat16, float16 or float64")
    if x.dim() < 1:
        raise ValueError("x is a scalar: expected [..., in_features]")
    width = x.shape[-1]
    if in_features is not None and width != in_features:
        raise ValueError(f"x has {width} features in its last dimension but the layer takes "
                         f"in_features={in_features}")
    if check:
        check_format(bitmap, values, row_offsets, width)
    elif bitmap.shape[1] != -(-width // WORD_BITS):
        raise ValueError(f"x has {width} features but the bitmap is "
                         f"{bitmap.shape[1] * WORD_BITS} columns wide (in_features mismatch)")
    out_features = bitmap.shape[0]
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but the weight on {values.device}: move one")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (out_features,) \
                or bias.dtype not in _FLOATS:
            raise ValueError(f"bias must be a float tensor of shape ({out_features},), got "
                             f"{getattr(bias, 'dtype', type(bias).__name__)} "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x on {x.device}")
    if torch.is_grad_enabled() and (values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        raise ValueError("sparse_linear does not train its weight or bias (inference only): "
                         "detach them, or train a dense nn.Linear (SparseLinear.to_dense())")
    return forward(x, bitmap, values, row_offsets, bias, choose_backend(x, values, backend))


def choose_backend(x: Tensor, values: Tensor, backend: str | None = None) -> str:
    """The backend for x against values (float64 on either side: torch)."""
    dtype = torch.float64 if torch.float64 in (x.dtype, values.dtype) else x.dtype
    name = _dispatch.select(x.device, dtype, backend)
    if name != "torch" and values.dtype == torch.float64:
        raise ValueError(f"backend {name!r} takes float32, bfloat16 or float16 values, got "
                         f"float64: use backend='torch'")
    return name


def forward(x: Tensor, bitmap: Tensor, values: Tensor, row_offsets: Tensor, bias: Tensor | None,
            name: str) -> Tensor:
    """``sparse_linear`` after validation, on backend ``name``: the per-call path of a layer."""
    width = x.shape[-1]
    if x.dim() == 2 and x.stride(-1) == 1:
        x2 = x
    else:
        x2 = x.reshape(-1, width)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        y = _SparseLinear.apply(x2, bitmap, values, row_offsets, bias, name)
    else:
        y = _BACKENDS[name](x2, bitmap, values, row_offsets, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], bitmap.shape[0])


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bitmap, values, row_offsets, bias, name):
        ctx.save_for_backward(bitmap, values, row_offsets)
        ctx.width = x.shape[1]
        return _BACKENDS[name](x, bitmap, values, row_offsets, bias)

    @staticmethod
    def backward(ctx, grad_y):
        # dL/dx = grad_y W: the dense weight, rebuilt for the backward only (not a hot path).
        bitmap, values, row_offsets = ctx.saved_tensors
        acc = torch.promote_types(grad_y.dtype, torch.float32)
        w = unpack(bitmap, values, row_offsets, ctx.width).to(acc)
        return (grad_y.to(acc) @ w).to(grad_y.dtype), None, None, None, None, None


# Backends: (x [N, in] with unit last stride, bitmap, values, row_offsets, bias) -> y [N, out]


def _cpp(x, bitmap, values, row_offsets, bias):
    if bias is not None and bias.dtype not in _DTYPE_CODES:
        bias = bias.float()
    n, width = x.shape
    out_features = bitmap.shape[0]
    y = torch.empty((n, out_features), dtype=x.dtype)
    if n:
        _dispatch.compiled().sparse_linear(
            x.data_ptr(), _DTYPE_CODES[x.dtype], x.stride(0), bitmap.data_ptr(),
            values.data_ptr(), _DTYPE_CODES[values.dtype], row_offsets.data_ptr(),
            bias.data_ptr() if bias is not None else 0,
            _DTYPE_CODES[bias.dtype] if bias is not None else 0,
            y.data_ptr(), out_features, n, width, out_features, values.numel(),
            torch.get_num_threads(), _isa())
    return y


def _isa() -> str:
    # The compiled module checks the name (ValueError if this CPU lacks it); reading the
    # variable directly keeps the per-call cost of a small layer low.
    return os.environ.get(_dispatch.ISA_ENV_VAR, "")


def _triton(x, bitmap, values, row_offsets, bias):
    n = x.shape[0]
    y = torch.empty((n, bitmap.shape[0]), dtype=x.dtype, device=x.device)
    if n:
        _dispatch.triton_kernels("sparse_linear").launch(x, bitmap, values, row_offsets, bias, y)
    return y


def _torch(x, bitmap, values, row_offsets, bias):
    """Reference: rebuild the dense weight and call F.linear in fp32 (float64 for float64)."""
    acc = torch.float64 if torch.float64 in (x.dtype, values.dtype) else torch.float32
    w = unpack(bitmap, values, row_offsets, x.shape[1]).to(acc)
    b = bias.to(acc) if bias is not None else None
    return F.linear(x.to(acc), w, b).to(x.dtype)


_BACKENDS = {"cpp": _cpp, "triton": _triton, "torch": _torch}


def nbytes(bitmap: Tensor, values: Tensor, row_offsets: Tensor) -> int:
    """Bytes a call reads of the packed weight (the bandwidth figure's numerator)."""
    return sum(t.numel() * t.element_size() for t in (bitmap, values, row_offsets))

