"""LM head and divergence fused: the student's logits a block of rows at a time, never N x V.

``linear_divergence(hidden, weight, teacher)`` equals ``divergence(hidden @ weight.T, teacher)``
with the same options, computed block by block under a memory budget. Per block: the logits
(one GEMM through torch, so BLAS on the CPU and cuBLAS on GPUs), the divergence and its gradient
with respect to the logits (the ``divergence`` backends: C++ on the CPU, Triton on GPUs, torch
anywhere), then that gradient times the weight (the gradient with respect to the hidden states)
and, only if the weight requires grad, the block's share of the weight's gradient. Gradients
are made in forward and scaled in backward, as Liger-Kernel's fused linear cross-entropy does.
Peak extra memory: two ``[B, V]`` blocks (logits and their gradient) and the ``[N, H]`` gradient;
eager torch holds ``[N, V]`` logits, their log-softmax and gradient at once.

Teachers: a ``[..., V]`` tensor of logits or log-probabilities (a cache; it may stay in host
memory, each block is copied to the hidden states' device), ``TopK(ids, logprobs)`` (a top-k
cache, as ``topk_divergence``), or ``Hidden(hidden, weight)``: the teacher's own hidden states and
head, whose logits are made block by block like the student's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from promptbake.ops import _buffers, _dispatch
from promptbake.ops.divergence import (
    reduce_factor,
    rows as divergence_rows,
    scale_saved_gradient,
    spec_of,
)
from promptbake.ops.topk_divergence import rows as topk_rows

# Bytes for the per-block buffers. On the CPU a block of a few hundred rows keeps the GEMMs
# efficient; a GPU wants more rows per launch to fill its multiprocessors.
DEFAULT_BUDGET = {"cpu": 128 * 2**20, "cuda": 1 << 30}
# Fewer rows per block make the GEMMs slow (1.12x the unfused time at 130 rows, V = 128256,
# H = 2048, fp32 on 2 cores): the budget gives way to this floor.
MIN_ROWS = 256
_INT32 = 2**31 - 1  # elements a GPU kernel may index with 32-bit offsets
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclasses.dataclass(frozen=True)
class TopK:
    """A teacher known by its top-k: ``ids`` ``[..., k]`` int64, ``logprobs`` ``[..., k]``."""

    ids: Tensor
    logprobs: Tensor


@dataclasses.dataclass(frozen=True)
class Hidden:
    """A teacher given as hidden states ``[..., Ht]`` and its head's ``weight`` ``[V, Ht]``."""

    hidden: Tensor
    weight: Tensor


