from __future__ import annotations

from torch import Tensor, nn

from promptbake.ops.divergence import divergence


class DivergenceLoss(nn.Module):
    """``promptbake.ops.divergence`` as a module; the options are fixed at construction.

    >>> loss_fn = DivergenceLoss(kind="forward_kl", temperature=1.0)
    >>> loss = loss_fn(student_logits, teacher_logits, mask=response_mask)
    """

    def __init__(self, kind: str = "forward_kl", *, beta: float = 0.5, temperature: float = 1.0,
                 scale_by_t2: bool = False, reduction: str = "batchmean",
                 teacher_is_logprobs: bool = False, check_nan: bool | None = None,
                 backend: str | None = None):
        super().__init__()
        self.options = dict(kind=kind, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2,
                            reduction=reduction, teacher_is_logprobs=teacher_is_logprobs,
                            check_nan=check_nan, backend=backend)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                mask: Tensor | None = None) -> Tensor:
        return divergence(student_logits, teacher_logits, mask=mask, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
