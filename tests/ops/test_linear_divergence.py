"""promptbake.ops.linear_divergence: the fused LM head + divergence against the unfused op.

The reference is ``divergence(hidden @ weight.T, teacher)`` in float64 on the torch backend
(itself tested against textbook formulas in test_divergence), differentiated by autograd.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import promptbake
from promptbake.ops import divergence
from promptbake.ops.linear_divergence import (MIN_ROWS, Hidden, TopK, linear_divergence,
                                              rows_per_block)
from promptbake.ops.topk_divergence import topk_divergence

BACKENDS = [name for name, info in promptbake.backends().items() if info.available]
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KINDS = ["forward_kl", "reverse_kl", "jsd"]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's log(0)


def case(n=37, width=16, vocab=101, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64) / 2
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(n, generator=g) > 0.3
    return [x.to(device) for x in (hidden, weight, teacher, mask)]


def reference(hidden, weight, teacher, *, weight_grad=True, **options):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(weight_grad)
    loss = divergence(h @ w.t(), teacher.double(), backend="torch", **options)
    wanted = (h, w) if weight_grad else (h,)
    grads = torch.autograd.grad(loss.sum() * 3.0, wanted)
    return loss.detach(), grads


def fused(hidden, weight, teacher, dtype, *, weight_grad=True, **options):
    h = hidden.detach().to(dtype).requires_grad_(True)
    w = weight.detach().to(dtype).requires_grad_(weight_grad)
    if isinstance(teacher, torch.Tensor):
        teacher = teacher.to(dtype)
    loss = linear_divergence(h, w, teacher, **options)
    wanted = (h, w) if weight_grad else (h,)
    grads = torch.autograd.grad(loss.sum() * 3.0, wanted)
    return loss.detach(), grads


def close(got, want, rtol, atol_scale):
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol_scale * scale)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", [1, 5, 37, 1000])
def test_matches_unfused(backend, kind, block):
    hidden, weight, teacher, mask = case()
    dtype = torch.float64 if backend == "torch" else torch.float32
    want, (gh, gw) = reference(hidden, weight, teacher, kind=kind, mask=mask)
    got, (fh, fw) = fused(hidden, weight, teacher, dtype, kind=kind, mask=mask,
                          block_rows=block, backend=backend)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    close(got, want, rtol, rtol)
    close(fh, gh, rtol * 10, rtol)
    close(fw, gw, rtol * 10, rtol)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_temperature_and_masks(reduction):
    hidden, weight, teacher, mask = case(n=12, seed=1)
    options = dict(kind="jsd", beta=0.3, temperature=2.0, scale_by_t2=True, mask=mask,
                   reduction=reduction, teacher_is_logprobs=False)
    weight_grad = reduction != "none"
    want, grads = reference(hidden, weight, teacher, weight_grad=weight_grad, **options)
    got, fgrads = fused(hidden, weight, teacher, torch.float32, weight_grad=weight_grad,
                        block_rows=5, **options)
    close(got, want, 1e-5, 1e-6)
    for f, g in zip(fgrads, grads):
        close(f, g, 1e-4, 1e-5)
    if reduction == "none":
        assert got.shape == mask.shape and float(got[~mask].abs().max()) == 0.0


def test_leading_dimensions_and_logprob_teacher():
    hidden, weight, teacher, mask = case(n=12, seed=2)
    logprobs = torch.log_softmax(teacher, -1)
    want, (gh, gw) = reference(hidden, weight, teacher, mask=mask)
    h = hidden.float().view(3, 4, -1).requires_grad_(True)
    w = weight.float().requires_grad_(True)
    loss = linear_divergence(h, w, logprobs.float().view(3, 4, -1), mask=mask.view(3, 4),
                             teacher_is_logprobs=True, block_rows=5)
    (loss * 3.0).backward()
    close(loss, want, 1e-5, 1e-6)
    close(h.grad.view(12, -1), gh, 1e-4, 1e-5)
    close(w.grad, gw, 1e-4, 1e-5)


def test_frozen_weight_gets_no_gradient_and_hidden_only():
    hidden, weight, teacher, mask = case(n=9, seed=3)
    want, (gh,) = reference(hidden, weight, teacher, weight_grad=False, mask=mask)
    got, (fh,) = fused(hidden, weight, teacher, torch.float32, weight_grad=False, mask=mask,
                       block_rows=4)
    close(got, want, 1e-5, 1e-6)
    close(fh, gh, 1e-4, 1e-5)
    w = weight.float()
    h = hidden.float().requires_grad_(True)
    linear_divergence(h, w, teacher.float()).backward()
    assert w.grad is None and h.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_topk_teacher(kind):
    hidden, weight, teacher, mask = case(n=11, seed=4)
    lp = torch.log_softmax(teacher, -1)
    top = lp.topk(8, dim=-1)
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    want = topk_divergence(h @ w.t(), top.indices, top.values, kind=kind, mask=mask)
    gh, gw = torch.autograd.grad(want, (h, w))
    got, (fh, fw) = fused(hidden, weight, TopK(top.indices, top.values.float()), torch.float32,
                          kind=kind, mask=mask, block_rows=4)
    got = got / 3.0 * 3.0
    close(got, want.detach(), 1e-5, 1e-6)
    close(fh / 3.0, gh, 1e-4, 1e-5)
    close(fw / 3.0, gw, 1e-4, 1e-5)


def test_hidden_teacher():
    hidden, weight, _, mask = case(n=10, seed=5)
    t_hidden = torch.randn(10, 24, dtype=torch.float64)
    t_weight = torch.randn(weight.shape[0], 24, dtype=torch.float64) / 2
    want, (gh, gw) = reference(hidden, weight, t_hidden @ t_weight.t(), kind="reverse_kl",
                               mask=mask)
    got, (fh, fw) = fused(hidden, weight, Hidden(t_hidden.float(), t_weight.float()),
                          torch.float32, kind="reverse_kl", mask=mask, block_rows=3)
    close(got, want, 1e-5, 1e-6)
    close(fh, gh, 1e-4, 1e-5)
    close(fw, gw, 1e-4, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_unfused_in_the_same_dtype(dtype):
    # The same roundings as the unfused op fed logits made in that dtype.
    hidden, weight, teacher, mask = case(n=20, seed=6)
    h = hidden.to(dtype).requires_grad_(True)
    w = weight.to(dtype)
    want = divergence(h @ w.t(), teacher.to(dtype), mask=mask)
    (gh,) = torch.autograd.grad(want, (h,))
    got, (fh,) = fused(hidden, weight, teacher, dtype, weight_grad=False, mask=mask,
                       block_rows=6)
    close(got, want.detach(), 1e-5, 1e-6)
    close(fh / 3.0, gh, 2**-6, 2**-8)
    assert fh.dtype == dtype


def test_autocast_computes_in_the_autocast_dtype():
    hidden, weight, teacher, mask = case(n=16, seed=7)
    h = hidden.float().requires_grad_(True)
    w = weight.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = divergence(torch.nn.functional.linear(h, w), teacher.float(), mask=mask)
        got = linear_divergence(h, w, teacher.float(), mask=mask, block_rows=5)
    (gh,) = torch.autograd.grad(want, (h,))
    (fh,) = torch.autograd.grad(got, (h,))
    close(got, want.detach(), 1e-5, 1e-6)
    assert fh.dtype == torch.float32
    close(fh, gh, 2**-6, 2**-8)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_triton_backend(kind):
    # Small: the interpreter runs it on CPU tensors; on a GPU the same test runs on CUDA.
    hidden, weight, teacher, mask = case(n=6, width=8, vocab=40, seed=8, device=TRITON_DEVICE)
    want, (gh, gw) = reference(hidden.cpu(), weight.cpu(), teacher.cpu(), kind=kind,
                               mask=mask.cpu())
    got, (fh, fw) = fused(hidden, weight, teacher, torch.float32, kind=kind, mask=mask,
                          block_rows=4, backend="triton")
    close(got.cpu(), want, 1e-5, 1e-6)
    close(fh.cpu(), gh, 1e-4, 1e-5)
    close(fw.cpu(), gw, 1e-4, 1e-5)


class _Sizes(TorchDispatchMode):
    """Records the element count of every tensor an op makes (views make none)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_never_holds_n_by_v(backend):
    n, width, vocab, block = 256, 8, 512, 16
    hidden, weight, teacher, mask = case(n=n, width=width, vocab=vocab, seed=9)
    h = hidden.float().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    # The teacher is an input; everything made inside is at most a block of logits, the
    # [N, H] gradient or the [V, H] weight gradient.
    t = teacher.float()
    with _Sizes() as sizes:
        loss = linear_divergence(h, w, t, mask=mask, block_rows=block, backend=backend)
        loss.backward()
    assert sizes.largest <= max(block * vocab, n * width, vocab * width)
    unfused = _Sizes()
    with unfused:
        divergence(h.detach() @ w.detach().t(), t)
    assert unfused.largest >= n * vocab  # the check sees an N x V tensor where there is one


