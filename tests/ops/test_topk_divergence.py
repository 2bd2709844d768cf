"""The top-k (bucketed) divergence against an independent float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from promptbake.ops import divergence
from promptbake.ops.topk_divergence import topk_divergence

KINDS = ["forward_kl", "reverse_kl", "jsd"]


def reference(z, ids, lp, kind, beta, mask, reduction):
    x = z.detach().double().requires_grad_(True)
    lq = F.log_softmax(x, -1)
    lqk = lq.gather(-1, ids)
    lpk = lp.double()
    LQ = torch.cat([lqk, torch.log1p(-lqk.exp().sum(-1, keepdim=True))], -1)
    LP = torch.cat([lpk, torch.log1p(-lpk.exp().sum(-1, keepdim=True))], -1)
    Q, P = LQ.exp(), LP.exp()
    kl = lambda w, a, b: (w * torch.where(w > 0, a - b, 0.0)).sum(-1)
    if kind == "forward_kl":
        rows = kl(P, LP, LQ)
    elif kind == "reverse_kl":
        rows = kl(Q, LQ, LP)
    else:
        LM = torch.logaddexp(LP + math.log(beta), LQ + math.log1p(-beta))
        rows = beta * kl(P, LP, LM) + (1 - beta) * kl(Q, LQ, LM)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    kept = int(mask.sum()) if mask is not None else len(rows)
    loss = {"sum": rows.sum(), "batchmean": rows.sum() / kept, "none": rows,
            "mean": rows.sum() / (kept * z.shape[1])}[reduction]
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), x.grad


def case(n=5, vocab=300, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * 2
    t = torch.randn(n, vocab, generator=g) * 2
    lp, ids = torch.log_softmax(t, -1).topk(k, dim=-1)
    return z, ids, lp


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none", "mean"])
def test_matches_reference(kind, reduction):
    z, ids, lp = case()
    mask = torch.tensor([True, False, True, True, True])
    x = z.clone().requires_grad_(True)
    out = topk_divergence(x, ids, lp, kind=kind, beta=0.3, mask=mask, reduction=reduction)
    (out.sum() if reduction == "none" else out).backward()
    ref, gref = reference(z, ids, lp, kind, 0.3, mask, reduction)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), gref, rtol=1e-4, atol=1e-7)
    assert (x.grad[1] == 0).all()


def test_all_tokens_in_the_top_k_is_the_full_divergence():
    z, _, _ = case(k=1)
    t = torch.randn_like(z)
    lp, ids = torch.log_softmax(t, -1).topk(z.shape[1], dim=-1)
    a = topk_divergence(z, ids, lp)
    b = divergence(z, t)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_is_a_lower_bound_of_the_full_divergence():
    z, ids, lp = case(k=8)
    t = torch.randn_like(z)  # not used: build a teacher whose top-k is (ids, lp)
    full_teacher = torch.full_like(z, -30.0).scatter(-1, ids, lp)
    lower = topk_divergence(z, ids, torch.log_softmax(full_teacher, -1).gather(-1, ids))
    assert float(lower) <= float(divergence(z, full_teacher)) + 1e-6
    del t


@pytest.mark.parametrize("bad,message", [
    (dict(ids=torch.zeros(5, 3, dtype=torch.long), lp=torch.zeros(5, 4)), "must both be"),
    (dict(ids=torch.full((5, 12), 300)), "must lie in"),
    (dict(ids=torch.zeros(5, 12)), "expected int64"),
    (dict(kind="kl"), "unknown kind"),
])
def test_bad_input(bad, message):
    z, ids, lp = case()
    kw = {"ids": ids, "lp": lp, **bad}
    with pytest.raises(ValueError, match=message):
        topk_divergence(z, kw.pop("ids"), kw.pop("lp"), **kw)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fp16_gradient_keeps_the_reduction_factor_out(reduction):
    # As for divergence (test_divergence.py): fp16 saves the gradient without 1 / rows, and
    # backward multiplies by factor x upstream in fp32. With 4096 rows the old saved gradient
    # lost most entries below fp16's smallest subnormal.
    z, ids, lp = case(n=4096, vocab=64, k=4, seed=1)
    z = (z * 2).half()
    x = z.clone().requires_grad_(True)
    upstream = 2.0**16 if reduction == "batchmean" else torch.full((4096,), 16.0)
    out = topk_divergence(x, ids, lp, reduction=reduction)
    (out * upstream).sum().backward()
    _, gref = reference(z.float(), ids, lp, "forward_kl", 0.5, None, reduction)
    want = gref * (upstream if reduction == "batchmean" else upstream.double()[:, None])
    torch.testing.assert_close(x.grad.double(), want, rtol=2**-9, atol=2**-20)
