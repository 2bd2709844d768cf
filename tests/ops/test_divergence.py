"""promptbake.ops.divergence against an independent float64 reference, on every backend.

Tolerances: fp32 inputs, loss within rtol 1e-5 and gradient within rtol 1e-4 (plus 2e-6 of the
largest gradient entry); bf16 / fp16 gradients within their output rounding (2^-7 / 2^-10
relative), and absolute errors of a few fp32 ulp of the gradient's scale. The loss is always
accumulated in fp32 or better, whatever the input dtype.
"""

import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import promptbake
from promptbake.ops import _dispatch, divergence

divergence_module = sys.modules["promptbake.ops.divergence"]  # the function hides the module

BACKENDS = [name for name, info in promptbake.backends().items() if info.available]
# Triton runs on the GPU when there is one, else on CPU tensors through its interpreter.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMPILED = [name for name in BACKENDS if name != "triton"]  # fast enough for property tests
KINDS = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]

# The Triton interpreter runs masked lanes through numpy, which warns about log(0) there.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_every_backend_is_exercised():
    assert "torch" in BACKENDS
    assert "cpp" in BACKENDS, promptbake.backends()["cpp"].detail
    if not torch.cuda.is_available():
        assert "triton" in BACKENDS, promptbake.backends()["triton"].detail


def reference(s, t, *, kind="forward_kl", beta=0.5, temperature=1.0, scale_by_t2=False,
              mask=None, reduction="batchmean", weight=None, teacher_is_logprobs=False):
    """Textbook formulas in float64 with autograd; returns (loss, d loss / d s)."""
    del teacher_is_logprobs  # same result by definition
    vocab = s.shape[-1]
    x = s.detach().double().reshape(-1, vocab).requires_grad_(True)
    y = t.detach().double().reshape(-1, vocab)
    lq = F.log_softmax(x / temperature, -1)
    lp = F.log_softmax(y / temperature, -1)
    q, p = lq.exp(), lp.exp()

    def kl(w, lw, lo):  # sum w (lw - lo); entries with w = 0 add 0
        return (w * torch.where(w > 0, lw - lo, 0.0)).sum(-1)

    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        rows = kl(p, lp, lq)
    elif kind == "reverse_kl":
        rows = kl(q, lq, lp)
    else:
        empty = (p == 0) & (q == 0)  # keeps logaddexp's backward away from -inf - -inf
        lm = torch.logaddexp(torch.where(empty, 0.0, lp + math.log(beta)),
                             torch.where(empty, 0.0, lq + math.log1p(-beta)))
        rows = beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if scale_by_t2:
        rows = rows * temperature**2
    keep = mask.reshape(-1) if mask is not None else torch.ones(rows.shape, dtype=torch.bool)
    rows = torch.where(keep, rows, 0.0)
    kept = max(int(keep.sum()), 1)
    loss = {"sum": rows.sum(), "batchmean": rows.sum() / kept,
            "mean": rows.sum() / (kept * vocab), "none": rows.reshape(s.shape[:-1])}[reduction]
    out = loss if weight is None else (loss * weight).sum()
    if out.requires_grad:
        out.backward()
    grad = x.grad.reshape(s.shape) if x.grad is not None else torch.zeros(s.shape, dtype=torch.float64)
    return loss.detach(), grad


def on(backend, *tensors):
    """The tensors on the device the backend runs on (None stays None)."""
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    return [None if x is None else x.to(device) for x in tensors]


def run(s, t, backend, weight=None, **kw):
    """(result, gradient) on the CPU, computed on the backend's device."""
    s, t, kw["mask"] = on(backend, s, t, kw.get("mask"))
    x = s.detach().clone().requires_grad_(True)
    out = divergence(x, t, backend=backend, **kw)
    (out if weight is None else (out * weight.to(out)).sum()).backward()
    return out.detach().cpu(), x.grad.cpu()


