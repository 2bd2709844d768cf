"""SparseLinear: built from nn.Linear and back, saved and loaded, put into a model by sparsify."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptbake.nn import SparseLinear, sparsify


def pruned_linear(out, inp, sparsity, *, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        linear.weight[torch.rand(out, inp) < sparsity] = 0
    return linear


def test_from_dense_to_dense_round_trip():
    linear = pruned_linear(33, 70, 0.7)
    layer = SparseLinear.from_dense(linear)
    assert (layer.in_features, layer.out_features) == (70, 33)
    assert layer.sparsity == pytest.approx(float((linear.weight == 0).float().mean()))
    back = layer.to_dense()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    x = torch.randn(2, 5, 70)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-6)
    assert "sparsity=0.7" in repr(layer)
    assert layer.weight.shape == (33, 70)  # for code that reads .weight of a linear layer
    assert list(layer.parameters()) == []  # frozen: buffers only


def test_mask_keeps_exactly_what_it_says():
    linear = pruned_linear(8, 40, 0.0, bias=False)
    mask = torch.rand(8, 40, generator=torch.Generator().manual_seed(1)) < 0.25
    layer = SparseLinear.from_dense(linear, mask)
    assert layer.nnz == int(mask.sum()) and layer.bias is None
    assert torch.equal(layer.to_dense().weight, torch.where(mask, linear.weight, 0.0))
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), F.linear(x, torch.where(mask, linear.weight, 0.0)))


def test_bfloat16_values_equal_a_dense_layer_with_the_same_rounded_weights():
    linear = pruned_linear(16, 96, 0.7, seed=2)
    layer = SparseLinear.from_dense(linear, dtype=torch.bfloat16)
    assert layer.values.dtype == torch.bfloat16
    rounded = linear.weight.detach().bfloat16().double()
    x = torch.randn(4, 96)
    want = F.linear(x.double(), rounded, linear.bias.detach().double())  # bias kept as it was
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_into_a_fresh_layer():
    layer = SparseLinear.from_dense(pruned_linear(20, 50, 0.6, seed=3))
    fresh = SparseLinear(50, 20)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.nnz == layer.nnz
    x = torch.randn(3, 50)
    assert torch.equal(fresh(x), layer(x))
    model = nn.Sequential(SparseLinear(50, 20))
    model.load_state_dict(nn.Sequential(layer).state_dict())
    assert torch.equal(model(x), layer(x))


def test_corrupt_state_dict_is_refused():
    state = SparseLinear.from_dense(pruned_linear(4, 40, 0.5, seed=4)).state_dict()
    state["row_offsets"] = state["row_offsets"] + 1
    with pytest.raises(ValueError, match="row_offsets"):
        SparseLinear(40, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="in_features"):
        SparseLinear(0, 3)


def test_weight_gradient_is_refused_and_x_gradient_flows():
    linear = pruned_linear(6, 30, 0.5, seed=5)
    layer = SparseLinear.from_dense(linear)
    x = torch.randn(2, 30, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(2, 30))
    layer.values.requires_grad_(True)
    with pytest.raises(ValueError, match="inference only"):
        layer(x)


def test_sparsify_on_the_tiny_llama(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prune_by_magnitude(model, 0.7)
    ids = torch.tensor([[1, 42, 7, 300, 9, 11]])
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    # min_speedup close to 0: every pruned layer is swapped whatever the timing says.
    records = sparsify(model, min_speedup=1e-9, repeats=1)
    by_name = {r["name"]: r for r in records}
    assert len(records) == 2 * 7 + 1
    assert not by_name["lm_head"]["chosen"] and "tied" in by_name["lm_head"]["reason"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    proj = by_name["model.layers.0.mlp.down_proj"]
    assert proj["chosen"] and proj["shape"] == [64, 128]
    assert proj["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert proj["dense_us"] > 0 and proj["sparse_us"] > 0
    swapped = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_sparsify_keeps_dense_when_sparse_is_not_faster_enough():
    model = nn.Sequential(pruned_linear(32, 64, 0.5), nn.ReLU(), nn.Linear(32, 8))
    records = sparsify(model, min_speedup=1e9, repeats=1, batch_size=3)
    assert [r["chosen"] for r in records] == [False, False]
    assert records[0]["speedup"] > 0 and "< 1000000000" in records[0]["reason"]
    assert records[1]["reason"] == "no zeros"
    assert all(type(m) is not SparseLinear for m in model.modules())
    with pytest.raises(ValueError, match="batch_size"):
        sparsify(model, batch_size=0)


def prune_by_magnitude(model, fraction):
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                w = module.weight
                w[w.abs() < w.abs().flatten().kthvalue(int(fraction * w.numel())).values] = 0


@pytest.mark.slow
def test_sparsify_on_the_default_model(smollm2_dir):
    from promptbake import models

    model, _, _ = models.load(smollm2_dir)
    prune_by_magnitude(model, 0.7)
    ids = torch.tensor([[1, 4093, 314, 253, 2365, 30, 198]])
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    records = sparsify(model, repeats=1)  # the real decision: whatever was measured here
    shapes = {r["name"].rsplit(".", 1)[-1]: r["shape"] for r in records}
    assert shapes == {"q_proj": [576, 576], "k_proj": [192, 576], "v_proj": [192, 576],
                      "o_proj": [576, 576], "gate_proj": [1536, 576], "up_proj": [1536, 576],
                      "down_proj": [576, 1536], "lm_head": [49152, 576]}
    assert all(r["dense_us"] > 0 and r["sparse_us"] > 0 for r in records if r["name"] != "lm_head")
    chosen = {r["name"] for r in records if r["chosen"]}
    assert chosen == {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    # 30 layers of fp32 sums in another order: logits of size ~10 move by up to ~1e-3.
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=2e-3)
    assert torch.equal(logits.argmax(-1), dense_logits.argmax(-1))
