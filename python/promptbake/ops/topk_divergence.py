"""Divergence against a teacher known by its top-k log-probabilities only.

A cached teacher row keeps its k most likely tokens; the rest of its mass is one tail bucket. The
loss is the divergence between the (k + 1)-bucket coarsenings of teacher and student: exact on the
top-k tokens, and on the total mass elsewhere. It is a lower bound of the full-vocabulary
divergence (data processing) that becomes it as the tail mass vanishes; inside the tail the
student keeps its own shape, since the teacher's is unknown.

With bucket b(j) of token j, student bucket mass Q_b and g_b = dL/dQ_b, the gradient with respect
to the student logits is q_j (g_b(j) - sum_b Q_b g_b). Implemented with torch (any device): the
full-vocabulary work is one log-sum-exp and one scaled exp per row. A tail mass under 1e-5 is
rounding noise (k near V) and counts as an empty bucket.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from promptbake.ops.divergence import KINDS, REDUCTIONS, reduce_factor, scale_saved_gradient


def topk_divergence(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                    kind: str = "forward_kl", beta: float = 0.5, mask: Tensor | None = None,
                    reduction: str = "batchmean") -> Tensor:
    """Bucketed divergence between student logits ``[N, V]`` and a top-k teacher.

    Args:
        teacher_ids: ``[N, k]`` int64 token ids of the teacher's top-k (distinct per row).
        teacher_logprobs: ``[N, k]`` their log-probabilities (normalised over the full vocabulary).
        kind, beta, mask, reduction: as for ``promptbake.ops.divergence`` (temperature 1).
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() != 2 \
            or teacher_ids.shape[0] != n:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must both be [N={n}, k]")
    if teacher_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_ids has dtype {teacher_ids.dtype}: expected int64")
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= vocab):
        raise ValueError(f"teacher_ids must lie in [0, {vocab}): the teacher and student "
                         f"vocabularies differ")
    if kind not in KINDS:
        raise ValueError(f"unknown kind={kind!r}: choose one of {', '.join(KINDS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction={reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1]")
    if mask is not None and (mask.shape != (n,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape ({n},), got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    code = KINDS[kind]
    if code == KINDS["jsd"] and beta in (0.0, 1.0):
        code = KINDS["forward_kl"] if beta == 0.0 else KINDS["reverse_kl"]
    factor = reduce_factor(mask, n, vocab, reduction)
    return _TopK.apply(student_logits, teacher_ids.long(), teacher_logprobs.detach(), mask, code,
                       float(beta), reduction, factor)


TAIL_FLOOR = 1e-5


def _log_tail(top: Tensor) -> Tensor:
    """log of the mass outside the top-k ([N, 1]); below TAIL_FLOOR it is the fp32 rounding of
    log-probabilities that sum to one, and counts as an empty bucket."""
    tail = 1.0 - top.exp().sum(-1, keepdim=True)
    return torch.where(tail < TAIL_FLOOR, float("-inf"), torch.log(tail.clamp(min=TAIL_FLOOR)))


def _buckets(lq: Tensor, lp: Tensor, kind: int, beta: float):
    """Per-row loss and per-bucket gradient coefficient g_b - sum_b Q_b g_b ([N, k + 1])."""
    q, p = lq.exp(), lp.exp()
    if kind == KINDS["forward_kl"]:
        row = torch.where(p == 0, 0.0, p * (lp - lq)).sum(-1)
        coef = 1.0 - p / q
    elif kind == KINDS["reverse_kl"]:
        row = torch.where(q == 0, 0.0, q * (lq - lp)).sum(-1)
        coef = lq - lp - row[:, None]
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        kl_qm = torch.where(q == 0, 0.0, q * (lq - lm)).sum(-1)
        row = beta * torch.where(p == 0, 0.0, p * (lp - lm)).sum(-1) + (1 - beta) * kl_qm
        coef = (1 - beta) * (lq - lm - kl_qm[:, None])
    # A bucket with no student mass has no gradient (and would give 0 * inf).
    return row, torch.where(q == 0, 0.0, coef)


def rows(student: Tensor, ids: Tensor, logprobs: Tensor, mask: Tensor | None, kind: int,
         beta: float, *, need_grad: bool = True,
         scale: float | Tensor = 1.0) -> tuple[Tensor, Tensor | None]:
    """(per-row loss ``[N]`` fp64, gradient w.r.t. ``student`` ``[N, V]`` in its dtype, times
    ``scale``, or None), no autograd; ``kind`` is a ``KINDS`` code."""
    z = student.float()
    lse = torch.logsumexp(z, dim=-1)
    # Bucket log-masses in float64: the tails are 1 - (sum of top-k), which fp32 would lose.
    lqk = (z.gather(-1, ids) - lse[:, None]).double()
    lpk = logprobs.double()
    lq = torch.cat([lqk, _log_tail(lqk)], dim=-1)
    lp = torch.cat([lpk, _log_tail(lpk)], dim=-1)
    row, coef = _buckets(lq, lp, kind, beta)
    if mask is not None:
        row = torch.where(mask, row, 0.0)
    if not need_grad:
        return row, None
    if mask is not None:
        coef = coef * mask.double()[:, None]
    coef = (coef * scale).float()
    # q_j times its bucket's coefficient: the tail's everywhere, then the top-k's.
    grad = (z - lse[:, None]).exp_().mul_(coef[:, -1:])
    grad.scatter_(-1, ids, (lqk.exp() * coef[:, :-1]).float())
    return row, grad.to(student.dtype)


class _TopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, ids, logprobs, mask, kind, beta, reduction, factor):
        # As in divergence: fp16 keeps the reduction's factor out of the saved gradient.
        deferred = student.dtype == torch.float16 and not (isinstance(factor, float)
                                                           and factor == 1.0)
        row, grad = rows(student, ids, logprobs, mask, kind, beta,
                         need_grad=ctx.needs_input_grad[0], scale=1.0 if deferred else factor)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.deferred = factor if deferred else None
        out_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        if reduction == "none":
            return row.to(out_dtype)
        return (row.sum() * factor).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        grad = scale_saved_gradient(grad, grad_out, ctx.deferred, "torch")
        return grad, None, None, None, None, None, None, None
