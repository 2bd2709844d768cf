"""Fused softmax divergences between student and teacher logits (the baking loss, Eq. 3).

``divergence`` turns two ``[..., V]`` logit tensors into a loss in one pass per row: both
log-sum-exps, the divergence, and the gradient with respect to the student logits, which is
written during the forward and only scaled, in place, in backward. No other ``N x V`` buffer is
made. On GPUs nothing waits for the device (no host sync, unless ``check_nan=True``), so a step
can be captured in a CUDA graph.

Kinds, with p = softmax(teacher / T) and q = softmax(student / T):

* ``forward_kl``: KL(p || q), the paper's objective (teacher first).
* ``reverse_kl``: KL(q || p).
* ``jsd``: generalised JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m) with
  m = beta p + (1 - beta) q, as in GKD, TRL and Liger-Kernel. beta = 0 is defined as forward KL
  and beta = 1 as reverse KL (as those libraries do; the bare formula tends to 0 at both ends).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from promptbake.ops import _buffers, _dispatch

KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS = ("batchmean", "sum", "mean", "none")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A divergence's options as the backends take them (built by ``spec_of``)."""

    kind: int
    beta: float
    inv_temperature: float
    loss_scale: float  # on every row's loss: T^2 when scale_by_t2
    grad_scale: float  # on the gradient: loss_scale / T (the reduction's factor comes apart)
    reduction: str
    teacher_is_logprobs: bool


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
    teacher_is_logprobs: bool = False,
    check_nan: bool | None = None,
    backend: str | None = None,
) -> Tensor:
    """Divergence between next-token distributions, from raw logits.

    Args:
        student_logits: ``[..., V]`` fp32, bf16, fp16 or float64; the gradient flows here.
        teacher_logits: ``[..., V]``, same shape; a constant target (no gradient flows to it).
        kind: ``forward_kl`` (teacher || student), ``reverse_kl`` or ``jsd``.
        beta: JSD mixture weight in [0, 1]; ignored by the KLs.
        temperature: both sides are divided by it before the softmax.
        scale_by_t2: multiply loss and gradient by T^2 (Hinton et al.), keeping gradient
            magnitudes comparable across temperatures.
        mask: bool ``[...]`` (the logits' shape without V); False rows (prompt, padding) add
            nothing, cost no exp, and get a zero gradient.
        reduction: ``batchmean`` sums over rows and divides by the number of rows kept, i.e. the
            per-token mean (``F.kl_div(..., "batchmean")`` on a 3-D input divides by the batch
            size instead); ``sum``; ``mean`` divides by rows kept times V as ``F.kl_div`` does;
            ``none`` returns one value per row, shaped like ``mask``.
        teacher_is_logprobs: the teacher holds log-probabilities (log_softmax already applied).
            The result is the same; at T = 1 the kernel skips the teacher's max pass.
        check_nan: raise ``ValueError`` naming the row if a kept row has NaN or +inf logits or
            no finite logit (the check costs one look at the ``N`` row losses). Default: on for
            CPU tensors, off on GPUs, where that look would wait for the GPU every step (and
            forbid CUDA-graph capture); a bad row then gives a NaN loss.
        backend: ``cpp``, ``triton`` or ``torch`` to force one; default by device, or the
            ``PROMPTBAKE_BACKEND`` environment variable.

    Returns:
        A scalar (or per-row tensor for ``none``) in fp32, or float64 for float64 inputs.
        An infinite value is a true infinity: the teacher puts mass where the student has a
        ``-inf`` logit (forward KL), or the reverse.

    For fp16 students the saved gradient leaves out the reduction's factor (1 / rows kept): at
    N = 16,384 rows it would push most entries below fp16's smallest subnormal before a loss
    scaler's factor could lift them; backward applies factor x upstream gradient in fp32 and
    rounds once.
    """
    spec, rows_shape = _validate(student_logits, teacher_logits, kind, beta, temperature,
                                 scale_by_t2, mask, reduction, teacher_is_logprobs)
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) \
        else student_logits.dtype
    name = _dispatch.select(student_logits.device, dtype, backend)
    flat_mask = None if mask is None else mask.reshape(-1).to(torch.bool).contiguous()
    factor = reduce_factor(flat_mask, math.prod(rows_shape), student_logits.shape[-1],
                           reduction)
    if check_nan is None:
        check_nan = student_logits.device.type == "cpu"
    return _Divergence.apply(student_logits, teacher_logits.detach(), flat_mask, factor, spec,
                             name, rows_shape, check_nan)


