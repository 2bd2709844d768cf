"""Output buffers for the cpp backend, recycled through the compiled module's buffer pool.

A fresh N x V gradient costs as much to fault in as the divergence costs to compute; pooled
buffers are mapped once (on huge pages) and reused once the tensor that held them is freed.
"""

from __future__ import annotations

import math

import torch

from promptbake.ops import _dispatch

POOL_MIN_BYTES = 8 << 20  # smaller buffers come from the ordinary allocator


def cpu_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised CPU tensor; large ones come from the pool (the caller writes every element)."""
    c = _dispatch.compiled()
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if c is not None and nbytes >= POOL_MIN_BYTES:
        capsule = c.pooled_empty(nbytes, torch.get_num_threads())
        if capsule is not None:
            return torch.from_dlpack(capsule)[:nbytes].view(dtype).view(shape)
    return torch.empty(shape, dtype=dtype)


def empty_cache() -> int:
    """Unmaps the pool's free buffers (promptbake keeps a couple for reuse); returns bytes freed."""
    c = _dispatch.compiled()
    return c.pool_trim() if c is not None else 0
