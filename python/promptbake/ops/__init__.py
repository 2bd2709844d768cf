"""Hot operations with cpp, triton and torch backends (see ``backends()``)."""

from promptbake.ops._buffers import empty_cache
from promptbake.ops._dispatch import Backend, backends
from promptbake.ops.divergence import KINDS, REDUCTIONS, divergence
from promptbake.ops.linear_divergence import Hidden, TopK, linear_divergence
from promptbake.ops.sparse_linear import sparse_linear

__all__ = [
           "KINDS",
           "REDUCTIONS",
           "Backend",
           "Hidden",
           "TopK",
           "backends",
           "divergence",
           "empty_cache",
           "linear_divergence",
           "sparse_linear",
]
