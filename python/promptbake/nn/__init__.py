"""``nn.Module`` wrappers around promptbake.ops."""

from promptbake.nn.divergence import DivergenceLoss

__all__ = ["DivergenceLoss"]
