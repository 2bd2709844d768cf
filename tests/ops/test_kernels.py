"""The Triton kernels' GPU path, checked without a GPU: machine code for sm_80 and sm_90 (ahead
of time), 64-bit offsets (in the compiled IR, and by running past 2^31 elements under the
interpreter), the launch grid's limits, and launches under the inputs' device.

The math is checked under the interpreter by test_divergence.py and test_sparse_linear.py (on
the GPU when there is one).
"""

import contextlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from promptbake.ops import _dispatch

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def fresh_python(code: str, *args: str, interpret: bool, timeout: int = 600) -> dict:
    """Runs ``code`` with ``args`` in a new process (this one has the interpreter on, or a GPU),
    with or without TRITON_INTERPRET; returns the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from promptbake.kernels.divergence import CONFIGS, divergence_kernel, scale_kernel
from promptbake.kernels.sparse_linear import blocks, sparse_linear_kernel

target = GPUTarget("cuda", int(sys.argv[1]), 32)
# Strides typed i32, as Triton passes those that fit: the offsets must widen them anyway.
divergence = {"s_ptr": "*fp16", "s_stride": "i32", "t_ptr": "*bf16", "t_stride": "i32",
              "mask_ptr": "*u8", "grad_ptr": "*fp16", "grad_stride": "i32", "loss_ptr": "*fp32",
              "factor_ptr": "*fp32", "n_cols": "i32", "beta": "fp32", "inv_t": "fp32",
              "loss_scale": "fp32", "grad_scale": "fp32", "log_beta": "fp32",
              "log_1mbeta": "fp32", "KIND": "constexpr", "HAS_MASK": "constexpr",
              "HAS_GRAD": "constexpr", "HAS_FACTOR": "constexpr", "TEACHER_LOGP": "constexpr",
              "BLOCK": "constexpr"}
scale = {"grad_ptr": "*bf16", "grad_stride": "i32", "up_ptr": "*fp32", "up_stride": "i32",
         "n_cols": "i32", "BLOCK": "constexpr"}
sparse = {"x_ptr": "*fp16", "x_stride": "i32", "bitmap_ptr": "*i32", "words": "i32",
          "width": "i32", "values_ptr": "*fp32", "offsets_ptr": "*i64", "bias_ptr": "*fp32",
          "y_ptr": "*fp16", "y_stride": "i32", "batch": "i32", "out_features": "i32",
          "out_tiles": "i32", "HAS_BIAS": "constexpr", "BLOCK_B": "constexpr",
          "BLOCK_O": "constexpr", "BLOCK_W": "constexpr"}
widest = max(CONFIGS, key=lambda c: (c.kwargs["BLOCK"], c.num_warps, c.num_stages))
jobs = [(f"divergence kind {kind}", divergence_kernel.fn, divergence,
         {"KIND": kind, "HAS_MASK": True, "HAS_GRAD": True, "HAS_FACTOR": True,
          "TEACHER_LOGP": kind == 0, "BLOCK": widest.kwargs["BLOCK"]},
         {"num_warps": widest.num_warps, "num_stages": widest.num_stages},
         ("s_stride", "t_stride", "grad_stride")) for kind in range(3)]
jobs.append(("divergence plain", divergence_kernel.fn, divergence,  # no mask, factor, log-probs
             {"KIND": 0, "HAS_MASK": False, "HAS_GRAD": True, "HAS_FACTOR": False,
              "TEACHER_LOGP": False, "BLOCK": 4096}, {"num_warps": 8, "num_stages": 2},
             ("s_stride", "t_stride", "grad_stride")))
jobs.append(("scale", scale_kernel, scale, {"BLOCK": 4096}, {"num_warps": 8},
             ("grad_stride", "up_stride")))
for n in (1, 8):  # decode, and the largest batch tile
    block_b, block_o, block_w = blocks(n, 48)
    jobs.append((f"sparse_linear batch {n}", sparse_linear_kernel, sparse,
                 {"HAS_BIAS": True, "BLOCK_B": block_b, "BLOCK_O": block_o,
                  "BLOCK_W": block_w}, {"num_warps": 4}, ("x_stride", "y_stride")))
out = {}
for name, fn, signature, constexprs, options, strides in jobs:
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=target, options=options)
    ttir = compiled.asm["ttir"]
    out[name] = {"cubin_bytes": len(compiled.asm["cubin"]),
                 "widened": {s: f"arith.extsi %{s} : i32 to i64" in ttir for s in strides},
                 "shared": compiled.metadata.shared}
print(json.dumps(out))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpus_ahead_of_time(arch):
    # Triton's own compiler down to machine code (its bundled ptxas); no driver, no GPU. Row
    # and batch offsets multiply strides widened to int64, even when Triton passes them as i32.
    compiled = fresh_python(_COMPILE, str(arch), interpret=False)
    assert set(compiled) == {"divergence kind 0", "divergence kind 1", "divergence kind 2",
                             "divergence plain", "scale", "sparse_linear batch 1",
                             "sparse_linear batch 8"}
    for name, result in compiled.items():
        assert result["cubin_bytes"] > 0, name
        assert all(result["widened"].values()), (name, result["widened"])


_PAST_2_31 = """
import json
import torch
import torch.nn.functional as F
from promptbake import divergence
from promptbake.kernels import sparse_linear as kernel
from promptbake.ops.sparse_linear import pack, sparse_linear

