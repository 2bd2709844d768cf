"""Pruning and recovery on the tiny random Llama (and a tiny GPT-2 for Conv1D): exact sparsity,
N:M in every group, layer-type selection, Wanda's scores, masks that survive training, recovery
that lowers KL to the dense teacher, a saved directory transformers loads alone, clear errors."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from promptbake import compress
from promptbake.compress import layer_types, prune


@pytest.fixture(scope="module")
def dense(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture
def model(dense):
    return copy.deepcopy(dense)


def random_ids(count=6, low=5, high=17, vocab=49152, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]


def linear_weights(model, kinds=("attention", "mlp")):
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach() for n, k in layer_types(model).items() if k in kinds}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("ratio", [0.5, 0.37])
def test_unstructured_sparsity_is_exact_in_every_layer(model, method, ratio):
    embed = model.get_input_embeddings().weight.detach().clone()
    report = prune(model, ratio, method=method, calibration=random_ids())
    weights = linear_weights(model)
    assert set(report.masks) == set(weights) and len(weights) == 14
    for row in report.layers:
        weight, mask = weights[row["name"]], report.masks[row["name"]]
        expected = round(ratio * weight.numel())
        assert row["pruned"] == expected == int((~mask).sum())
        assert row["zeros"] == int((weight == 0).sum()) == expected  # no zeros before here
        assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0)
    assert report.sparsity == pytest.approx(ratio, abs=1e-3)
    assert torch.equal(model.get_input_embeddings().weight, embed)  # embeddings / tied head


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_pattern_holds_in_every_group(model, pattern, method):
    n, m = map(int, pattern.split(":"))
    report = prune(model, pattern=pattern, method=method, calibration=random_ids())
    for name, weight in linear_weights(model).items():
        groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
        assert torch.all(groups == n), name
        assert torch.equal(report.masks[name], weight != 0)
    assert {r["amount"] for r in report.layers} == {pattern}
    assert report.sparsity == pytest.approx(1 - n / m)


def test_a_pattern_may_be_passed_as_the_sparsity(dense):
    first, second = copy.deepcopy(dense), copy.deepcopy(dense)
    by_sparsity, by_pattern = prune(first, "2:4"), prune(second, pattern="2:4")
    assert all(torch.equal(by_sparsity.masks[n], by_pattern.masks[n]) for n in by_pattern.masks)


def test_layer_types_and_selection(model, dense):
    types = layer_types(model)
    assert types["model.layers.0.self_attn.q_proj"] == "attention"
    assert types["model.layers.1.self_attn.o_proj"] == "attention"
    assert types["model.layers.0.mlp.down_proj"] == "mlp"
    assert types["lm_head"] == "lm_head"
    attention = {n: w.clone() for n, w in linear_weights(model, ("attention",)).items()}
    report = prune(model, 0.5, layers=("mlp",))
    assert {r["type"] for r in report.layers} == {"mlp"} and len(report.layers) == 6
    for name, weight in linear_weights(model, ("attention",)).items():
        assert torch.equal(weight, attention[name])
    mixed = prune(copy.deepcopy(dense), layers={"attention": 0.25, "mlp": "2:4"})
    assert {(r["type"], r["amount"]) for r in mixed.layers} == {("attention", "0.25"),
                                                               ("mlp", "2:4")}
    assert mixed.by_type() == pytest.approx({"attention": 0.25, "mlp": 0.5})


def test_lm_head_only_when_asked(model):
    report = prune(model, layers={"lm_head": 0.5})
    assert [r["name"] for r in report.layers] == ["lm_head"]
    head = model.get_output_embeddings().weight
    assert int((head == 0).sum()) == round(0.5 * head.numel())
    # tied: the embeddings are the same tensor, so they lose the same entries (with a warning)
    assert model.get_input_embeddings().weight.data_ptr() == head.data_ptr()


def test_gpt2_conv1d_is_pruned_along_its_inputs():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                      n_head=4)).eval()
    types = layer_types(gpt2)
    assert types["transformer.h.0.attn.c_attn"] == types["transformer.h.0.attn.c_proj"] == \
        "attention"
    assert types["transformer.h.0.mlp.c_fc"] == types["transformer.h.1.mlp.c_proj"] == "mlp"
    x = torch.randn(3, 128)
    before = gpt2.transformer.h[0].mlp.c_proj.weight.detach().clone()  # Conv1D: [in, out]
    report = prune(gpt2, pattern="2:4", method="wanda",
                   calibration=random_ids(vocab=64, high=30))
    modules = dict(gpt2.named_modules())
    for name in report.masks:
        weight = modules[name].weight.detach()  # [in, out]
        assert report.masks[name].shape == weight.shape
        per_group = (weight.t() != 0).reshape(weight.shape[1], -1, 4).sum(-1)
        assert torch.all(per_group == 2), name
    c_proj = gpt2.transformer.h[0].mlp.c_proj
    mask = report.masks["transformer.h.0.mlp.c_proj"]
    expected = x @ (before * mask) + c_proj.bias
    assert torch.allclose(c_proj(x), expected, atol=1e-5)


def test_ties_are_broken_deterministically(model):
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.weight.fill_(0.5)
    other = copy.deepcopy(model)
    first = prune(model, 0.5, layers=("attention",))
    again = prune(other, 0.5, layers=("attention",))
    for name in first.masks:
        assert torch.equal(first.masks[name], again.masks[name])
    keep = first.masks["model.layers.0.self_attn.q_proj"].flatten()
    half = keep.numel() // 2
    assert not keep[:half].any() and keep[half:].all()  # equal scores: lower indices go first


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.77])
def test_layer_comparison_equals_a_stable_sort_under_heavy_ties(ratio):
    scores = torch.randint(0, 5, (48, 64), generator=torch.Generator().manual_seed(1)).float()
    keep = compress.mask_from_scores(scores, compress.Amount(ratio=ratio), "layer")
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[scores.flatten().argsort(stable=True)[:round(ratio * scores.numel())]] = False
    assert torch.equal(keep, expected.view_as(keep))


def test_row_comparison_spreads_the_exact_count_over_rows(model):
    report = prune(model, 0.3, method="magnitude", compare="row")
    for row in report.layers:
        mask = report.masks[row["name"]]
        assert row["pruned"] == round(0.3 * mask.numel())
        per_row = (~mask).sum(1)
        assert per_row.max() - per_row.min() <= 1  # k // rows each, one more for k % rows rows


def test_wanda_scores_activation_norms(model):
    layer = model.model.layers[0]
    with torch.no_grad():  # inputs 0..7 of the attention projections carry large activations
        layer.input_layernorm.weight[:8] = 30.0
        layer.input_layernorm.weight[8:] = 0.05
    calibration = random_ids(count=7)
    seen = []
    handle = layer.self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for ids in calibration:  # one at a time: no padding
            model(input_ids=torch.tensor([ids]))
    handle.remove()
    expected = torch.cat(seen).pow(2).sum(0).sqrt()
    name = "model.layers.0.self_attn.q_proj"
    # batches of 3 sequences of different lengths: padding must not count
    norms = compress.input_norms(model, [name], calibration, batch_size=3)[name]
    assert torch.allclose(norms, expected, rtol=1e-4)

    original = layer.self_attn.q_proj.weight.detach().clone()
    magnitude = prune(copy.deepcopy(model), 0.5, layers=("attention",))
    wanda = prune(model, 0.5, method="wanda", layers=("attention",), calibration=calibration)
    mask = wanda.masks[name]
    assert not torch.equal(mask, magnitude.masks[name])
    assert bool(mask[:, :8].all())  # every weight on a loud input is kept...
    assert magnitude.masks[name][:, :8].float().mean() < 0.8  # ...which magnitude ignores
    assert torch.all((~mask).sum(1) == 32)  # Wanda compares within each output row
    # |W_ij| * ||X_j||: in every row, each pruned weight scores no higher than each kept one.
    scores = original.abs() * expected[None, :]
    pruned_max = scores.masked_fill(mask, float("-inf")).max(1).values
    kept_min = scores.masked_fill(~mask, float("inf")).min(1).values
    assert torch.all(pruned_max <= kept_min)


def test_wanda_ranks_within_rows_by_weight_times_norm():
    scores_weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 0.1])
    keep = compress.mask_from_scores(scores_weight * norms, compress.Amount(ratio=0.5), "row")
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False]]
    by_magnitude = compress.mask_from_scores(scores_weight, compress.Amount(ratio=0.5), "layer")
    assert by_magnitude.tolist() == [[False, False, True, True], [True, True, False, False]]


@pytest.fixture(scope="module")
def recovered(dense, tokenizer):
    student = copy.deepcopy(dense)
    data = compress.sample_responses(dense, tokenizer, count=4, samples_per_context=2,
                                     max_new_tokens=10)
    report = prune(student, 0.5, method="wanda", calibration=data)
    before = {n: student.get_submodule(n).weight.detach().clone() for n in report.masks}
    steps = []
    result = compress.recover(student, dense, tokenizer, masks=report, trajectories=data,
                              steps=8, lr=3e-3, batch_size=4, weight_decay=0.1, warmup=0.0,
                              eval_contexts=4, max_new_tokens=10,
                              progress=lambda step, total, kl: steps.append((step, total)))
    return student, report, before, result, steps


def test_masks_persist_through_recovery(recovered):
    student, report, before, _, steps = recovered
    compress.check_masks(student, report)
    for name, mask in report.masks.items():
        weight = student.get_submodule(name).weight.detach()
        assert torch.all(weight[~mask] == 0), name  # exactly zero, weight decay and all
        assert not torch.equal(weight[mask], before[name][mask])  # the rest was trained
    assert steps[-1] == (8, 8) and len(steps) == 8
    assert not any(p.requires_grad is False for p in student.parameters())  # flags restored


def test_recovery_lowers_kl_to_the_dense_teacher(recovered):
    _, _, _, result, _ = recovered
    before, after = result["kl_before"], result["kl_after"]
    assert before["per_sequence"] > 0 and after["per_sequence"] < before["per_sequence"]
    assert 0 < result["kl_reduction"] < 1
    history = result["train_kl_per_token"]
    assert len(history) == 8 and history[-1][1] < history[0][1]
    assert result["trainable_parameters"] == sum(m.numel() for m in recovered[1].masks.values())
    assert set(result["seconds"]) >= {"sample", "measure_before", "train", "measure_after"}


def test_kl_of_the_dense_model_to_itself_is_zero(dense, tokenizer):
    traj, prefixes = compress.sample_responses(dense, tokenizer, count=2, samples_per_context=1,
                                               max_new_tokens=6, cache="none")
    kl = compress.kl_to_teacher(copy.deepcopy(dense), dense, prefixes, traj)
    assert kl.per_sequence == pytest.approx(0.0, abs=1e-5) and kl.sequences == 2


def test_save_pruned_round_trip(model, tokenizer, tmp_path):
    report = prune(model, pattern="2:4")
    out = compress.save_pruned(model, tokenizer, tmp_path / "pruned", report,
                               recovery={"steps": 0}, extra={"source": "test"})
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    for name, weight in linear_weights(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, weight)
    ids = torch.tensor([random_ids(1)[0]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    manifest = json.loads((out / compress.MANIFEST).read_text())
    assert manifest["pruning"]["sparsity"] == pytest.approx(0.5)
    assert len(manifest["pruning"]["layers"]) == 14 and manifest["source"] == "test"
    masks = compress.load_masks(out)
    assert set(masks) == set(report.masks)
    assert all(torch.equal(masks[n], report.masks[n]) for n in masks)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(ValueError, match="earlier pruned export: pass --overwrite"):
        compress.save_pruned(model, tokenizer, out, report)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # pruned entries revived
    with pytest.raises(ValueError, match="no longer zero"):
        compress.save_pruned(model, tokenizer, tmp_path / "other", report)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=0.0), r"sparsity=0\.0 is outside \(0, 1\)"),
    (dict(sparsity=1.0), r"sparsity=1\.0 is outside"),
    (dict(sparsity=-0.2), r"outside \(0, 1\)"),
    (dict(sparsity=float("nan")), "outside"),
    (dict(sparsity=True), "fraction of weights"),
    (dict(pattern="4:4"), r"'4:4'.*1 <= N < M"),
    (dict(pattern="0:4"), "1 <= N < M"),
    (dict(pattern="5:4"), "1 <= N < M"),
    (dict(pattern="2-4"), r"'2-4' is neither a ratio nor an N:M pattern"),
    (dict(pattern="0.5"), r"pattern='0\.5' is not an N:M pattern"),
    (dict(pattern="1:128"), r"1:128 does not divide .* 64 inputs"),
    (dict(pattern="2:3"), r"2:3 does not divide"),
    (dict(sparsity=0.3, pattern="2:4"), "disagrees with pattern"),
    (dict(), "nothing to prune"),
    (dict(sparsity=0.5, method="l1"), r"unknown pruning method 'l1'"),
    (dict(sparsity=0.5, method="wanda"), "needs calibration data"),
    (dict(sparsity=0.5, method="wanda", calibration=[]), "no tokens"),
    (dict(sparsity=0.5, method="wanda", calibration=[[1, 2, 10 ** 6]]), "outside the model's"),
    (dict(sparsity=0.5, layers=("attention", "conv")), r"unknown layer type 'conv'"),
    (dict(sparsity=0.5, layers=()), "selects no layer type"),
    (dict(sparsity=0.5, layers={"mlp": 0.5}), "must be None"),
    (dict(layers={"mlp": 1.5}), r"layers\['mlp'\]=1\.5 is outside"),
    (dict(sparsity=0.5, compare="column"), "compare='column'"),
])
def test_bad_prune_arguments_change_nothing(model, kwargs, match):
    sparsity = kwargs.pop("sparsity", None)
    before = {n: w.clone() for n, w in linear_weights(model).items()}
    with pytest.raises(ValueError, match=match):
        prune(model, sparsity, **kwargs)
    for name, weight in linear_weights(model).items():
        assert torch.equal(weight, before[name]), name  # nothing half-pruned


def test_a_model_with_lora_is_refused(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merged copy"):
        prune(peft_model, 0.5)


def test_bad_recover_arguments(dense, model, tokenizer):
    report = prune(model, 0.5)
    ok = dict(masks=report, steps=1, eval_contexts=1, train_contexts=1, max_new_tokens=2)
    cases = [
        (model, dense, dict(ok, steps=0), "steps=0 must be >= 1"),
        (model, dense, dict(ok, lr=0.0), "lr=0.0 must be > 0"),
        (model, dense, dict(ok, train="head"), "train='head'"),
        (model, model, ok, "the teacher is the student"),
        (model, dense, dict(ok, masks={}), "masks is empty"),
        (model, dense, dict(ok, masks={"model.nowhere": torch.ones(2, dtype=torch.bool)}),
         "not a layer of this model"),
        (model, dense, dict(ok, masks={"lm_head": torch.ones(3, 3, dtype=torch.bool)}),
         "shaped like the weights"),
        (model, model.model, ok, "teacher shares weights"),
    ]
    for student, teacher, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            compress.recover(student, teacher, tokenizer, **kwargs)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.add_(1.0)
    with pytest.raises(ValueError, match="no longer zero"):
        compress.recover(model, dense, tokenizer, **ok)


@pytest.mark.slow
def test_default_model_prunes_exactly(smollm2_dir):
    real = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = [random_ids(1, low=24, high=25)[0]]
    with torch.no_grad():
        logits = real(input_ids=torch.tensor(ids)).logits
    report = prune(real, pattern="2:4")
    assert len(report.layers) == 30 * 7 and report.seconds["total"] > 0
    # Dequantised from 4-bit GGUF, the model has exact zeros of its own: more than half are zero.
    assert report.sparsity >= 0.5
    assert all(r["pruned"] == r["numel"] // 2 for r in report.layers)
    for name, mask in report.masks.items():
        weight = real.get_submodule(name).weight.detach()
        assert torch.all(mask.reshape(weight.shape[0], -1, 4).sum(-1) == 2), name
        assert torch.all(weight[~mask] == 0), name
    with torch.no_grad():
        pruned = real(input_ids=torch.tensor(ids)).logits
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, logits)


def test_pruner_for_export_prunes_and_recovers(tiny_dir):
    from promptbake import BakeConfig, bake

    config = BakeConfig(train_contexts=2, eval_contexts=2, samples_per_context=1,
                        max_new_tokens=6, sample_batch=4, batch_size=2, steps=2)
    baked = bake("You are a pirate.", model=tiny_dir, config=config)
    model = copy.deepcopy(baked.model).merge_and_unload()
    with pytest.raises(ValueError, match="outside"):
        compress.pruner(baked, 1.5)
    record = compress.pruner(baked, "0.5", recover_steps=2, contexts=2)(model)
    assert record.to_dict()["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert record["recovery"]["kl_after"]["per_token"] >= 0