def check(backend, s, t, *, grads=True, **kw):
    weight = None
    if kw.get("reduction") == "none":
        weight = torch.rand(s.shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, g = run(s, t, backend, weight, **kw)
    ref, gref = reference(s, t, weight=weight, **kw)
    want = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
    assert out.dtype == want
    assert g.dtype == s.dtype and g.shape == s.shape

    # fp32 errors are a few ulp of the terms summed: of each row's divergence (at least 1, the
    # size of a log-probability), times the reduction's factor c; however small the result.
    rows_kw = {**kw, "reduction": "none", "scale_by_t2": False}
    rows, _ = reference(s, t, weight=torch.ones(s.shape[:-1], dtype=torch.float64), **rows_kw)
    finite_rows = rows[torch.isfinite(rows)].abs()
    size = max(1.0, float(finite_rows.max()) if finite_rows.numel() else 0.0)
    mask, vocab = kw.get("mask"), s.shape[-1]
    kept = max(int(mask.sum()) if mask is not None else s[..., 0].numel(), 1)
    temperature = kw.get("temperature", 1.0)
    reduction = kw.get("reduction", "batchmean")
    c = {"batchmean": 1 / kept, "mean": 1 / (kept * vocab)}.get(reduction, 1.0)
    t2 = temperature**2 if kw.get("scale_by_t2") else 1.0
    loss_atol = {torch.float64: 1e-12}.get(want, 4e-6) * size * c * t2 * (kept if reduction == "sum" else 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=loss_atol)
    if not grads:
        return out, g
    assert torch.isfinite(gref).all(), "test case has no finite reference gradient"
    gc = c * t2 / temperature
    rtol, atol = {torch.float32: (1e-4, 4e-6), torch.float64: (1e-7, 1e-12),
                  torch.bfloat16: (2**-7, 4e-6), torch.float16: (2**-10, 4e-6)}[s.dtype]
    atol = atol * size * gc + (6e-8 if s.dtype == torch.float16 else 0.0)  # fp16 subnormal step
    if backend == "triton" and s.dtype == torch.bfloat16 and not torch.cuda.is_available():
        rtol = 2**-6  # the interpreter truncates fp32 -> bf16 where GPUs round to nearest
    torch.testing.assert_close(g.double(), gref, rtol=rtol, atol=atol)
    return out, g


def logits(shape, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def random_mask(shape, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    m = torch.rand(shape, generator=g) < 0.7
    m.view(-1)[0] = True
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(backend, kind, dtype, reduction):
    if backend == "triton" and reduction in ("sum", "mean"):
        pytest.skip("reductions are shared Python code; batchmean and none cover the kernel")
    s, t = logits((2, 3, 1000), dtype=dtype, seed=1), logits((2, 3, 1000), dtype=dtype, seed=2)
    check(backend, s, t, kind=kind, reduction=reduction, temperature=1.7, scale_by_t2=True,
          beta=0.3, mask=random_mask((2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 2), (3, 15), (3, 16), (3, 17), (2, 33),
                                        (17, 31), (5, 2049), (4, 4097), (2, 32003)])
def test_shapes(backend, rows, vocab):
    if backend == "triton" and rows * vocab > 20000:
        pytest.skip("kept small under the Triton interpreter")
    for kind in KINDS:
        check(backend, logits((rows, vocab), seed=rows), logits((rows, vocab), seed=vocab), kind=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_largest_vocabulary(backend, dtype):
    kinds = ["forward_kl"] if backend == "triton" else KINDS
    s, t = logits((2, 151936), dtype=dtype, seed=3), logits((2, 151936), dtype=dtype, seed=4)
    for kind in kinds:
        check(backend, s, t, kind=kind, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits(backend, kind):
    s = logits((4, 300), scale=1e4, seed=5)
    t = s + logits((4, 300), scale=2.0, seed=6)  # close distributions: small loss, big logits
    s[0, :5] = 1e4
    t[1, :5] = -1e4
    check(backend, s, t, kind=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_vocabulary_masked_with_minus_inf(backend, kind):
    # Entries banned on both sides (constrained decoding) contribute nothing and get grad 0.
    s, t = logits((4, 257), seed=8), logits((4, 257), seed=9)
    banned = torch.rand((4, 257), generator=torch.Generator().manual_seed(3)) < 0.4
    banned[:, 0] = False
    s[banned] = -math.inf
    t[banned] = -math.inf
    out, g = check(backend, s, t, kind=kind, mask=torch.tensor([True, True, False, True]))
    assert torch.isfinite(out)
    assert (g[banned] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_minus_inf_where_teacher_has_mass(backend):
    s, t = logits((3, 64), seed=10), logits((3, 64), seed=11)
    s[:, :8] = -math.inf
    out, g = check(backend, s, t, kind="forward_kl")
    assert out == math.inf  # KL(p || q) is infinite, and the gradient q - p stays finite
    for kind in ("reverse_kl", "jsd"):
        out, _ = check(backend, s, t, kind=kind)
        assert torch.isfinite(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_single_finite_entry(backend, kind):
    s, t = logits((3, 40), seed=12), logits((3, 40), seed=13)
    s[0, 1:] = -math.inf
    t[0, 1:] = -math.inf  # row 0: both one-hot on token 0: zero divergence
    t[1, :-1] = -math.inf  # row 1: teacher one-hot, student full
    if kind == "reverse_kl":  # student mass where the teacher has none: infinite, no gradient
        out, _ = check(backend, s[[0, 2]], t[[0, 2]], kind=kind, reduction="none")
    else:
        out, _ = check(backend, s, t, kind=kind, reduction="none")
    assert out[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_endpoints_are_the_kls(backend):
    s, t = logits((3, 100), seed=14), logits((3, 100), seed=15)
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a, ga = run(s, t, backend, kind="jsd", beta=beta)
        b, gb = run(s, t, backend, kind=kl)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.25, 0.5, 2.0, 5.0])
def test_temperatures(backend, temperature):
    s, t = logits((3, 500), seed=16), logits((3, 500), seed=17)
    for scaled in (False, True):
        check(backend, s, t, temperature=temperature, scale_by_t2=scaled, kind="jsd", beta=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_log_probabilities(backend):
    s, t = logits((3, 300), seed=18), logits((3, 300), seed=19)
    lp = torch.log_softmax(t, -1)
    for temperature in (1.0, 2.0):
        a, ga = run(s, lp, backend, teacher_is_logprobs=True, temperature=temperature)
        b, gb = run(s, t, backend, temperature=temperature)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    s, t = logits((3, 300), seed=20), logits((3, 300), seed=21)
    check(backend, s, t.to(torch.bfloat16))
    check(backend, s.to(torch.bfloat16), t.to(torch.float16), kind="reverse_kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_cost_nothing_and_get_zero_gradient(backend):
    s, t = logits((4, 100), seed=22), logits((4, 100), seed=23)
    s[1] = math.nan  # garbage at a masked position must neither raise nor leak
    mask = torch.tensor([True, False, True, True])
    out, g = run(s, t, backend, torch.ones(4), mask=mask, reduction="none")
    assert out[1] == 0 and (g[1] == 0).all()
    ref, _ = reference(s[[0, 2, 3]], t[[0, 2, 3]], reduction="none", weight=torch.ones(3))
    torch.testing.assert_close(out[[0, 2, 3]].double(), ref, rtol=1e-5, atol=1e-7)
    none_kept = torch.zeros(4, dtype=torch.bool)
    out, g = run(s, t, backend, mask=none_kept)
    assert out == 0 and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    s, t = logits((0, 50)), logits((0, 50))
    out, g = run(s, t, backend)
    assert out == 0 and g.shape == (0, 50)
    assert divergence(*on(backend, s, t), reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    base_s, base_t = logits((5, 3, 2 * 301), seed=24), logits((5, 3, 2 * 301), seed=25)
    s, t = base_s[..., ::2], base_t[..., ::2]  # strided vocabulary: copied
    check(backend, s, t, kind="reverse_kl")
    s, t = base_s[..., :301].transpose(0, 1), base_t[..., :301].transpose(0, 1)  # strided rows
    check(backend, s, t, reduction="none")
    one_teacher = logits((1, 301), seed=26).expand(6, 301)  # row stride 0
    check(backend, logits((6, 301), seed=27), one_teacher)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_the_result(backend):
    s, t = logits((3, 200), seed=28), logits((3, 200), seed=29)
    x, t_on = on(backend, s, t)
    x.requires_grad_(True)
    (3.0 * divergence(x, t_on, backend=backend)).backward()
    _, g = run(s, t, backend)
    torch.testing.assert_close(x.grad.cpu(), 3.0 * g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_requested(backend):
    s, t = logits((3, 200), seed=30), logits((3, 200), seed=31)
    with torch.no_grad():
        a = divergence(*on(backend, s, t), backend=backend)
    b, _ = run(s, t, backend)
    assert not a.requires_grad
    torch.testing.assert_close(a.cpu(), b)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled module not built")
def test_every_instruction_set(monkeypatch):
    for isa in _dispatch.compiled().isas():
        monkeypatch.setenv("PROMPTBAKE_CPU_ISA", isa)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            s, t = logits((3, 1003), dtype=dtype, seed=32), logits((3, 1003), dtype=dtype, seed=33)
            for kind in KINDS:
                check("cpp", s, t, kind=kind, temperature=1.3, mask=torch.tensor([True, False, True]))
    monkeypatch.setenv("PROMPTBAKE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="PROMPTBAKE_CPU_ISA"):
        divergence(logits((2, 10)), logits((2, 10)))


@st.composite
def cases(draw):
    rows = draw(st.integers(1, 6))
    vocab = draw(st.sampled_from([1, 2, 7, 16, 31, 100, 257, 1024, 2500]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    seed = draw(st.integers(0, 2**16))
    s = logits((rows, vocab), scale=scale, dtype=dtype, seed=seed)
    t = logits((rows, vocab), scale=scale, dtype=dtype, seed=seed + 1)
    if vocab > 1 and draw(st.booleans()):  # vocabulary banned on both sides
        banned = torch.rand((rows, vocab), generator=torch.Generator().manual_seed(seed)) < 0.3
        banned[:, 0] = False
        s[banned] = -math.inf
        t[banned] = -math.inf
    kw = dict(kind=draw(st.sampled_from(KINDS)), reduction=draw(st.sampled_from(REDUCTIONS)),
              temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 3.7])),
              scale_by_t2=draw(st.booleans()),
              beta=draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.01, 0.99))))
    if draw(st.booleans()):
        kw["mask"] = random_mask((rows,), seed=seed)
    return s, t, kw


@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_property_matches_reference(backend, case):
    s, t, kw = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(backend, s, t, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_torch_path(kind, reduction):
    # Checks the closed-form gradients every backend writes against finite differences.
    t = logits((2, 3, 7), dtype=torch.float64, seed=34)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    s = logits((2, 3, 7), dtype=torch.float64, seed=35).requires_grad_(True)
    fn = lambda x: divergence(x, t, kind=kind, reduction=reduction, mask=mask, temperature=1.5,
                              scale_by_t2=True, beta=0.4, backend="torch")
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


def test_module_wrapper_matches_function():
    s, t = logits((2, 5, 64), seed=36), logits((2, 5, 64), seed=37)
    loss_fn = promptbake.DivergenceLoss("jsd", beta=0.2, temperature=2.0)
    assert "jsd" in repr(loss_fn)
    torch.testing.assert_close(loss_fn(s, t), divergence(s, t, kind="jsd", beta=0.2, temperature=2.0))


@pytest.mark.parametrize("bad,message", [
    (dict(student=logits((2, 10)), teacher=logits((2, 11))), "vocabulary mismatch"),
    (dict(student=logits((2, 10)), teacher=logits((3, 10))), "shape mismatch"),
    (dict(student=torch.ones(2, 10, dtype=torch.long)), "student_logits has dtype"),
    (dict(teacher=torch.ones(2, 10, dtype=torch.int32)), "teacher_logits has dtype"),
    (dict(student=logits((2, 0)), teacher=logits((2, 0))), "expected \\[..., V\\]"),
    (dict(student=[1.0, 2.0]), "student_logits must be a torch.Tensor"),
    (dict(kind="kl"), "unknown kind='kl'"),
    (dict(reduction="avg"), "unknown reduction='avg'"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(beta=1.5), "beta=1.5"),
    (dict(beta=-0.1), "beta=-0.1"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), "mask has shape"),
    (dict(mask=torch.ones(2, dtype=torch.float32)), "mask has dtype"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(backend="cpp", student=logits((2, 10), dtype=torch.float64)), "use the 'torch' backend"),
])
def test_bad_input_is_named(bad, message):
    kw = dict(student=logits((2, 10)), teacher=logits((2, 10)))
    kw.update(bad)
    s, t = kw.pop("student"), kw.pop("teacher")
    with pytest.raises(ValueError, match=message):
        divergence(s, t, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg,value,problem", [
    ("student_logits", math.nan, "contains NaN"), ("teacher_logits", math.nan, "contains NaN"),
    ("student_logits", math.inf, "contains \\+inf"), ("teacher_logits", -math.inf, "has no finite logit"),
])
def test_invalid_logits_raise(backend, arg, value, problem):
    s, t = logits((2, 3, 20), seed=38), logits((2, 3, 20), seed=39)
    target = s if arg == "student_logits" else t
    if value == -math.inf:
        target[1, 2] = value
    else:
        target[1, 2, 5] = value
    s, t = on(backend, s, t)
    check = {} if s.device.type == "cpu" else {"check_nan": True}  # off by default on GPUs
    with pytest.raises(ValueError, match=f"{arg}\\[1, 2\\] {problem}"):
        divergence(s, t, backend=backend, **check)
    assert torch.isnan(divergence(s, t, backend=backend, check_nan=False))
    mask = torch.ones(2, 3, dtype=torch.bool, device=s.device)
    mask[1, 2] = False
    assert torch.isfinite(divergence(s, t, backend=backend, mask=mask, **check))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_row_maximum_found_late(backend, kind):
    # The single pass rescales what it has summed whenever a row maximum grows: here by tens of
    # units (and past exp's range) in later blocks, on either side.
    s, t = logits((4, 5000), seed=40), logits((4, 5000), seed=41)
    s[0, 4999] = 40.0
    t[1, 3000] = 120.0
    s[2, 2500:] += 30.0
    t[2, 4100] = 95.0
    t[3, :] = logits((1, 5000), scale=1.0, seed=42) - 80.0
    t[3, 4321] = 0.0
    check(backend, s, t, kind=kind, reduction="none")


# Eq. 3 in fp16 at scale: N = 16,384 rows, V = 128,256, logits of spread 3, a loss scaler's
# 2^16. The old saved gradient was (q - p) / N rounded to fp16 in the forward: 99.6% of its
# entries fell below fp16's smallest subnormal (2^-24), 39% of its L1 mass, lost before the loss
# scale (which arrives in backward) could lift them. N x V is 2^31 entries, 4 GB a tensor in
# fp16, so the test keeps every per-entry magnitude and shrinks the tensors: V = 8,192 columns
# of spread-3 logits of which token 0 holds the mass the other 120,064 tokens hold at full size,
# so each q and p (and q - p) is distributed as at V = 128,256; N = 64 rows, and an upstream
# gradient of 2^16 x 64 / 16,384, so backward multiplies by 2^16 / 16,384 as at N = 16,384.
N_FULL, V_FULL, SPREAD, LOSS_SCALE = 16384, 128256, 3.0, 2.0**16


def full_scale_logits(n, vocab, seed):
    x = logits((n, vocab), scale=SPREAD, dtype=torch.float64, seed=seed)
    x[:, 0] = math.log((V_FULL - vocab) * math.exp(SPREAD**2 / 2))  # E sum of the missing exps
    return x.half()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_fp16_gradient_survives_the_reduction(backend, reduction):
    n, vocab = 64, 8192
    s, t = full_scale_logits(n, vocab, 43), full_scale_logits(n, vocab, 44)
    # Backward multiplies the saved q - p by 2^16 / 16,384 at full size; so here, for mean too.
    multiplier = LOSS_SCALE / N_FULL
    here = {"batchmean": n, "mean": n * vocab}[reduction]
    upstream = multiplier * here
    _, want = reference(s, t, reduction=reduction)
    q_minus_p = want * here  # float64, from the same fp16 inputs
    want = want * upstream
    if reduction == "batchmean":  # the old mechanism at full size, as claimed above
        old = (q_minus_p / N_FULL).half().double() * LOSS_SCALE
        assert float((old[:, 1:] == 0).double().mean()) > 0.99
        assert 1 - float(old[:, 1:].abs().sum() / want[:, 1:].abs().sum()) > 0.3

    x, t_on = on(backend, s, t)
    x.requires_grad_(True)
    (divergence(x, t_on, backend=backend, reduction=reduction) * upstream).backward()
    assert x.grad.dtype == torch.float16
    got = x.grad.cpu().double()
    # The tail, where the underflow was: saved as q - p in fp16 (error <= 2^-25, or relative
    # 2^-11), then multiplied by the factor and rounded once more (relative 2^-11, or 2^-25);
    # the interpreter truncates.
    tail, want_tail = got[:, 1:], want[:, 1:]
    torch.testing.assert_close(tail, want_tail, rtol=2**-9, atol=(multiplier + 1) * 2**-24)
    assert float((tail - want_tail).abs().sum() / want_tail.abs().sum()) < 2e-3
    # Token 0: q - p of two probabilities near 1, as exact as fp32 log-probabilities make it.
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=2**-9, atol=multiplier * 4e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_backward_scales_the_saved_gradient_in_place(backend, dtype, reduction):
    s, t = on(backend, logits((5, 300), dtype=dtype, seed=45), logits((5, 300), dtype=dtype, seed=46))
    x = s.clone().requires_grad_(True)
    y = x * 1  # a non-leaf: its hook sees the tensor backward returns
    seen = []
    y.register_hook(lambda g: seen.append(g.data_ptr()))
    weight = torch.linspace(0.5, 2.0, 5, device=s.device)
    loss = divergence(y, t, backend=backend, reduction=reduction)
    (saved,) = loss.grad_fn.saved_tensors
    (loss * weight).sum().backward() if reduction == "none" else (loss * 3.0).backward()
    assert seen == [saved.data_ptr()]  # no new N x V buffer
    _, g = run(s.cpu(), t.cpu(), backend, weight.cpu() if reduction == "none" else 3.0 * torch.ones(()),
               reduction=reduction)
    torch.testing.assert_close(x.grad.cpu(), g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_retained_graph_backpropagates_twice(backend, dtype):
    s, t = on(backend, logits((4, 200), dtype=dtype, seed=47), logits((4, 200), dtype=dtype, seed=48))
    x = s.clone().requires_grad_(True)
    loss = divergence(x, t, backend=backend) * 2.0
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    _, g = run(s.cpu(), t.cpu(), backend, 2.0 * torch.ones(()))
    torch.testing.assert_close(first.cpu(), g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_rows_counted_on_the_device(backend, dtype, reduction, monkeypatch):
    # Off the CPU the mask's rows are counted into a device tensor, never read by the host: the
    # factor reaches the kernel (or backward, for fp16) through memory. Forced here on the CPU.
    s, t = logits((6, 300), dtype=dtype, seed=49), logits((6, 300), dtype=dtype, seed=50)
    mask = random_mask((6,), seed=51)
    want, g_want = run(s, t, backend, 1.5 * torch.ones(()), mask=mask, reduction=reduction)
    monkeypatch.setattr(divergence_module, "_counts_on_host", lambda device: False)
    got, g = run(s, t, backend, 1.5 * torch.ones(()), mask=mask, reduction=reduction)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_want, rtol=2**-10, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_host_sync_off_the_cpu(dtype, reduction):
    # Meta tensors have no data, so any read of a value by the host (a count, the NaN check,
    # grad_out != 1) raises: forward and backward on them prove the step never waits for the
    # GPU, and the NaN check is off by default there.
    s = torch.empty(3, 5, 100, device="meta", dtype=dtype, requires_grad=True)
    t = torch.empty(3, 5, 100, device="meta", dtype=dtype)
    mask = torch.empty(3, 5, device="meta", dtype=torch.bool)
    loss = divergence(s, t, mask=mask, reduction=reduction)
    (loss.sum() * 3.0).backward()
    assert s.grad.shape == s.shape and s.grad.dtype == dtype


def test_triton_path_has_no_host_sync(monkeypatch):
    # The triton backend's Python side on meta tensors, its kernels replaced by recorders.
    calls = []

    class Kernels:
        @staticmethod
        def launch(s, t, mask, grad, row_loss, factor, **options):
            calls.append(("launch", factor is not None, options["grad_scale"]))

        @staticmethod
        def scale(grad, upstream):
            calls.append(("scale", upstream.dtype, tuple(upstream.shape)))

    monkeypatch.setattr(_dispatch, "triton_kernels", lambda name: Kernels)
    monkeypatch.setattr(_dispatch, "select", lambda device, dtype, requested=None: "triton")
    for dtype in (torch.float32, torch.float16):
        s = torch.empty(4, 100, device="meta", dtype=dtype, requires_grad=True)
        t = torch.empty(4, 100, device="meta", dtype=dtype)
        loss = divergence(s, t, mask=torch.empty(4, device="meta", dtype=torch.bool))
        (loss * 2.0).backward()
    assert calls == [("launch", True, 1.0), ("scale", torch.float32, (1,)),  # factor folded
                     ("launch", False, 1.0), ("scale", torch.float32, (1,))]  # fp16: deferred
