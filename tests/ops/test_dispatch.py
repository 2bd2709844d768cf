"""Backend choice: by device and dtype, forced by argument or PROMPTBAKE_BACKEND, and the fallbacks."""

import importlib
import logging
import sys

import pytest
import torch

import promptbake
from promptbake.ops import _dispatch

# promptbake.ops.divergence is the function; the module of the same name holds the backends.
divergence_module = sys.modules["promptbake.ops.divergence"]

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("PROMPTBAKE_BACKEND", raising=False)
    monkeypatch.delenv("PROMPTBAKE_CPU_ISA", raising=False)
    yield
    _dispatch.compiled.cache_clear()


def spy(monkeypatch):
    calls = []
    for name, fn in list(divergence_module._BACKENDS.items()):
        def record(*args, _name=name, _fn=fn):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setitem(divergence_module._BACKENDS, name, record)
    return calls


def test_reports_every_backend_with_a_reason():
    found = promptbake.backends()
    assert list(found) == ["cpp", "triton", "torch"]
    for info in found.values():
        assert info.detail
    assert found["torch"].available


def test_default_is_chosen_by_device_and_dtype():
    assert _dispatch.select(CPU, torch.float32) == "cpp"
    assert _dispatch.select(CPU, torch.bfloat16) == "cpp"
    assert _dispatch.select(CPU, torch.float64) == "torch"
    assert _dispatch.select(torch.device("meta"), torch.float32) == "torch"


def test_environment_variable_forces_a_backend(monkeypatch):
    calls = spy(monkeypatch)
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    promptbake.divergence(s, t)
    monkeypatch.setenv("PROMPTBAKE_BACKEND", "torch")
    promptbake.divergence(s, t)
    promptbake.divergence(s, t, backend="cpp")  # the argument wins over the environment
    assert calls == ["cpp", "torch", "cpp"]


def test_unknown_or_unusable_backend_is_refused(monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_BACKEND", "numpy")
    with pytest.raises(ValueError, match="PROMPTBAKE_BACKEND='numpy'"):
        _dispatch.select(CPU, torch.float32)
    monkeypatch.delenv("PROMPTBAKE_BACKEND")
    with pytest.raises(ValueError, match="cannot run on meta tensors"):
        _dispatch.select(torch.device("meta"), torch.float32, "cpp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    info = promptbake.backends()["triton"]
    assert not info.available
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.select(CPU, torch.float32, "triton")


def test_without_the_compiled_module_the_torch_path_runs(monkeypatch, caplog):
    real_import = importlib.import_module

    def no_extension(name, *args):
        if name == "promptbake._C":
            raise ImportError("No module named 'promptbake._C'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_extension)
    _dispatch.compiled.cache_clear()
    calls = spy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="promptbake"):
        loss = promptbake.divergence(torch.randn(2, 8), torch.randn(2, 8))
        promptbake.divergence(torch.randn(2, 8), torch.randn(2, 8))
    assert torch.isfinite(loss) and calls == ["torch", "torch"]
    notices = [r for r in caplog.records if "compiled kernels unavailable" in r.getMessage()]
    assert len(notices) == 1  # one line, once
    info = promptbake.backends()["cpp"]
    assert not info.available and "not built" in info.detail
    with pytest.raises(RuntimeError, match="unavailable"):
        _dispatch.select(CPU, torch.float32, "cpp")


def test_cuda_without_triton_falls_back_to_torch_with_one_notice(monkeypatch, caplog):
    found = promptbake.backends()
    found["triton"] = _dispatch.Backend("triton", False, "triton is not installed")
    monkeypatch.setattr(_dispatch, "backends", lambda: found)
    _dispatch._torch_on_cuda.cache_clear()
    cuda = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="promptbake"):
        assert _dispatch.select(cuda, torch.float16) == "torch"
        assert _dispatch.select(cuda, torch.float32) == "torch"
    notices = [r.getMessage() for r in caplog.records if "torch backend" in r.getMessage()]
    assert len(notices) == 1 and "triton is not installed" in notices[0]
    _dispatch._torch_on_cuda.cache_clear()
