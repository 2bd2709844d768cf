"""The training steps as public pieces: LoRA on the right layers, a batch plan that is a pure
function of (seed, step), the schedule, Eq. 3's objective from cached or live teacher targets,
and an optimizer step that takes any objective."""

import contextlib
import math
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from promptbake import BakeConfig, modeling, train
from promptbake.framing import Framing
from promptbake.trajectories import Trajectories
from promptbake.train import (Clock, Divergence, attach_lora, batch_plan, first_token_weights,
                              lr_factor, make_optimizer, optimizer_step, sample_trajectories)

CONTEXTS = [[{"role": "user", "content": q}] for q in
            ("What is the capital of France?", "How do I boil an egg?", "Hi!", "Name a river.")]


def config(**changes) -> BakeConfig:
    base = dict(samples_per_context=2, max_new_tokens=6, sample_batch=8, batch_size=4, steps=4,
                lr=2e-2, warmup=0.0)
    return BakeConfig(**{**base, **changes})


def moved(model) -> None:
    """Make the student differ from the teacher (LoRA B starts at 0), so losses are not zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


@pytest.fixture
def setup(tiny_dir, tokenizer, prompt):
    """(student, prefixes, trajectories with a full teacher cache) on the tiny model."""
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), config())
    framing = Framing(tokenizer, prompt)
    prefixes = [(framing.teacher_ids(c), framing.student_ids(c)) for c in CONTEXTS]
    with modeling.BASE.active(model):
        trajectories = sample_trajectories(model, tokenizer, [p[0] for p in prefixes], config(),
                                           "full", seed=0, samples=2)
    return model, prefixes, trajectories, tokenizer.pad_token_id


def test_attach_lora_on_attention_projections_starts_at_the_base(tiny_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    model = attach_lora(lm, config(rank=2, alpha=4.0))
    names = {n.split(".lora_")[0].split(".")[-1] for n, p in model.named_parameters()
             if p.requires_grad}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert model.peft_config["default"].r == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # B = 0 at the start


def test_batch_plan_is_a_pure_function_of_seed_and_step(setup):
    _, _, trajectories, _ = setup
    cfg = config(grad_accum=2)
    first = [batch_plan(step, trajectories, cfg) for step in range(4)]
    assert first == [batch_plan(step, trajectories, cfg) for step in range(4)]
    assert all(len(step) == 2 for step in first)  # micro-batches per step
    # whole contexts: a context's samples stay together
    for step in first:
        for batch in step:
            contexts = [trajectories.context_index[k] for k in batch]
            assert all(contexts.count(c) == 2 for c in set(contexts))
    # an epoch is a permutation: 4 contexts, 2 per micro-batch, 2 micro-batches per step
    epoch = {trajectories.context_index[k] for batch in first[0] for k in batch}
    assert epoch == {0, 1, 2, 3}
    assert batch_plan(0, trajectories, config(grad_accum=2, seed=1)) != first[0]


def test_lr_schedule_warms_up_then_decays():
    f = lr_factor(config(warmup=0.25, schedule="cosine"), 8)
    assert [f(s) for s in range(2)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and 0 < f(7) < f(4) < 1
    linear = lr_factor(config(warmup=0.0, schedule="linear"), 4)
    assert [linear(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(config(warmup=0.0, schedule="constant"), 4)(3) == 1.0


def test_lora_plus_gives_the_b_factors_their_own_learning_rate(setup):
    model = setup[0]
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer, schedule = make_optimizer(model, config(lr=1e-3, lr_b_ratio=16.0, warmup=0.5), 4)
    a, b = optimizer.param_groups
    assert {id(p) for p in b["params"]} == {id(p) for n, p in lora.items() if "lora_B" in n}
    assert len(a["params"]) == len(b["params"]) == len(lora) // 2
    assert a["lr"] == pytest.approx(0.5e-3) and b["lr"] == pytest.approx(8e-3)  # warm-up step 0
    schedule.step()
    assert b["lr"] / a["lr"] == pytest.approx(16.0)
    only, _ = make_optimizer(model, config(), 4)
    assert len(only.param_groups) == 1  # the default: one group, as before the ratio
    with pytest.raises(ValueError, match="lr_b_ratio=0.0 must be > 0"):
        config(lr_b_ratio=0.0).validate()


def test_adam_beta2_is_the_optimizers_second_moment_decay(setup):
    model = setup[0]
    assert make_optimizer(model, config(), 4)[0].param_groups[0]["betas"] == (0.9, 0.999)
    optimizer, _ = make_optimizer(model, config(adam_beta2=0.95), 4)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    for wrong in (0.0, 1.0):
        with pytest.raises(ValueError, match=f"adam_beta2={wrong} must be in"):
            config(adam_beta2=wrong).validate()
    # added after bakes and engine runs were made: at its default it is left out of what a
    # resumed bake or engine run must share, so those still resume
    from promptbake.config import resume_identity
    from promptbake.engine import outcome_settings

    assert "adam_beta2" not in resume_identity(config()) | outcome_settings(config())
    assert resume_identity(config(adam_beta2=0.95))["adam_beta2"] == 0.95
    assert outcome_settings(config(adam_beta2=0.95))["adam_beta2"] == 0.95


def test_cached_and_live_teachers_give_the_same_loss(setup):
    model, prefixes, trajectories, pad = setup
    batch = batch_plan(0, trajectories, config())[0]
    moved(model)
    with torch.no_grad():
        cached, n = Divergence(trajectories, prefixes, config(), pad)(model, batch)
        live, m = Divergence(trajectories, prefixes, config(teacher="live"), pad)(model, batch)
    assert n == m == sum(len(trajectories.responses[k]) for k in batch)
    assert float(cached) > 0
    # the cache holds fp16 log-probabilities: equal to the live teacher to fp16's precision
    assert float(cached) == pytest.approx(float(live), rel=2e-3)


@pytest.mark.parametrize("teacher, cache, precision", [
    ("cached", "full", "fp32"), ("cached", "topk", "fp32"), ("live", "full", "fp32"),
    ("cached", "full", "bf16")])
def test_fused_head_gives_the_loss_and_gradients_of_the_logits(setup, tokenizer, teacher, cache,
                                                               precision, monkeypatch):
    """The frozen head applied inside the loss (ops.linear_divergence) against the head's
    logits then the divergence: same loss, same LoRA gradients."""
    model, prefixes, trajectories, pad = setup
    if cache == "topk":
        with modeling.BASE.active(model):
            trajectories = sample_trajectories(model, tokenizer, [p[0] for p in prefixes],
                                               config(topk=8), "topk", seed=0, samples=2)
    cfg = config(teacher=teacher, precision=precision)
    batch = batch_plan(0, trajectories, cfg)[0]
    moved(model)
    assert modeling.fused_head(model) is not None
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    def loss_and_grads():
        loss, n = Divergence(trajectories, prefixes, cfg, pad)(model, batch)
        return float(loss.detach()), n, torch.autograd.grad(loss, lora)

    fused = loss_and_grads()
    monkeypatch.setenv(modeling.FUSED_HEAD_ENV, "0")  # the unfused path, as a user turns it on
    assert modeling.fused_head(model) is None
    unfused = loss_and_grads()
    assert fused[1] == unfused[1] and fused[0] > 0
    # bf16: the same roundings (logits, then their gradient, each rounded once to bf16)
    rtol = 1e-5 if precision == "fp32" else 1e-3
    assert fused[0] == pytest.approx(unfused[0], rel=rtol)
    for a, b in zip(fused[2], unfused[2]):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=rtol * float(b.abs().max()))


def test_the_head_held_in_bf16_gives_what_autocast_casts_each_step(setup, monkeypatch):
    model, prefixes, trajectories, pad = setup
    cfg = config(precision="bf16")
    batch = batch_plan(0, trajectories, cfg)[0]
    moved(model)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    objective = Divergence(trajectories, prefixes, cfg, pad)

    def loss_and_grads():
        loss, _ = objective(model, batch)
        return loss.detach(), torch.autograd.grad(loss, lora)

    held = loss_and_grads()
    copy = objective._head(model, torch.bfloat16)
    assert copy.dtype == torch.bfloat16 and copy is objective._head(model, torch.bfloat16)
    assert modeling.fused_head(model).dtype == torch.float32  # the model's own head untouched
    with monkeypatch.context() as m:  # autocast casting the fp32 head inside the step
        m.setattr(Divergence, "_head", lambda self, model, dtype: modeling.fused_head(model))
        cast = loss_and_grads()
    assert torch.equal(held[0], cast[0])
    assert all(torch.equal(a, b) for a, b in zip(held[1], cast[1]))
    with torch.no_grad():  # a changed head is cast again
        modeling.fused_head(model).mul_(1.0)
    assert objective._head(model, torch.bfloat16) is not copy
    assert objective._head(model, None).dtype == torch.float32  # fp32 matmuls: as it is


def test_first_token_weights_mark_each_responses_first_row():
    assert first_token_weights([[[1, 2, 3]], [[4], [5, 6]]], 1.0) is None
    assert first_token_weights([[[1, 2, 3]], [[4], [5, 6]]], 8.0).tolist() == \
        [8.0, 1.0, 1.0, 8.0, 8.0, 1.0]


@pytest.mark.parametrize("fused", [True, False])
def test_first_token_weight_adds_the_first_rows_again(setup, fused, monkeypatch):
    """Weight w on the first token = the unweighted loss plus (w - 1) x the first rows' loss,
    on the fused and the unfused path; weight 1 is the unweighted loss exactly."""
    model, prefixes, trajectories, pad = setup
    if not fused:
        monkeypatch.setenv(modeling.FUSED_HEAD_ENV, "0")
    assert (modeling.fused_head(model) is not None) == fused
    batch = batch_plan(0, trajectories, config())[0]
    moved(model)
    with torch.no_grad():
        plain, n = Divergence(trajectories, prefixes, config(), pad)(model, batch)
        one, _ = Divergence(trajectories, prefixes, config(first_token_weight=1.0), pad)(
            model, batch)
        heavy, m = Divergence(trajectories, prefixes, config(first_token_weight=5.0), pad)(
            model, batch)
        # the first rows' loss: the same trajectories cut to their first token
        starts = torch.tensor(trajectories.offsets[:-1])
        first_only = Trajectories(trajectories.context_index,
                                  [r[:1] for r in trajectories.responses], "full",
                                  trajectories.full_logprobs[starts])
        firsts, _ = Divergence(first_only, prefixes, config(), pad)(model, batch)
    assert n == m and float(one) == float(plain)
    assert float(heavy) == pytest.approx(float(plain) + 4.0 * float(firsts), rel=1e-4)
    assert float(heavy) > float(plain) > 0


def test_first_token_weight_must_be_positive():
    with pytest.raises(ValueError, match="first_token_weight=0"):
        config(first_token_weight=0.0).validate()


def test_fused_head_only_where_the_head_is_used_as_is(tiny_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert modeling.fused_head(attach_lora(lm, config())) is lm.lm_head.weight
    adapted = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_dir),
                          config(target_modules=["q_proj", "lm_head"]))
    assert modeling.fused_head(adapted) is None  # the LoRA delta on the head must apply
    capped = AutoModelForCausalLM.from_pretrained(tiny_dir)
    capped.config.final_logit_softcapping = 30.0
    assert modeling.fused_head(capped) is None


def test_optimizer_step_takes_any_objective(setup):
    """An objective with an extra term (an L2 pull of the LoRA weights) goes through the same
    step: no branch in the training step knows about it."""
    model, prefixes, trajectories, pad = setup
    cfg = config(steps=3)
    eq3 = Divergence(trajectories, prefixes, cfg, pad)

    class Regularised:
        def __init__(self, weight):
            self.weight = weight

        def __call__(self, student, batch):
            loss, tokens = eq3(student, batch)
            penalty = sum((p ** 2).sum() for p in student.parameters() if p.requires_grad)
            return loss + self.weight * penalty * tokens, tokens

    optimizer, schedule = make_optimizer(model, cfg, cfg.steps)
    values = [optimizer_step(model, Regularised(0.1), batch_plan(s, trajectories, cfg),
                             optimizer, schedule, cfg.max_grad_norm) for s in range(cfg.steps)]
    assert all(math.isfinite(v) for v in values)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(float(p.detach().abs().sum()) > 0 for p in lora)  # it trained
    assert schedule.last_epoch == cfg.steps


def test_clock_adds_up_phases():
    clock = Clock()
    for _ in range(2):
        with clock("train"):
            pass
    seconds = clock.seconds()
    assert set(seconds) == {"train", "total"} and seconds["train"] <= seconds["total"]


def test_sample_precision_is_fp32_unless_asked():
    cpu = torch.device("cpu")
    assert BakeConfig(precision="bf16").sampling_dtype(cpu) is None  # fp32 unless asked
    assert BakeConfig(precision="fp32", sample_precision="bf16").sampling_dtype(cpu) \
        is torch.bfloat16
    assert BakeConfig(precision="bf16", sample_precision="auto").sampling_dtype(cpu) \
        is torch.bfloat16
    assert BakeConfig(precision="fp32", sample_precision="auto").sampling_dtype(cpu) is None
    assert BakeConfig(sample_precision="auto").sampling_dtype(cpu) is \
        BakeConfig().autocast_dtype(cpu)
    with pytest.raises(ValueError, match="sample_precision='fp16': choose one of auto, fp32"):
        BakeConfig(sample_precision="fp16").validate()


def test_bf16_sampling_records_the_bf16_teachers_targets(setup, tokenizer):
    """Sampled under bf16 autocast, the recorded targets are the bf16 teacher's distributions
    (recomputed here on the same tokens, whole sequences at once), not the fp32 teacher's."""
    model, prefixes, _, pad = setup
    with modeling.BASE.active(model):
        drawn = sample_trajectories(model, tokenizer, [p[0] for p in prefixes], config(),
                                    "full", seed=0, samples=2, dtype=torch.bfloat16)
        groups = drawn.by_context()
        responses = [[drawn.responses[k] for k in groups[c]] for c in sorted(groups)]
        teacher = [prefixes[c][0] for c in sorted(groups)]
        with torch.no_grad():
            recomputed = {dtype: torch.log_softmax(modeling.response_logits(
                model, teacher, responses, pad, dtype), dim=-1)
                for dtype in (None, torch.bfloat16)}
    recorded = drawn.full_logprobs.float()
    assert recorded.shape == recomputed[None].shape

    def kl(other):  # mean KL(recorded || other) per token
        return float((recorded.exp() * (recorded - other)).sum(-1).mean())

    to_bf16, to_fp32 = kl(recomputed[torch.bfloat16]), kl(recomputed[None])
    assert to_bf16 < to_fp32 / 4, (to_bf16, to_fp32)