def _counts_on_host(device: torch.device) -> bool:
    """Whether counting rows on ``device`` costs nothing to read back (CPU) or a host sync."""
    return device.type == "cpu"


def reduce_factor(mask: Tensor | None, rows: int, vocab: int, reduction: str) -> float | Tensor:
    """1 / rows kept (batchmean), 1 / (rows kept x V) (mean), else 1. With a mask off the CPU,
    a 0-dim float64 tensor on its device: the count is never read back to the host."""
    if reduction not in ("batchmean", "mean"):
        return 1.0
    per_row = 1.0 if reduction == "batchmean" else 1.0 / vocab
    if mask is None:
        return per_row / max(rows, 1)
    kept = mask.count_nonzero()
    if _counts_on_host(mask.device):
        return per_row / max(int(kept), 1)
    return per_row / kept.clamp(min=1).to(torch.float64)


def _validate(s, t, kind, beta, temperature, scale_by_t2, mask, reduction, teacher_is_logprobs):
    for arg, x in (("student_logits", s), ("teacher_logits", t)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise ValueError(f"{arg} has dtype {x.dtype}: logits must be float32, bfloat16, "
                             f"float16 or float64")
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(f"{arg} has shape {tuple(x.shape)}: expected [..., V] with V >= 1")
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"vocabulary mismatch: student_logits has V={s.shape[-1]} but "
                         f"teacher_logits has V={t.shape[-1]}; both must score the same tokens")
    if s.shape != t.shape:
        raise ValueError(f"shape mismatch: student_logits {tuple(s.shape)} vs teacher_logits "
                         f"{tuple(t.shape)}")
    if s.device != t.device:
        raise ValueError(f"student_logits on {s.device} but teacher_logits on {t.device}")
    rows_shape = s.shape[:-1]
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.shape != rows_shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the logits have rows "
                             f"{tuple(rows_shape)}: the mask drops the vocabulary dimension")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"mask has dtype {mask.dtype}: use a bool tensor (True keeps a row)")
        if mask.device != s.device:
            raise ValueError(f"mask on {mask.device} but logits on {s.device}")

    return spec_of(kind, beta, temperature, scale_by_t2, reduction, teacher_is_logprobs), rows_shape


