"""Triton kernel for the sparse linear layer (GPU path), on the bitmap + packed values format of
``promptbake.ops.sparse_linear``.

One program per output row and block of batch rows. It walks the row's bitmap BLOCK_W words
(32 columns each) at a time; a kept column's value sits at the row's offset plus the number of
kept columns before it, which an exclusive prefix sum of the bits gives. Each value is loaded
once and multiplied with every batch row of the block. On CPU tensors this runs only under
TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sparse_linear_kernel(
    x_ptr, x_stride, bitmap_ptr, words, values_ptr, offsets_ptr, bias_ptr, y_ptr, y_stride,
    batch, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = b < batch
    bit = tl.arange(0, 32)
    offset = tl.load(offsets_ptr + row)
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for w0 in range(0, words, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        word = tl.load(bitmap_ptr + row * words + w, mask=w < words, other=0)
        # The & 1 undoes the sign extension of the int32 shift for bit 31.
        kept = tl.reshape((word[:, None] >> bit[None, :]) & 1, (BLOCK_W * 32,))
        col = tl.reshape(w[:, None] * 32 + bit[None, :], (BLOCK_W * 32,))
        rank = tl.cumsum(kept, 0) - kept
        keep = kept != 0
        v = tl.load(values_ptr + offset + rank, mask=keep, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + b[:, None] * x_stride + col[None, :],
                     mask=in_batch[:, None] & keep[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv * v[None, :], axis=1)
        offset += tl.sum(kept, 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row).to(tl.float32)
    tl.store(y_ptr + b * y_stride + row, acc.to(y_ptr.dtype.element_ty), mask=in_batch)


def launch(x, bitmap, values, row_offsets, bias, y):
    """y [N, out] = x [N, in] W^T + bias; x's last dimension is contiguous."""
    n = x.shape[0]
    out_features, words = bitmap.shape
    block_b = min(16, triton.next_power_of_2(n))
    block_w = min(8, triton.next_power_of_2(words))
    sparse_linear_kernel[(out_features, triton.cdiv(n, block_b))](
        x, x.stride(0), bitmap, words, values, row_offsets,
        bias if bias is not None else values, y, y.stride(0), n,
        HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_W=block_w, num_warps=4,
    )
