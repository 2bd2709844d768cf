"""The one place that decides which backend runs an op.

Backends: ``cpp`` (compiled module ``promptbake._C``, CPU tensors), ``triton`` (CUDA tensors; CPU
tensors under ``TRITON_INTERPRET=1``, for tests), ``torch`` (reference, any device). The default
is chosen by the tensors' device; ``PROMPTBAKE_BACKEND`` or a ``backend=`` argument forces one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

log = logging.getLogger("promptbake")

NAMES = ("cpp", "triton", "torch")
ENV_VAR = "PROMPTBAKE_BACKEND"
ISA_ENV_VAR = "PROMPTBAKE_CPU_ISA"


@dataclasses.dataclass(frozen=True)
class Backend:
    """Whether a backend can run here; ``detail`` says how, or why not."""

    name: str
    available: bool
    detail: str


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def compiled() -> ModuleType | None:
    """The compiled module, or None (with one logged notice) if the install has none."""
    try:
        return importlib.import_module("promptbake._C")
    except ImportError as err:
        log.warning("promptbake: compiled kernels unavailable (%s); using the torch backend", err)
        return None


@functools.cache
def triton_kernels(name: str) -> ModuleType:
    """``promptbake.kernels.<name>``, imported on first use (Triton reads TRITON_INTERPRET then)."""
    return importlib.import_module(f"promptbake.kernels.{name}")


def cpu_isa() -> str:
    """Instruction set for the cpp backend: ``PROMPTBAKE_CPU_ISA`` if set, else the best one."""
    forced = os.environ.get(ISA_ENV_VAR, "")
    supported = compiled().isas()
    if forced and forced not in supported:
        raise ValueError(f"{ISA_ENV_VAR}={forced!r} is not supported on this CPU: choose one of "
                         f"{', '.join(supported)}, or unset it")
    return forced


def backends() -> dict[str, Backend]:
    """Every backend, whether it is available, and why or why not."""
    found = {}
    c = compiled()
    if c is None:
        found["cpp"] = Backend("cpp", False, "promptbake._C is not built: reinstall with a C++17 "
                               "compiler and CMake (pip install -v . shows the build log)")
    else:
        threads = torch.get_num_threads()
        isa = os.environ.get(ISA_ENV_VAR) or c.isas()[0]
        found["cpp"] = Backend("cpp", True, f"CPU tensors; instruction sets {', '.join(c.isas())} "
                               f"(using {isa}), {threads} threads")
    if importlib.util.find_spec("triton") is None:
        found["triton"] = Backend("triton", False, "triton is not installed "
                                  "(pip install 'promptbake[gpu]')")
    elif torch.cuda.is_available():
        found["triton"] = Backend("triton", True, f"CUDA tensors on {torch.cuda.get_device_name()}")
    elif _interpreting():
        found["triton"] = Backend("triton", True, "CPU tensors through the Triton interpreter "
                                  "(TRITON_INTERPRET=1): correct but slow, for tests")
    else:
        found["triton"] = Backend("triton", False, "no CUDA device; set TRITON_INTERPRET=1 to "
                                  "run the kernels on CPU tensors (slow, for tests)")
    found["torch"] = Backend("torch", True, "reference implementation, any device")
    return found


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "cpp":
        return device.type == "cpu"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _interpreting())
    return True


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def select(device: torch.device, dtype: torch.dtype, requested: str | None = None) -> str:
    """Name of the backend to run on tensors of ``device`` and ``dtype``.

    ``requested`` (or ``PROMPTBAKE_BACKEND``) forces a backend and fails loudly if it cannot run.
    The kernels take fp32, bf16 and fp16; other float dtypes (float64) run on the torch backend.
    """
    forced = requested or os.environ.get(ENV_VAR) or None
    if forced is not None:
        source = "backend=" if requested else f"{ENV_VAR}="
        if forced not in NAMES:
            raise ValueError(f"unknown backend {source}{forced!r}: choose one of {', '.join(NAMES)}")
        info = backends()[forced]
        if not info.available:
            raise RuntimeError(f"backend {forced!r} ({source}{forced}) is unavailable: {info.detail}")
        if not _runs_on(forced, device):
            raise ValueError(f"backend {forced!r} cannot run on {device.type} tensors: "
                             f"{info.detail}; unset {ENV_VAR} or pick another backend")
        if forced != "torch" and dtype not in KERNEL_DTYPES:
            raise ValueError(f"backend {forced!r} takes float32, bfloat16 or float16 tensors, "
                             f"got {dtype}: use the 'torch' backend for {dtype}")
        return forced
    if dtype not in KERNEL_DTYPES:
        return "torch"
    if device.type == "cpu" and compiled() is not None:
        return "cpp"
    if device.type == "cuda":
        info = backends()["triton"]
        if info.available:
            return "triton"
        _torch_on_cuda(info.detail)
    return "torch"


@functools.cache
def _torch_on_cuda(reason: str) -> None:
    """One notice per reason that CUDA tensors run on the (slower) torch backend."""
    log.warning("promptbake: CUDA tensors run on the torch backend, slower than the fused "
                "kernels: the triton backend is unavailable (%s)", reason)