def spec_of(kind: str, beta: float, temperature: float, scale_by_t2: bool, reduction: str,
            teacher_is_logprobs: bool) -> Spec:
    """The checked options of a divergence, as the backends take them (``rows``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind={kind!r}: choose one of {', '.join(KINDS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction={reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta={beta!r} must be in [0, 1] (JSD mixture weight of the teacher)")
    code = KINDS[kind]
    if code == KINDS["jsd"] and beta in (0.0, 1.0):
        code = KINDS["forward_kl"] if beta == 0.0 else KINDS["reverse_kl"]
    t2 = float(temperature) ** 2 if scale_by_t2 else 1.0
    return Spec(kind=code, beta=float(beta), inv_temperature=1.0 / float(temperature),
                loss_scale=t2, grad_scale=t2 / float(temperature), reduction=reduction,
                teacher_is_logprobs=bool(teacher_is_logprobs))


class _Divergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, mask, factor, spec, backend, rows_shape, check_nan):
        vocab = student.shape[-1]
        s = _rows(student, vocab)
        t = _rows(teacher, vocab)
        need_grad = ctx.needs_input_grad[0]
        # fp16 keeps the reduction's factor out of the saved gradient (it would underflow);
        # fp32 and bf16 have fp32's exponent range, and fold it in so that a plain
        # loss.backward() has nothing left to do.
        deferred = s.dtype == torch.float16 and not (isinstance(factor, float) and factor == 1.0)
        row_loss, grad = rows(s, t, mask, spec, backend, need_grad=need_grad,
                              factor=None if deferred else factor)
        if check_nan:
            _check_rows(row_loss, mask, s, t, rows_shape)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.student_shape = student.shape
        ctx.backend = backend
        ctx.deferred = factor if deferred else None
        if spec.reduction == "none":
            return row_loss.view(rows_shape)
        out_dtype = torch.float64 if row_loss.dtype == torch.float64 else torch.float32
        return (row_loss.sum(dtype=torch.float64) * factor).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        grad = scale_saved_gradient(grad, grad_out, ctx.deferred, ctx.backend)
        return grad.view(ctx.student_shape), None, None, None, None, None, None, None


def scale_saved_gradient(grad: Tensor, grad_out: Tensor, deferred: float | Tensor | None,
                         backend: str) -> Tensor:
    """The saved ``[N, V]`` gradient times the upstream gradient (``[]``, or ``[N]`` for
    reduction ``none``) and the factor forward left out, in fp32, rounded once, in place.

    Nothing waits for the GPU: the factor is read on the device, and the triton backend skips a
    row whose factor is exactly 1 there. On the CPU a factor of 1 returns the gradient as is.
    A graph kept for another backward (``retain_graph=True``) gets a scaled copy instead.
    """
    acc = torch.promote_types(grad.dtype, torch.float32)
    upstream = grad_out.reshape(-1).to(acc)
    if deferred is not None:
        upstream = upstream * deferred
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)
    on_host = upstream.device.type == "cpu"
    if on_host and backend != "triton" and bool((upstream == 1).all()):
        return grad
    if keep_graph():
        grad = grad.clone()
    if backend == "triton":  # CUDA, or the interpreter's CPU tensors
        _dispatch.triton_kernels("divergence").scale(grad, upstream.float().contiguous())
    elif not on_host:  # one elementwise kernel: the factor is cast on the fly, no temporary
        grad.mul_(upstream.view(-1, 1))
    elif upstream.numel() == 1:
        grad.mul_(float(upstream))  # fp32 arithmetic on bf16 / fp16, no temporary
    else:  # CPU casts into full-size temporaries: one block of rows at a time
        step = max(1, (1 << 22) // max(grad.shape[1], 1))
        for start in range(0, grad.shape[0], step):
            block = grad[start:start + step]
            block.copy_(block.to(acc) * upstream[start:start + step, None])
    return grad


def _rows(x: Tensor, vocab: int) -> Tensor:
    """``[N, V]`` view (or copy) with a contiguous last dimension."""
    x = x.reshape(-1, vocab)
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_rows(row_loss, mask, s, t, rows_shape):
    bad = torch.isnan(row_loss)
    if mask is not None:
        bad &= mask
    if not bool(bad.any()):
        return
    r = int(bad.nonzero()[0, 0])
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(r), rows_shape)) \
        if len(rows_shape) else ()
    for arg, x in (("student_logits", s[r]), ("teacher_logits", t[r])):
        if torch.isnan(x).any():
            problem = "contains NaN"
        elif torch.isposinf(x).any():
            problem = "contains +inf"
        elif not torch.isfinite(x).any():
            problem = "has no finite logit (every entry is -inf)"
        else:
            continue
        raise ValueError(f"{arg}{list(where)} {problem}: fix the model output, or mask the row "
                         f"out (mask=...); pass check_nan=False to get NaN instead of this error")
    raise ValueError(f"the divergence of row {list(where)} is NaN although its logits look "
                     f"valid; please report this with the inputs")


def rows(s: Tensor, t: Tensor, mask: Tensor | None, spec: Spec, backend: str, *,
         need_grad: bool = True, factor: float | Tensor | None = None,
         grad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(per-row loss ``[N]`` fp32, gradient w.r.t. ``s`` ``[N, V]`` or None), no autograd.

    ``s``, ``t``: ``[N, V]`` with a contiguous last dimension; ``mask``: ``[N]`` bool or None.
    The gradient is multiplied by ``spec.grad_scale`` and, unless None, ``factor`` (a float, or a
    0-dim tensor on the device); it is written into ``grad`` (contiguous, ``s``'s dtype) when
    given, so a caller looping over blocks of rows can reuse one buffer.
    """
    if grad is not None and (grad.shape != s.shape or grad.dtype != s.dtype
                             or not grad.is_contiguous()):
        raise ValueError(f"grad buffer {grad.dtype} {tuple(grad.shape)} must be contiguous and "
                         f"match the student {s.dtype} {tuple(s.shape)}")
    return _BACKENDS[backend](s, t, mask, spec, need_grad, factor, grad)


# Backends: (s [N, V], t [N, V], mask [N] bool | None, spec, need_grad, factor, grad buffer or
# None) -> (row_loss [N], grad); see ``rows``.