# One untouched fp16 buffer of 2^31 + 2^16 entries (4 GiB of address space, not of memory):
# rows 2^30 apart, so row 2 starts at entry 2^31, past int32, with a stride that fits int32.
def peak_mb():  # this process's own high-water mark (ru_maxrss carries the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
before_mb = peak_mb()  # the imports' share
STRIDE = 2**30
big = torch.empty(2 * STRIDE + 2**16, dtype=torch.float16)
def rows(offset, width):
    view = big.as_strided((3, width), (STRIDE, 1), offset)
    g = torch.Generator().manual_seed(offset)
    view.copy_(torch.randn(3, width, generator=g, dtype=torch.float64).half())
    return view

out = {}
x = rows(0, 70)
w = torch.randn(40, 70, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
w[w.abs() < 0.7] = 0
packed = pack(w.half(), dtype=torch.float32)
want = F.linear(x.double(), w.half().double())
y = sparse_linear(x, *packed, backend="triton")  # x read at 2^31
out["x past 2^31"] = float((y.double() - want).abs().max())
y_far = rows(4096, 40)  # y written at 2^31
kernel.launch(x, *packed, None, y_far)
out["y past 2^31"] = float((y_far.double() - want).abs().max())

s, t = rows(8192, 1000), rows(12288, 1000)
got = divergence(s.float().clone(), t.float().clone(), reduction="none")
far = divergence(s, t, reduction="none", backend="triton")  # rows read at 2^31
out["divergence rows past 2^31"] = float((far - got).abs().max())
out["peak_rss_mb"] = peak_mb()
out["grew_mb"] = out["peak_rss_mb"] - before_mb
print(json.dumps(out))
"""


def test_offsets_past_2_31_elements_under_the_interpreter():
    # Strided views into a 4 GiB buffer that is never touched beyond a few rows: the kernels
    # read and write entries past 2^31 with row strides that fit int32, where an int32 offset
    # would wrap (and read out of bounds: a crash or garbage, hence the separate process).
    found = fresh_python(_PAST_2_31, interpret=True)
    assert found["x past 2^31"] < 1e-2 and found["y past 2^31"] < 1e-2, found
    assert found["divergence rows past 2^31"] < 1e-5, found
    # the buffer stays untouched: touching it would add 4 GiB to what the imports took (read from
    # VmHWM: ru_maxrss starts at the parent's peak, 2056 MB late in a full pytest run)
    assert found["grew_mb"] < 1024, found


def test_sparse_grid_holds_every_tile_on_axis_0():
    k = _dispatch.triton_kernels("sparse_linear")
    # An LM head of 128,256 outputs at 16,744 rows: x W^T holds more than 2^31 entries.
    n, out_features, words = 16744, 128256, 4096 // 32
    block_b, block_o, _ = k.blocks(n, words)
    (programs,) = k.grid(n, out_features, block_b, block_o)
    assert n * out_features > 2**31
    assert programs == triton.cdiv(out_features, block_o) * triton.cdiv(n, block_b)
    # A million rows: more batch tiles than grid axis 1 allows (65,535), fine on axis 0.
    n = 2**20 + 1
    block_b, block_o, _ = k.blocks(n, 18)
    assert triton.cdiv(n, block_b) > 65535
    assert k.grid(n, 576, block_b, block_o)[0] <= k.MAX_PROGRAMS
    with pytest.raises(ValueError, match="split x into chunks"):
        k.grid(2**31, 128256, 1, 1)


def test_device_context_makes_the_tensors_gpu_current(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    from promptbake.kernels import device_context

    with device_context(types.SimpleNamespace(device=torch.device("cuda", 1))):
        entered.append("launch")
    assert entered == [torch.device("cuda", 1), "launch", "exit"]
    with device_context(torch.zeros(1)):  # CPU tensors (the interpreter): nothing to switch
        pass
    assert len(entered) == 3


def test_every_launch_runs_under_its_inputs_device(monkeypatch):
    divergence = _dispatch.triton_kernels("divergence")
    sparse = _dispatch.triton_kernels("sparse_linear")
    current, launches = [None], []

    @contextlib.contextmanager
    def spy(tensor):
        current[0] = tensor.device
        yield
        current[0] = None

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, grid, current[0]))

    for module, names in ((divergence, ("divergence_kernel", "scale_kernel")),
                          (sparse, ("sparse_linear_kernel",))):
        monkeypatch.setattr(module, "device_context", spy)
        for name in names:
            monkeypatch.setattr(module, name, Kernel(name))
    s, t = torch.zeros(3, 10), torch.zeros(3, 10)
    divergence.launch(s, t, None, torch.empty(3, 10), torch.empty(3), None, kind=0, beta=0.5,
                      inv_temperature=1.0, loss_scale=1.0, grad_scale=1.0,
                      teacher_is_logprobs=False)
    divergence.scale(torch.zeros(3, 10), torch.ones(1))
    sparse.launch(torch.zeros(2, 40), torch.zeros(5, 2, dtype=torch.int32), torch.zeros(0),
                  torch.zeros(6, dtype=torch.int64), None, torch.empty(2, 5))
    cpu = torch.device("cpu")
    assert [(name, where) for name, _, where in launches] == [
        ("divergence_kernel", cpu), ("scale_kernel", cpu), ("sparse_linear_kernel", cpu)]
