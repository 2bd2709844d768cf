"""``nn.Module`` wrappers around promptbake.ops."""

from promptbake.nn.divergence import DivergenceLoss
from promptbake.nn.sparse_linear import SparseLinear, sparsify

__all__ = ["DivergenceLoss", "SparseLinear", "sparsify"]
