"""Triton kernel for the sparse linear layer (GPU path), on the bitmap + packed values format of
``promptbake.ops.sparse_linear``.

One program per tile of BLOCK_O output rows x BLOCK_B batch rows. It walks the rows' bitmaps
BLOCK_W words (32 columns each) at a time: a kept column's value sits at its row's offset plus
the number of kept columns before it, which is the kept count of the words before (a prefix sum
of per-word popcounts) plus the popcount of the word's lower bits. Each x tile is loaded once
for the BLOCK_O rows, each value once for the BLOCK_B batch rows (a pruned weight is a zero);
products accumulate per lane and are summed once, after the loop.

Offsets are int64: the batch row times x's or y's row stride passes 2^31 elements for an LM head
of 128,256 outputs at 16,744 rows. The tiles are numbered on grid axis 0 (up to 2^31 - 1
programs); axes 1 and 2 allow only 65,535, which a batch of a million rows would pass.
On CPU tensors this runs only under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl

from promptbake.kernels import device_context

MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis 0


@triton.jit
def _popcount(x):
    """Set bits of each int64 holding a 32-bit pattern (SWAR; no cross-lane work)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101 >> 24) & 0xFF


@triton.jit
def sparse_linear_kernel(
    x_ptr, x_stride, bitmap_ptr, words, width, values_ptr, offsets_ptr, bias_ptr, y_ptr,
    y_stride, batch, out_features, out_tiles,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    o = (tile % out_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    b = (tile // out_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_out = o < out_features
    in_batch = b < batch
    bit = tl.arange(0, 32).to(tl.int64)
    below = (tl.full((32,), 1, tl.int64) << bit) - 1  # the bits under each bit
    offset = tl.load(offsets_ptr + o, mask=in_out, other=0)
    acc = tl.zeros((BLOCK_B, BLOCK_O, BLOCK_W * 32), dtype=tl.float32)
    for w0 in range(0, words, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        word = tl.load(bitmap_ptr + o[:, None] * words + w[None, :],
                       mask=in_out[:, None] & (w[None, :] < words), other=0)
        word = word.to(tl.int64) & 0xFFFFFFFF  # the uint32 pattern, shifts now logical
        count = _popcount(word)
        first = tl.cumsum(count, 1) - count  # kept columns in the tile's earlier words
        rank = tl.reshape(first[:, :, None] + _popcount(word[:, :, None] & below[None, None, :]),
                          (BLOCK_O, BLOCK_W * 32))
        keep = tl.reshape(((word[:, :, None] >> bit[None, None, :]) & 1) != 0,
                          (BLOCK_O, BLOCK_W * 32))
        col = tl.reshape(w[:, None] * 32 + bit[None, :], (BLOCK_W * 32,))
        v = tl.load(values_ptr + offset[:, None] + rank, mask=keep, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + b[:, None] * x_stride + col[None, :],
                     mask=in_batch[:, None] & (col[None, :] < width), other=0.0).to(tl.float32)
        acc += xv[:, None, :] * v[None, :, :]
        offset += tl.sum(count, 1)
    y = tl.sum(acc, 2)
    if HAS_BIAS:
        y += tl.load(bias_ptr + o, mask=in_out, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + b[:, None] * y_stride + o[None, :], y.to(y_ptr.dtype.element_ty),
             mask=in_batch[:, None] & in_out[None, :])


def blocks(n: int, words: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_O, BLOCK_W): batch rows, output rows and bitmap words per program; the
    accumulator holds BLOCK_B x BLOCK_O x 32 BLOCK_W fp32 lanes (<= 4096, 32 per thread)."""
    block_b = min(8, triton.next_power_of_2(max(n, 1)))
    block_w = min(4, triton.next_power_of_2(words))
    block_o = max(1, 4096 // (block_b * block_w * 32))
    return block_b, min(block_o, 16), block_w


def grid(n: int, out_features: int, block_b: int, block_o: int) -> tuple[int]:
    """The launch grid: every (batch tile, output tile) on axis 0."""
    programs = triton.cdiv(out_features, block_o) * triton.cdiv(n, block_b)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"sparse_linear on {n} rows x {out_features} outputs needs {programs} "
                         f"programs, more than a CUDA grid holds ({MAX_PROGRAMS}): split x into "
                         f"chunks of rows")
    return (programs,)


def launch(x, bitmap, values, row_offsets, bias, y):
    """y [N, out] = x [N, in] W^T + bias; x's last dimension is contiguous."""
    n, width = x.shape
    out_features, words = bitmap.shape
    block_b, block_o, block_w = blocks(n, words)
    with device_context(x):
        sparse_linear_kernel[grid(n, out_features, block_b, block_o)](
            x, x.stride(0), bitmap, words, width, values, row_offsets,
            bias if bias is not None else values, y, y.stride(0), n, out_features,
            triton.cdiv(out_features, block_o),
            HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_O=block_o, BLOCK_W=block_w,
            num_warps=4,
        )
