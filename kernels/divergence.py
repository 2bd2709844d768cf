"""Triton kernel for the fused softmax divergence (GPU path).

One program per row (token). Pass 1 computes both log-sum-exps online; pass 2 the loss and, for
forward KL, the gradient; reverse KL and JSD need the row's divergence before their gradient, so
they write it in pass 3. Logits are shifted by the row maximum before anything is subtracted, so
logits of +-1e4 keep fp32 accuracy. On CPU tensors this runs only under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# KIND: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), 2 JSD(beta).


@triton.jit
def _shifted_lse(row_ptr, n_cols, inv_t, BLOCK: tl.constexpr):
    """Row maximum m and log sum exp(x - m) of the temperature-scaled row, online."""
    offs = tl.arange(0, BLOCK)
    m = float("-inf")
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < n_cols, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every value so far is -inf, shift by 0 so exp sees -inf rather than NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    return m, tl.log(tl.sum(acc, axis=0))


@triton.jit
def _log_probs(s_row, t_row, idx, n_cols, inv_t, m_s, lz_s, m_t, lz_t):
    valid = idx < n_cols
    xs = tl.load(s_row + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
    xt = tl.load(t_row + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
    return (xs - m_s) - lz_s, (xt - m_t) - lz_t


@triton.jit
def _log_mixture(lp, lq, log_beta, log_1mbeta):
    a = lp + log_beta
    b = lq + log_1mbeta
    return tl.maximum(a, b) + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def divergence_kernel(
    s_ptr, s_stride, t_ptr, t_stride, mask_ptr, grad_ptr, grad_stride, loss_ptr, n_cols,
    beta, inv_t, loss_scale, grad_scale, log_beta, log_1mbeta,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK)

    # A masked row runs its loops over zero columns, then zero-fills its gradient.
    cols = n_cols
    if HAS_MASK:
        cols = tl.where(tl.load(mask_ptr + row) != 0, n_cols, 0)

    m_s, lz_s = _shifted_lse(s_row, cols, inv_t, BLOCK)
    m_t, lz_t = _shifted_lse(t_row, cols, inv_t, BLOCK)

    acc_a = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        idx = start + offs
        lq, lp = _log_probs(s_row, t_row, idx, cols, inv_t, m_s, lz_s, m_t, lz_t)
        p = tl.exp(lp)
        q = tl.exp(lq)
        if KIND == 0:
            acc_a += tl.where(p == 0, 0.0, p * (lp - lq))
            if HAS_GRAD:
                tl.store(g_row + idx, ((q - p) * grad_scale).to(grad_ptr.dtype.element_ty),
                         mask=idx < cols)
        elif KIND == 1:
            acc_a += tl.where(q == 0, 0.0, q * (lq - lp))
        else:
            lm = _log_mixture(lp, lq, log_beta, log_1mbeta)
            acc_a += tl.where(p == 0, 0.0, p * (lp - lm))
            acc_b += tl.where(q == 0, 0.0, q * (lq - lm))

    if KIND == 0:
        loss = tl.sum(acc_a, axis=0)
        k = loss
    elif KIND == 1:
        loss = tl.sum(acc_a, axis=0)
        k = loss
    else:
        k = tl.sum(acc_b, axis=0)
        loss = beta * tl.sum(acc_a, axis=0) + (1.0 - beta) * k
    loss = tl.where(cols > 0, loss, 0.0)
    tl.store(loss_ptr + row, loss * loss_scale)

    if HAS_GRAD:
        if KIND != 0:
            for start in range(0, cols, BLOCK):
                idx = start + offs
                lq, lp = _log_probs(s_row, t_row, idx, cols, inv_t, m_s, lz_s, m_t, lz_t)
                q = tl.exp(lq)
                if KIND == 1:
                    g = tl.where(q == 0, 0.0, q * (lq - lp - k))
                else:
                    lm = _log_mixture(lp, lq, log_beta, log_1mbeta)
                    g = (1.0 - beta) * tl.where(q == 0, 0.0, q * (lq - lm - k))
                tl.store(g_row + idx, (g * grad_scale).to(grad_ptr.dtype.element_ty),
                         mask=idx < cols)
        for start in range(cols, n_cols, BLOCK):
            idx = start + offs
            tl.store(g_row + idx, tl.zeros((BLOCK,), dtype=grad_ptr.dtype.element_ty),
                     mask=idx < n_cols)


def launch(student, teacher, mask, grad, row_loss, *, kind, beta, inv_temperature, loss_scale,
           grad_scale):
    """Runs the kernel on [N, V] tensors whose last dimension is contiguous."""
    n_rows, n_cols = student.shape
    block = min(4096, triton.next_power_of_2(n_cols))
    has_grad = grad is not None
    # log(beta) is only read for JSD; any finite value serves the other kinds.
    log_beta = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log_1mbeta = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    divergence_kernel[(n_rows,)](
        student, student.stride(0), teacher, teacher.stride(0),
        mask.view(torch.uint8) if mask is not None else row_loss,
        grad if has_grad else student, grad.stride(0) if has_grad else 0,
        row_loss, n_cols,
        beta, inv_temperature, loss_scale, grad_scale, log_beta, log_1mbeta,
        KIND=kind, HAS_MASK=mask is not None, HAS_GRAD=has_grad, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
