"""Triton kernels for the fused softmax divergence (GPU path).

One program per row (token), its index in int64: an N x V row offset passes 2^31 elements at
N = 16,744 for V = 128,256. The grid is (N,) on axis 0, whose limit (2^31 - 1 programs) no
batch reaches; axes 1 and 2 (65,535) are not used.

Pass 1 reads the student and teacher rows together and keeps both log-sum-exps and (for the
KLs) the sum behind the loss, as the C++ kernel's exp sweep does (csrc/divergence_impl.h), but
online: running maxima replace its separate max sweep, and the sums are rescaled whenever one
grows. For the KLs the loss comes out of this pass. Pass 2 writes the gradient (it needs both
normalisers, and reverse KL its loss). JSD needs both normalisers before its mixture, so its
loss takes pass 2 and its gradient pass 3. Logits are shifted by the running maxima before
anything is subtracted, so logits of +-1e4 keep fp32 accuracy. Teacher log-probabilities at
T = 1 are already shifted: their maximum is not tracked. Block size, warps and pipeline stages
are autotuned per (V, kind, gradient or not, dtypes); CUDA-graph capture should follow a first
(tuning) call. On CPU tensors this runs only under TRITON_INTERPRET=1 (tests), with the
smallest configuration and no tuning.

``scale_kernel`` multiplies a saved gradient in place by the backward's upstream factor, read
from device memory; a row whose factor is exactly 1 is left as it is, with no host sync.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from promptbake.kernels import device_context

# KIND: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), 2 JSD(beta).


@triton.jit
def _grow(m, x):
    """Running maximum m after block x, its finite shift (0 while the row holds no finite value
    yet) and exp(m_old - shift), which rescales sums taken under the old shift."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    sh_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, sh_new, tl.exp(m - sh_new)


