"""promptbake.ops.sparse_linear against a float64 dense reference, on every backend and, for cpp,
every instruction set this CPU runs.

Tolerances: an fp32 sum of n products is within a few ulp of sum |x_i w_i| per term; we allow
1e-5 of that sum (about 80 ulp), plus the output rounding for bf16 / fp16 outputs (2^-8 / 2^-11
relative; the Triton interpreter truncates instead of rounding, so 2^-7 there). The reference
uses the inputs as they were rounded to their dtype, so the comparison is exact arithmetic
against the kernel, not against a higher-precision model.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import promptbake
from promptbake.ops import sparse_linear
from promptbake.ops.sparse_linear import check_format, kept, pack, unpack

BACKENDS = [name for name, info in promptbake.backends().items() if info.available]
ISAS = promptbake.ops._dispatch.compiled().isas()
# cpp once per instruction set; triton (the interpreter on CPU) only on the small cases.
KERNELS = [("cpp", isa) for isa in ISAS] + [("torch", None)]
TRITON = [("triton", None)] if "triton" in BACKENDS else []
# Triton runs on the GPU when there is one, else on CPU tensors through its interpreter.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_every_backend_and_isa_is_exercised():
    assert "cpp" in BACKENDS, promptbake.backends()["cpp"].detail
    assert "generic" in ISAS
    if not torch.cuda.is_available():
        assert TRITON, promptbake.backends()["triton"].detail


def pruned(out, inp, sparsity, *, seed=0, dtype=torch.float32, empty_rows=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    w[torch.rand(out, inp, generator=g, dtype=torch.float64) < sparsity] = 0
    w[:empty_rows] = 0
    return w.to(dtype)


def two_four(out, inp, *, seed=0):
    """2:4 pattern: in each group of 4 consecutive weights of a row, the 2 largest are kept."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    groups = w.view(out, inp // 4, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    groups.scatter_(-1, drop, 0.0)
    return w