def linear_divergence(
    hidden: Tensor,
    weight: Tensor,
    teacher: Tensor | TopK | Hidden,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
    teacher_is_logprobs: bool = False,
    memory_budget: int | None = None,
    block_rows: int | None = None,
    check_nan: bool | None = None,
    backend: str | None = None,
) -> Tensor:
    """Divergence between the teacher and the student logits ``hidden @ weight.T``.

    Args:
        hidden: ``[..., H]`` the student's final hidden states (after the last norm); fp32,
            bf16, fp16 or float64. The gradient flows here.
        weight: ``[V, H]`` the LM head, same dtype as ``hidden`` (or any, under
            ``torch.autocast``: the matmuls then run in the autocast dtype, as ``F.linear``
            would). Its gradient is made only if it requires grad.
        teacher: ``[..., V]`` logits (or log-probabilities with ``teacher_is_logprobs``),
            ``TopK`` or ``Hidden``; a constant target.
        kind, beta, temperature, scale_by_t2, mask, reduction, teacher_is_logprobs, check_nan,
            backend: as for ``promptbake.ops.divergence`` (``TopK`` takes temperature 1).
        memory_budget: bytes for the per-block buffers, which sets the rows per block (at
            least ``MIN_ROWS``); default ``DEFAULT_BUDGET`` for the device (128 MiB on the
            CPU, 1 GiB on GPUs).
        block_rows: rows per block, overriding ``memory_budget``.

    Returns:
        A scalar (or ``[...]`` per-row losses for ``none``) in fp32, float64 for float64 inputs.
    """
    rows_shape, vocab = _validate(hidden, weight, teacher, mask, reduction, temperature,
                                  memory_budget, block_rows)
    spec = spec_of(kind, beta, temperature, scale_by_t2, reduction, teacher_is_logprobs)
    device = hidden.device
    compute = _compute_dtype(hidden, weight)
    name = _dispatch.select(device, compute, backend)
    n = math.prod(rows_shape)
    flat_mask = None if mask is None else mask.reshape(-1).to(torch.bool).contiguous()
    factor = reduce_factor(flat_mask, n, vocab, reduction)
    if memory_budget is None:
        memory_budget = DEFAULT_BUDGET.get(device.type, DEFAULT_BUDGET["cuda"])
    block = block_rows or rows_per_block(vocab, compute, teacher, weight.requires_grad,
                                         memory_budget, name)
    if device.type == "cuda":
        block = min(block, _INT32 // vocab)
    if check_nan is None:
        check_nan = device.type == "cpu"
    flat_teacher = _flatten(teacher, n)
    loss = _LinearDivergence.apply(hidden.reshape(n, hidden.shape[-1]), weight, flat_teacher,
                                   flat_mask, factor, spec, name, block, compute, check_nan)
    return loss.view(rows_shape) if reduction == "none" else loss


def rows_per_block(vocab: int, compute: torch.dtype, teacher, weight_grad: bool,
                   memory_budget: int, backend: str = "cpp") -> int:
    """Rows per block such that the block's buffers fit ``memory_budget`` bytes."""
    size = torch.empty((), dtype=compute).element_size()
    per_row = 2 * size  # the logits and their gradient
    if isinstance(teacher, Hidden):
        per_row += size
    if isinstance(teacher, TopK) or backend == "torch":
        per_row += 3 * 4  # fp32 working copies (log-softmaxes, exps)
    if weight_grad and compute != torch.float32:
        per_row += 4  # the gradient in fp32 for the weight's accumulation
    return max(MIN_ROWS, memory_budget // (per_row * vocab))


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _validate(hidden, weight, teacher, mask, reduction, temperature, memory_budget, block_rows):
    for arg, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise ValueError(f"{arg} has dtype {x.dtype}: expected float32, bfloat16, float16 "
                             f"or float64")
    if weight.dim() != 2 or hidden.dim() < 1:
        raise ValueError(f"weight must be [V, H] and hidden [..., H], got weight "
                         f"{tuple(weight.shape)} and hidden {tuple(hidden.shape)}")
    vocab, width = weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden size mismatch: hidden has H={hidden.shape[-1]} but weight is "
                         f"{tuple(weight.shape)} ([V, H]); pass the LM head's weight, not its "
                         f"transpose")
    if hidden.device != weight.device:
        raise ValueError(f"hidden on {hidden.device} but weight on {weight.device}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast one to "
                         f"the other, or call under torch.autocast to compute in its dtype")
    rows_shape = hidden.shape[:-1]
    if isinstance(teacher, Tensor):
        _check_rows_of("teacher", teacher, rows_shape, vocab, "V")
        if teacher.dtype not in _FLOATS:
            raise ValueError(f"teacher has dtype {teacher.dtype}: logits must be floats")
    elif isinstance(teacher, TopK):
        _check_rows_of("teacher.ids", teacher.ids, rows_shape, None, "k")
        _check_rows_of("teacher.logprobs", teacher.logprobs, rows_shape,
                       teacher.ids.shape[-1], "k")
        if teacher.ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"teacher.ids has dtype {teacher.ids.dtype}: expected int64")
        if temperature != 1.0:
            raise ValueError(f"temperature={temperature}: a top-k teacher is known at "
                             f"temperature 1 only")
        if teacher.ids.numel() and (int(teacher.ids.min()) < 0
                                    or int(teacher.ids.max()) >= vocab):
            raise ValueError(f"teacher.ids must lie in [0, {vocab}): the teacher's vocabulary "
                             f"differs from the weight's V={vocab}")
    elif isinstance(teacher, Hidden):
        if teacher.weight.dim() != 2 or teacher.weight.shape[0] != vocab:
            raise ValueError(f"vocabulary mismatch: the student's weight has V={vocab} rows but "
                             f"the teacher's weight is {tuple(teacher.weight.shape)}")
        _check_rows_of("teacher.hidden", teacher.hidden, rows_shape, teacher.weight.shape[1],
                       "Ht")
        if teacher.hidden.device != hidden.device or teacher.weight.device != hidden.device:
            raise ValueError("the teacher's hidden states and weight must be on the student's "
                             f"device {hidden.device}")
    else:
        raise ValueError(f"teacher must be a tensor of logits, TopK or Hidden, got "
                         f"{type(teacher).__name__}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != rows_shape \
                or mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(rows_shape)} (hidden's "
                             f"rows), got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        if mask.device != hidden.device:
            raise ValueError(f"mask on {mask.device} but hidden on {hidden.device}")
    if reduction == "none" and weight.requires_grad:
        raise ValueError("reduction='none' with a weight that requires grad: the weight's "
                         "gradient is summed over rows in forward, so it needs a scalar loss; "
                         "use a summing reduction or freeze the weight")
    if block_rows is not None and (not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"block_rows={block_rows!r} must be a positive integer (or None)")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 1):
        raise ValueError(f"memory_budget={memory_budget!r} must be a positive number of bytes")
    return rows_shape, vocab