def test_block_size_follows_the_budget():
    assert rows_per_block(1000, torch.float32, torch.empty(0), False, 8000 * 1000) == 1000
    assert rows_per_block(1000, torch.bfloat16, torch.empty(0), False, 4000 * 1000) == 1000
    assert rows_per_block(10**6, torch.float32, torch.empty(0), False, 10) == MIN_ROWS
    hidden, weight, teacher, _ = case(n=300, seed=10)
    small = linear_divergence(hidden.float(), weight.float(), teacher.float(),
                              memory_budget=8 * 101 * 270)  # 270 rows per block
    whole = linear_divergence(hidden.float(), weight.float(), teacher.float())
    close(small, whole, 1e-6, 1e-7)


def test_nan_rows_are_named_or_masked():
    hidden, weight, teacher, _ = case(n=8, seed=11)
    h = hidden.float()
    h[5, 2] = float("nan")
    with pytest.raises(ValueError, match="row 5 .*hidden"):
        linear_divergence(h, weight.float(), teacher.float(), block_rows=3)
    keep = torch.ones(8, dtype=torch.bool)
    keep[5] = False
    assert torch.isfinite(linear_divergence(h, weight.float(), teacher.float(), mask=keep))
    assert torch.isnan(linear_divergence(h, weight.float(), teacher.float(), check_nan=False))