def inputs(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def run(kernel, x, packed, bias=None, monkeypatch=None, **kw):
    """The layer's output on the CPU, computed on the backend's device."""
    backend, isa = kernel
    if isa is not None:
        monkeypatch.setenv("PROMPTBAKE_CPU_ISA", isa)
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    x, bias, *packed = [None if t is None else t.to(device) for t in (x, bias, *packed)]
    return sparse_linear(x, *packed, bias, backend=backend, **kw).cpu()


def check(y, x, packed, bias=None, *, interpreted=False):
    """y against F.linear in float64 on the same (rounded) x, weights and bias."""
    w = unpack(*packed, x.shape[-1]).double()
    b = bias.double() if bias is not None else None
    ref = F.linear(x.double(), w, b)
    scale = F.linear(x.double().abs(), w.abs(), b.abs() if b is not None else None)
    assert y.shape == ref.shape and y.dtype == x.dtype
    if y.dtype == torch.float64:
        rtol = 1e-12
    else:
        rounding = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[y.dtype]
        rtol = 2 * rounding if interpreted else rounding
    err = (y.double() - ref).abs()
    allowed = 1e-5 * scale + rtol * ref.abs() + 1e-30
    bad = err > allowed
    assert not bad.any(), (f"max error {float(err.max()):.3g} where allowed "
                           f"{float(allowed[bad].min()):.3g} ({int(bad.sum())} entries)")


# (out, in): odd sizes, widths that are not multiples of 8, 16 or 32, the default model's.
SHAPES = [(1, 1), (3, 7), (5, 37), (17, 65), (33, 100), (8, 256), (13, 576), (7, 1536)]


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
@pytest.mark.parametrize("out,inp", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_matches_dense(kernel, out, inp, sparsity, monkeypatch):
    w = pruned(out, inp, sparsity, seed=out * inp, empty_rows=out // 3)
    packed = pack(w)
    bias = inputs(out, seed=5)
    for batch in (1, 3, 8, 11):  # 11: more rows than one pass of the kernel takes (8)
        x = inputs((batch, inp), seed=batch)
        check(run(kernel, x, packed, bias, monkeypatch), x, packed, bias)
    check(run(kernel, x, packed, None, monkeypatch), x, packed)


@pytest.mark.parametrize("kernel", KERNELS + TRITON, ids=str)
def test_small_shapes(kernel, monkeypatch):
    interpreted = kernel[0] == "triton" and not torch.cuda.is_available()
    for out, inp, sparsity in [(1, 1, 0.0), (5, 37, 0.7), (4, 64, 0.5), (6, 100, 0.9)]:
        w = pruned(out, inp, sparsity, seed=inp, empty_rows=1)
        packed, bias = pack(w), inputs(out, seed=2)
        for batch in (1, 3):
            x = inputs((batch, inp), seed=batch)
            check(run(kernel, x, packed, bias, monkeypatch), x, packed, bias,
                  interpreted=interpreted)


@pytest.mark.parametrize("kernel", KERNELS + TRITON, ids=str)
def test_two_four_pattern(kernel, monkeypatch):
    w = two_four(24, 96 if kernel[0] == "triton" else 576)
    packed = pack(w)
    assert packed[1].numel() == w.numel() // 2
    for batch in (1, 8):
        x = inputs((batch, w.shape[1]), seed=batch)
        check(run(kernel, x, packed, None, monkeypatch), x, packed,
              interpreted=kernel[0] == "triton" and not torch.cuda.is_available())


@pytest.mark.parametrize("kernel", KERNELS + TRITON, ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(kernel, x_dtype, values_dtype, monkeypatch):
    w = pruned(9, 70, 0.7, seed=3)
    packed = pack(w, dtype=values_dtype)
    assert packed[1].dtype == values_dtype
    bias = inputs(9, dtype=values_dtype, seed=4)
    x = inputs((3, 70), dtype=x_dtype, seed=5)
    check(run(kernel, x, packed, bias, monkeypatch), x, packed, bias,
          interpreted=kernel[0] == "triton" and not torch.cuda.is_available())


@pytest.mark.parametrize("kernel", KERNELS + TRITON, ids=str)
def test_tiles_of_rows_words_and_batch(kernel, monkeypatch):
    # Shapes around the kernels' tiles: output rows per program (16 at batch 1), bitmap words
    # per step (4, i.e. 128 columns), batch rows per program (8).
    for out, inp, batch in [(16, 128, 1), (17, 129, 1), (37, 300, 9), (5, 520, 17)]:
        w = pruned(out, inp, 0.6, seed=out + inp, empty_rows=2)
        packed, bias = pack(w), inputs(out, seed=inp)
        x = inputs((batch, inp), seed=batch)
        y = run(kernel, x, packed, bias, monkeypatch)
        check(y, x, packed, bias, interpreted=kernel[0] == "triton")


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_leading_dimensions_and_strides(kernel, monkeypatch):
    w = pruned(19, 130, 0.7, seed=6)
    packed, bias = pack(w), inputs(19, seed=7)
    x3 = inputs((2, 3, 130), seed=8)
    y = run(kernel, x3, packed, bias, monkeypatch)
    assert y.shape == (2, 3, 19)
    check(y.reshape(6, 19), x3.reshape(6, 130), packed, bias)
    wide = inputs((4, 300), seed=9)
    rows = wide[:, 10:140]  # row stride 300
    check(run(kernel, rows, packed, bias, monkeypatch), rows, packed, bias)
    columns = inputs((130, 5), seed=10).t()  # last stride 5: copied
    check(run(kernel, columns, packed, bias, monkeypatch), columns, packed, bias)
    empty = torch.zeros(0, 130)
    assert run(kernel, empty, packed, bias, monkeypatch).shape == (0, 19)


def test_float64_runs_on_the_torch_backend():
    w = pruned(5, 40, 0.5, seed=11)
    packed = pack(w, dtype=torch.float64)
    x = inputs((2, 40), dtype=torch.float64)
    y = sparse_linear(x, *packed)
    assert y.dtype == torch.float64
    check(y, x, packed)
    with pytest.raises(ValueError, match="float64"):
        sparse_linear(x.float(), *packed, backend="cpp")


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_gradient_flows_to_x(kernel, monkeypatch):
    w = pruned(11, 50, 0.6, seed=12)
    packed, bias = pack(w), inputs(11, seed=13)
    x = inputs((4, 50), seed=14).requires_grad_(True)
    upstream = inputs((4, 11), seed=15)
    (run(kernel, x, packed, bias, monkeypatch) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, (upstream @ w).float(), rtol=1e-5, atol=1e-6)


def test_pack_round_trip_and_mask():
    w = pruned(10, 45, 0.6, seed=16)
    bitmap, values, row_offsets = pack(w)
    assert bitmap.dtype == torch.int32 and bitmap.shape == (10, 2)
    assert torch.equal(unpack(bitmap, values, row_offsets, 45), w)
    assert torch.equal(kept(bitmap, 45), w != 0)
    check_format(bitmap, values, row_offsets, 45)
    # Bit 31 set: the int32 word is negative and must still decode as column 31.
    col31 = torch.zeros(1, 32)
    col31[0, 31] = 2.0
    assert int(pack(col31)[0]) < 0
    assert torch.equal(unpack(*pack(col31), 32), col31)
    # A mask keeps what it says, zeros included; the rest is dropped.
    dense = inputs((6, 20), seed=17).float()
    mask = torch.zeros(6, 20, dtype=torch.bool)
    mask[:, ::3] = True
    mask[2] = False
    packed = pack(dense, mask)
    assert packed[1].numel() == int(mask.sum())
    assert torch.equal(unpack(*packed, 20), torch.where(mask, dense, 0.0))


def test_bad_inputs():
    w = pruned(4, 40, 0.5)
    bitmap, values, row_offsets = pack(w)
    x = inputs((2, 40)).float()
    cases = [
        (lambda: sparse_linear(x[:, :39], bitmap, values, row_offsets, in_features=40),
         "39 features"),
        (lambda: sparse_linear(inputs((2, 70)).float(), bitmap, values, row_offsets),
         "words per row"),
        (lambda: sparse_linear(x.long(), bitmap, values, row_offsets), "dtype"),
        (lambda: sparse_linear([1.0], bitmap, values, row_offsets), "torch.Tensor"),
        (lambda: sparse_linear(x, bitmap.long(), values, row_offsets), "int32"),
        (lambda: sparse_linear(x, bitmap, values[:-1], row_offsets), "row_offsets"),
        (lambda: sparse_linear(x, bitmap, values, row_offsets.flip(0)), "row_offsets"),
        (lambda: sparse_linear(x, bitmap, values, row_offsets.int()), "int64"),
        (lambda: sparse_linear(x, bitmap, values.long(), row_offsets), "values"),
        (lambda: sparse_linear(x, bitmap, values, row_offsets, torch.zeros(5)), "bias"),
        (lambda: sparse_linear(x, bitmap, values.clone().requires_grad_(True), row_offsets),
         "inference only"),
        (lambda: sparse_linear(x, bitmap, values, row_offsets, backend="nope"), "unknown backend"),
        (lambda: sparse_linear(x, bitmap, values, row_offsets, backend="cuda"), "unknown backend"),
        (lambda: sparse_linear(x[:, :33], bitmap, values, row_offsets), "beyond in_features"),
        (lambda: pack(torch.zeros(3)), "2-D"),
        (lambda: pack(torch.zeros(0, 4)), ">= 1"),
        (lambda: pack(w, torch.ones(4, 41, dtype=torch.bool)), "mask"),
        (lambda: pack(w, dtype=torch.int8), "values dtype"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    bad = bitmap.clone()
    bad[0, 0] ^= 1  # one bit more than the offsets count
    with pytest.raises(ValueError, match="row_offsets do not match"):
        sparse_linear(x, bad, values, row_offsets)
    meta = torch.empty(2, 40, device="meta")
    with pytest.raises(ValueError, match="meta"):
        sparse_linear(meta, bitmap, values, row_offsets)


def test_unsupported_isa_is_named(monkeypatch):
    missing = next((isa for isa in ("avx512", "avx2") if isa not in ISAS), "sve")
    monkeypatch.setenv("PROMPTBAKE_CPU_ISA", missing)
    packed = pack(pruned(2, 8, 0.5))
    with pytest.raises(ValueError, match=missing):
        sparse_linear(inputs((1, 8)).float(), *packed)


@st.composite
def problems(draw):
    out = draw(st.integers(1, 40))
    inp = draw(st.integers(1, 200))
    batch = draw(st.integers(0, 12))
    sparsity = draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return out, inp, batch, sparsity, seed, dtype, draw(st.booleans())


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_property_matches_dense(backend, problem):
    out, inp, batch, sparsity, seed, dtype, with_bias = problem
    w = pruned(out, inp, sparsity, seed=seed)
    packed = pack(w, dtype=dtype)
    bias = inputs(out, seed=seed + 1).float() if with_bias else None
    x = inputs((batch, inp), seed=seed + 2, dtype=dtype)
    y = sparse_linear(x, *packed, bias, backend=backend)
    check(y, x, packed, bias)
    assert packed[1].numel() == int((w != 0).sum())