def _check_rows_of(arg, x, rows_shape, last, name):
    if not isinstance(x, Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape[:-1] != rows_shape or x.dim() != len(rows_shape) + 1 or \
            (last is not None and x.shape[-1] != last):
        want = f"{last}" if last is not None else name
        raise ValueError(f"{arg} has shape {tuple(x.shape)}: expected {tuple(rows_shape)} + "
                         f"[{want}] ({name}), one row per row of hidden"
                         + (" - the vocabularies differ" if name == "V" else ""))


def _flatten(teacher, n):
    if isinstance(teacher, Tensor):
        return teacher.detach().reshape(n, teacher.shape[-1])
    if isinstance(teacher, TopK):
        return TopK(teacher.ids.reshape(n, -1).long(), teacher.logprobs.detach().reshape(n, -1))
    return Hidden(teacher.hidden.detach().reshape(n, -1), teacher.weight.detach())


class _LinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, mask, factor, spec, backend, block, compute,
                check_nan):
        # The dtype is chosen already (compute); out= matmuls and in-place sums stay in it.
        with torch.autocast(hidden.device.type, enabled=False):
            return _LinearDivergence.blocks(ctx, hidden, weight, teacher, mask, factor, spec,
                                            backend, block, compute, check_nan)

    @staticmethod
    def blocks(ctx, hidden, weight, teacher, mask, factor, spec, backend, block, compute,
               check_nan):
        n, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = need_h or need_w
        # fp16 keeps the reduction's factor out of the block gradients (it would underflow);
        # backward applies it with the upstream gradient, as divergence does.
        deferred = compute == torch.float16 and not (isinstance(factor, float) and factor == 1.0)
        scale = None if deferred else factor
        w = weight.to(compute)
        t_weight = teacher.weight.to(compute) if isinstance(teacher, Hidden) else None
        row_loss = torch.empty(n, device=device, dtype=torch.float64
                               if compute == torch.float64 else torch.float32)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(compute, torch.float32),
                             device=device) if need_w else None
        size = min(block, max(n, 1))
        logits = _empty((size, vocab), compute, device)
        grad_buf = _empty((size, vocab), compute, device) \
            if need and not isinstance(teacher, TopK) else None
        t_buf = _empty((size, vocab), compute, device) if t_weight is not None else None
        for start in range(0, n, block):
            stop = min(n, start + block)
            b = stop - start
            h = hidden[start:stop].to(compute)
            s = torch.mm(h, w.t(), out=logits[:b])
            m = None if mask is None else mask[start:stop]
            if isinstance(teacher, TopK):
                loss_b, g = topk_rows(
                    s, teacher.ids[start:stop].to(device), teacher.logprobs[start:stop].to(device),
                    m, spec.kind, spec.beta, need_grad=need,
                    scale=(1.0 if scale is None else scale) * spec.grad_scale)
                loss_b = loss_b * spec.loss_scale
            else:
                if t_weight is not None:
                    t = torch.mm(teacher.hidden[start:stop].to(compute), t_weight.t(),
                                 out=t_buf[:b])
                else:
                    t = teacher[start:stop].to(device, non_blocking=True)
                    t = t if t.stride(-1) == 1 else t.contiguous()
                loss_b, g = divergence_rows(s, t, m, spec, backend, need_grad=need,
                                               factor=scale, grad=grad_buf[:b] if need else None)
            row_loss[start:stop] = loss_b
            if check_nan:
                _check_block(loss_b, m, start, hidden, weight, teacher)
            if need_h:
                grad_h[start:stop] = torch.mm(g, w)
            if need_w:
                if compute == grad_w.dtype:
                    grad_w.addmm_(g.t(), h)
                else:  # accumulate in fp32 across blocks
                    grad_w.addmm_(g.t().to(grad_w.dtype), h.to(grad_w.dtype))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.deferred = factor if deferred else None
        ctx.backend = backend
        ctx.weight_dtype = weight.dtype
        if spec.reduction == "none":
            return row_loss
        out_dtype = torch.float64 if row_loss.dtype == torch.float64 else torch.float32
        return (row_loss.sum(dtype=torch.float64) * factor).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = scale_saved_gradient(grad_h, grad_out, ctx.deferred, ctx.backend)
        if grad_w is not None:  # the loss is a scalar here (validated)
            upstream = grad_out.reshape(()).to(grad_w.dtype)
            if ctx.deferred is not None:
                upstream = upstream * ctx.deferred
            grad_w = (grad_w * upstream).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def _empty(shape, dtype, device) -> Tensor:
    """A block buffer; on the CPU from the compiled module's pool (mapped once, on huge pages,
    reused by the next call), where a fresh buffer would cost its page faults every step."""
    return _buffers.cpu_empty(shape, dtype) if device.type == "cpu" else \
        torch.empty(shape, dtype=dtype, device=device)


def _check_block(loss_b, mask, start, hidden, weight, teacher):
    bad = torch.isnan(loss_b)
    if mask is not None:
        bad &= mask
    if not bool(bad.any()):
        return
    r = start + int(bad.nonzero()[0, 0])
    where = "hidden" if not torch.isfinite(hidden[r]).all() else \
        "weight" if not torch.isfinite(weight).all() else "teacher"
    raise ValueError(f"the divergence of row {r} is NaN ({where} holds NaN or inf there): fix "
                     f"the model output, or mask the row out (mask=...); pass check_nan=False "
                     f"to get NaN instead of this error")