def _cpp(s, t, mask, spec, need_grad, factor, out=None):
    c = _dispatch.compiled()
    grad_scale = spec.grad_scale * (1.0 if factor is None else float(factor))
    n, vocab = s.shape
    row_loss = torch.empty(n, dtype=torch.float32)
    grad = None if not need_grad else out if out is not None else \
        _buffers.cpu_empty((n, vocab), s.dtype)
    if n:
        c.divergence(
            s.data_ptr(), _DTYPE_CODES[s.dtype], s.stride(0),
            t.data_ptr(), _DTYPE_CODES[t.dtype], t.stride(0),
            mask.data_ptr() if mask is not None else 0,
            grad.data_ptr() if grad is not None else 0, vocab,
            row_loss.data_ptr(), n, vocab, spec.kind, spec.beta, spec.inv_temperature,
            spec.loss_scale, grad_scale, spec.teacher_is_logprobs,
            torch.get_num_threads(), _dispatch.cpu_isa())
    return row_loss, grad


def _triton(s, t, mask, spec, need_grad, factor, out=None):
    n, vocab = s.shape
    row_loss = torch.empty(n, dtype=torch.float32, device=s.device)
    grad = None if not need_grad else out if out is not None else \
        torch.empty((n, vocab), dtype=s.dtype, device=s.device)
    grad_scale, on_device = spec.grad_scale, None
    if isinstance(factor, Tensor):
        on_device = factor.to(torch.float32).reshape(1)
    elif factor is not None:
        grad_scale *= factor
    if n:
        _dispatch.triton_kernels("divergence").launch(
            s, t, mask, grad, row_loss, on_device, kind=spec.kind, beta=spec.beta,
            inv_temperature=spec.inv_temperature, loss_scale=spec.loss_scale,
            grad_scale=grad_scale, teacher_is_logprobs=spec.teacher_is_logprobs)
    return row_loss, grad


def _torch(s, t, mask, spec, need_grad, factor, out=None):
    """Reference: the same closed forms in plain torch, a block of rows at a time."""
    n, vocab = s.shape
    acc = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
    row_loss = torch.zeros(n, dtype=acc, device=s.device)
    grad = None if not need_grad else out if out is not None else \
        torch.zeros((n, vocab), dtype=s.dtype, device=s.device)
    grad_scale = spec.grad_scale if factor is None else spec.grad_scale * factor
    step = max(1, (1 << 22) // vocab)
    for start in range(0, n, step):
        block = slice(start, start + step)
        lq = torch.log_softmax(s[block].to(acc) * spec.inv_temperature, dim=-1)
        lp = torch.log_softmax(t[block].to(acc) * spec.inv_temperature, dim=-1)
        row, g = _closed_form(lq, lp, spec.kind, spec.beta, need_grad)
        if mask is not None:
            keep = mask[block]
            row = torch.where(keep, row, 0.0)
            g = torch.where(keep[:, None], g, 0.0) if g is not None else None
        row_loss[block] = row * spec.loss_scale
        if g is not None:
            grad[block] = (g * grad_scale).to(s.dtype)
    return row_loss, grad


def _closed_form(lq, lp, kind, beta, need_grad):
    """Per-row divergence and its gradient w.r.t. the student's scaled logits z = s / T.

    A zero probability contributes 0 (0 log 0 = 0); the test is ``== 0`` so NaN propagates.
    """
    q, p = lq.exp(), lp.exp()
    g = None
    if kind == KINDS["forward_kl"]:
        row = torch.where(p == 0, 0.0, p * (lp - lq)).sum(-1)
        if need_grad:
            g = q - p
    elif kind == KINDS["reverse_kl"]:
        row = torch.where(q == 0, 0.0, q * (lq - lp)).sum(-1)
        if need_grad:
            g = torch.where(q == 0, 0.0, q * (lq - lp - row[:, None]))
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        kl_pm = torch.where(p == 0, 0.0, p * (lp - lm)).sum(-1)
        kl_qm = torch.where(q == 0, 0.0, q * (lq - lm)).sum(-1)
        row = beta * kl_pm + (1.0 - beta) * kl_qm
        if need_grad:
            g = (1.0 - beta) * torch.where(q == 0, 0.0, q * (lq - lm - kl_qm[:, None]))
    return row, g


_BACKENDS = {"cpp": _cpp, "triton": _triton, "torch": _torch}
