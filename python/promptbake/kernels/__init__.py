"""Triton kernels, installed as promptbake.kernels.

Import these modules only through promptbake.ops: Triton reads TRITON_INTERPRET when a kernel
is defined, so the dispatcher decides when the import happens.
"""

from __future__ import annotations

import contextlib

import torch


def device_context(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context a launch on ``tensor`` runs in: its GPU made current (Triton launches on the
    current device, which with a model spread over GPUs need not be the tensor's), or nothing for
    CPU tensors (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