@triton.jit
def _log_probs(s_row, t_row, idx, n_cols, inv_t, sh_s, lz_s, sh_t, lz_t):
    valid = idx < n_cols
    xs = tl.load(s_row + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
    xt = tl.load(t_row + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
    return (xs - sh_s) - lz_s, (xt - sh_t) - lz_t


@triton.jit
def _log_mixture(lp, lq, log_beta, log_1mbeta):
    a = lp + log_beta
    b = lq + log_1mbeta
    return tl.maximum(a, b) + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _divergence(
    s_ptr, s_stride, t_ptr, t_stride, mask_ptr, grad_ptr, grad_stride, loss_ptr, factor_ptr,
    n_cols, beta, inv_t, loss_scale, grad_scale, log_beta, log_1mbeta,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GRAD: tl.constexpr,
    HAS_FACTOR: tl.constexpr, TEACHER_LOGP: tl.constexpr, BLOCK: tl.constexpr,
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

    # Pass 1. Under shifts sh_s, sh_t: z_s = sum exp(xs - sh_s), z_t likewise, and for forward
    # KL acc = sum exp(xt - sh_t) ((xt - sh_t) - (xs - sh_s)) (reverse KL: roles swapped), so
    # KL(p || q) = acc / z_t - log z_t + log z_s. When a shift grows by d, the sums scale by
    # exp(-d_own) and acc's bracket moves by -(d_own - d_other).
    m_s = float("-inf")
    sh_s = 0.0
    m_t = float("-inf")
    sh_t = 0.0
    z_s = tl.zeros((BLOCK,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        idx = start + offs
        valid = idx < cols
        xs = tl.load(s_row + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        xt = tl.load(t_row + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        m_s, sh_s_new, alpha_s = _grow(m_s, xs)
        if TEACHER_LOGP:  # log-probabilities: max <= 0, no shift needed
            sh_t_new = sh_t
            alpha_t = 1.0
        else:
            m_t, sh_t_new, alpha_t = _grow(m_t, xt)
        es = tl.exp(xs - sh_s_new)
        et = tl.exp(xt - sh_t_new)
        drift = (sh_t_new - sh_t) - (sh_s_new - sh_s)
        # A weight of 0 (a -inf logit, a masked lane) adds nothing, even against an infinite
        # log ratio; so does everything summed before a factor that underflowed to 0.
        if KIND == 0:
            acc = tl.where(alpha_t == 0, 0.0, alpha_t * (acc - drift * z_t))
            acc += tl.where(et == 0, 0.0, et * ((xt - sh_t_new) - (xs - sh_s_new)))
        elif KIND == 1:
            acc = tl.where(alpha_s == 0, 0.0, alpha_s * (acc + drift * z_s))
            acc += tl.where(es == 0, 0.0, es * ((xs - sh_s_new) - (xt - sh_t_new)))
        z_s = z_s * alpha_s + es
        z_t = z_t * alpha_t + et
        sh_s = sh_s_new
        sh_t = sh_t_new
    sum_s = tl.sum(z_s, axis=0)
    sum_t = tl.sum(z_t, axis=0)
    lz_s = tl.log(sum_s)
    lz_t = tl.log(sum_t)

    if KIND == 0:
        loss = tl.sum(acc, axis=0) / sum_t - lz_t + lz_s
        k = loss
    elif KIND == 1:
        loss = tl.sum(acc, axis=0) / sum_s - lz_s + lz_t
        k = loss
    else:
        acc_a = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            idx = start + offs
            lq, lp = _log_probs(s_row, t_row, idx, cols, inv_t, sh_s, lz_s, sh_t, lz_t)
            p = tl.exp(lp)
            q = tl.exp(lq)
            lm = _log_mixture(lp, lq, log_beta, log_1mbeta)
            acc_a += tl.where(p == 0, 0.0, p * (lp - lm))
            acc_b += tl.where(q == 0, 0.0, q * (lq - lm))
        k = tl.sum(acc_b, axis=0)
        loss = beta * tl.sum(acc_a, axis=0) + (1.0 - beta) * k
    loss = tl.where(cols > 0, loss, 0.0)
    tl.store(loss_ptr + row, loss * loss_scale)

    if HAS_GRAD:
        scale = grad_scale
        if HAS_FACTOR:  # the reduction's 1 / rows kept, counted on the device
            scale = grad_scale * tl.load(factor_ptr)
        for start in range(0, cols, BLOCK):
            idx = start + offs
            lq, lp = _log_probs(s_row, t_row, idx, cols, inv_t, sh_s, lz_s, sh_t, lz_t)
            q = tl.exp(lq)
            if KIND == 0:
                g = q - tl.exp(lp)
            elif KIND == 1:
                g = tl.where(q == 0, 0.0, q * (lq - lp - k))
            else:
                lm = _log_mixture(lp, lq, log_beta, log_1mbeta)
                g = (1.0 - beta) * tl.where(q == 0, 0.0, q * (lq - lm - k))
            tl.store(g_row + idx, (g * scale).to(grad_ptr.dtype.element_ty), mask=idx < cols)
        for start in range(cols, n_cols, BLOCK):
            idx = start + offs
            tl.store(g_row + idx, tl.zeros((BLOCK,), dtype=grad_ptr.dtype.element_ty),
                     mask=idx < n_cols)


# The interpreter (CPU tensors, tests) gets kernels that are not JIT functions.
INTERPRETED = not isinstance(_divergence, triton.runtime.JITFunction)

CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps, num_stages=stages)
           for block, warps, stages in ((1024, 4, 2), (2048, 4, 3), (2048, 8, 2), (4096, 8, 2),
                                        (4096, 8, 3), (4096, 16, 2), (8192, 16, 2),
                                        (8192, 16, 3))]


def _prune(configs, named_args, **kwargs):
    """Blocks no wider than the row (at least 1024); under the interpreter one configuration,
    which also keeps rows of a few thousand columns running over several blocks in tests."""
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK"])
    if INTERPRETED:
        return [smallest]
    widest = max(1024, triton.next_power_of_2(named_args["n_cols"]))
    return [c for c in configs if c.kwargs["BLOCK"] <= widest] or [smallest]


divergence_kernel = triton.autotune(CONFIGS, key=["n_cols", "KIND", "HAS_GRAD"],
                                    prune_configs_by={"early_config_prune": _prune})(_divergence)


@triton.jit
def scale_kernel(grad_ptr, grad_stride, up_ptr, up_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(up_ptr + row * up_stride)
    if m != 1.0:
        g_row = grad_ptr + row * grad_stride
        offs = tl.arange(0, BLOCK)
        for start in range(0, n_cols, BLOCK):
            idx = start + offs
            g = tl.load(g_row + idx, mask=idx < n_cols, other=0.0).to(tl.float32)
            tl.store(g_row + idx, (g * m).to(grad_ptr.dtype.element_ty), mask=idx < n_cols)


def launch(student, teacher, mask, grad, row_loss, factor, *, kind, beta, inv_temperature,
           loss_scale, grad_scale, teacher_is_logprobs):
    """Runs the kernel on [N, V] tensors whose last dimension is contiguous.

    ``factor``: None, or a 1-element fp32 tensor on the device that multiplies the gradient
    besides ``grad_scale`` (the reduction's factor when counting kept rows would need a sync).
    """
    n_rows, n_cols = student.shape
    has_grad = grad is not None
    # log(beta) is only read for JSD; any finite value serves the other kinds.
    log_beta = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log_1mbeta = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    with device_context(student):
        divergence_kernel[(n_rows,)](
            student, student.stride(0), teacher, teacher.stride(0),
            mask.view(torch.uint8) if mask is not None else row_loss,
            grad if has_grad else student, grad.stride(0) if has_grad else 0,
            row_loss, factor if factor is not None else row_loss, n_cols,
            beta, inv_temperature, loss_scale, grad_scale, log_beta, log_1mbeta,
            KIND=kind, HAS_MASK=mask is not None, HAS_GRAD=has_grad,
            HAS_FACTOR=factor is not None,
            TEACHER_LOGP=bool(teacher_is_logprobs) and inv_temperature == 1.0,
        )


def scale(grad, upstream):
    """``grad [N, V] *= upstream`` in place, in fp32, rounded once; ``upstream``: fp32 on the
    gradient's device, ``[N]`` (one factor per row) or ``[1]`` (one for all)."""
    n_rows, n_cols = grad.shape
    block = min(4096, triton.next_power_of_2(n_cols))
    with device_context(grad):
        scale_kernel[(n_rows,)](grad, grad.stride(0), upstream,
                                0 if upstream.numel() == 1 else upstream.stride(0), n_cols,
                                BLOCK=block, num_warps=8 if block >= 2048 else 4)