@pytest.mark.parametrize("kind", ["Llama", "Mistral", "Qwen2", "Qwen3"])
def test_for_training_packs_with_grouped_attention_and_computes_what_eager_does(kind):
    # On CPU, for_training runs these architectures with GROUPED attention, under which
    # response_hidden packs a batch into one row: the same hidden states and LoRA gradients as
    # eager attention on padded rows (fp32; different prompt and response lengths).
    import transformers

    torch.manual_seed(0)
    extra = {"sliding_window": None} if kind in ("Mistral", "Qwen2", "Qwen3") else {}
    lm = getattr(transformers, f"{kind}ForCausalLM")(getattr(transformers, f"{kind}Config")(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **extra))
    model = attach_lora(lm, config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    moved(model)
    prefixes = [[1, 2, 3, 4, 5], [1, 2, 3, 6], [7, 8]]
    responses = [[[9, 10, 11], [12]], [[13, 14]], [[15, 16, 17, 18], [19, 20]]]
    probe = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))
    runs = {}
    for name in ("eager", modeling.GROUPED):
        model.zero_grad()
        with modeling.use_attention(model, "eager") if name == "eager" else \
                train.for_training(model, None):
            assert modeling.inner(model).config._attn_implementation == name
            hidden = modeling.response_hidden(model, prefixes, responses, pad_id=0)
            (hidden * probe).sum().backward()
        runs[name] = hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None}
    assert modeling.inner(model).config._attn_implementation != modeling.GROUPED
    (eager, eager_grads), (grouped, grouped_grads) = runs.values()
    torch.testing.assert_close(grouped, eager, atol=1e-5, rtol=1e-5)
    assert eager_grads.keys() == grouped_grads.keys() and len(eager_grads) == 16
    for name, grad in eager_grads.items():
        assert float((grouped_grads[name] - grad).norm() / grad.norm()) < 1e-4, name