@pytest.mark.parametrize("change, message", [
    (lambda h, w, t, m: (h[:, :-1], w, t, m), "hidden size mismatch"),
    (lambda h, w, t, m: (h, w.t(), t, m), "hidden size mismatch|must be"),
    (lambda h, w, t, m: (h, w, t[:, :-1], m), "vocabularies differ"),
    (lambda h, w, t, m: (h, w, t[:-1], m), "one row per row"),
    (lambda h, w, t, m: (h.double(), w, t, m), "cast one to the other"),
    (lambda h, w, t, m: (h, w, t, m[:-1]), "mask must be a bool tensor"),
    (lambda h, w, t, m: (h, w, t, m.float()), "mask must be a bool tensor"),
    (lambda h, w, t, m: (h, w, "logits", m), "teacher must be"),
    (lambda h, w, t, m: (h.long(), w, t, m), "dtype"),
    (lambda h, w, t, m: (h, w, TopK(torch.full((8, 3), 999), t[:, :3]), m), r"\[0, 101\)"),
    (lambda h, w, t, m: (h, w, Hidden(h, w[:-1]), m), "vocabulary mismatch"),
])
def test_bad_input_is_named(change, message):
    hidden, weight, teacher, mask = case(n=8, seed=12)
    h, w, t, m = change(hidden.float(), weight.float(), teacher.float(), mask)
    with pytest.raises(ValueError, match=message):
        linear_divergence(h, w, t, mask=m)


def test_bad_options_are_named():
    hidden, weight, teacher, _ = case(n=8, seed=13)
    h, t = hidden.float(), teacher.float()
    w = weight.float().requires_grad_(True)
    with pytest.raises(ValueError, match="reduction='none' with a weight"):
        linear_divergence(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="temperature"):
        top = t.topk(3, -1)
        linear_divergence(h, w, TopK(top.indices, top.values), temperature=2.0)
    with pytest.raises(ValueError, match="block_rows"):
        linear_divergence(h, w, t, block_rows=0)
    with pytest.raises(ValueError, match="unknown kind"):
        linear_divergence(h, w, t, kind="kl")