def test_grouped_attention_is_chosen_only_where_it_computes_what_eager_does():
    import transformers

    def fits(kind, **extra):
        return modeling.grouped_fits(getattr(transformers, f"{kind}Config")(**extra))

    assert fits("Llama") and fits("Qwen2", sliding_window=None) and fits("Qwen3")
    for on in (False, True):  # a sliding window configured, and switched off or on
        window = types.SimpleNamespace(model_type="qwen2", sliding_window=8,
                                       use_sliding_window=on)
        assert modeling.grouped_fits(window) is not on
    assert not fits("Mistral", sliding_window=8)
    assert not fits("Llama", attention_dropout=0.1)
    assert not fits("Gemma2") and not fits("GPT2")


def test_for_training_casts_each_norm_once_with_the_same_forward_and_undoes_everything(tiny_dir):
    # Under bf16 autocast the norms give bf16 (a hook) and PEFT does not cast LoRA inputs back
    # to fp32: the same forward pass to the bit as autocast casting for every reader. On an
    # error inside, the hooks, PEFT's casting, the fp32 weights and the attention come back.
    import peft.helpers

    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), config())
    moved(model)
    lm = modeling.inner(model)
    prefixes, responses = [[1, 2, 3, 4], [5, 6]], [[[7, 8, 9], [10]], [[11, 12]]]
    outs = []
    for plain in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if plain:
                patch.setattr(train, "_norms_in", lambda lm, dtype: [])
                patch.setattr(peft.helpers, "disable_input_dtype_casting",
                              lambda model, active=True: contextlib.nullcontext())
            with train.for_training(model, torch.bfloat16):
                hooks = sum(len(layer.input_layernorm._forward_hooks) for layer in lm.model.layers)
                assert hooks == (0 if plain else len(lm.model.layers))
                outs.append(modeling.response_hidden(model, prefixes, responses, 0,
                                                     torch.bfloat16))
    assert torch.equal(outs[0], outs[1])
    attention = lm.config._attn_implementation
    weight = lm.model.layers[0].mlp.up_proj.weight
    with pytest.raises(RuntimeError, match="inside"):
        with train.for_training(model, torch.bfloat16):
            assert weight.dtype == torch.bfloat16
            raise RuntimeError("inside")
    assert weight.dtype == torch.float32 and lm.config._attn_implementation == attention
    assert not any(m._forward_hooks for m in lm.modules())
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_A"))
