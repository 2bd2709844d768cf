"""Stacked LoRA deltas are exact: a bake on top of a bake, stacked into one adapter, gives the
merged model's logits at every strength."""

import torch

from promptbake import load_baked, modeling
from promptbake.orchestrate import LoraStack, bake_on_top, lora_deltas, stack


def test_stacked_adapters_equal_merged_bakes_on_top(tiny_dir, first, round_config,
                                                   model_logits):
    baked = load_baked(first, strength=0.7)
    top, deltas = bake_on_top(baked, "Answer in French.", round_config(seed=3))
    stacked = stack(baked, [lora_deltas(baked.model), deltas])
    assert torch.allclose(model_logits(stacked.model), model_logits(top.model), atol=1e-4)
    rank = next(iter(deltas.values()))[0].shape[0]
    assert stacked.model.peft_config["default"].r == 2 * rank
    # baked itself is untouched
    assert baked.strength == 0.7 and torch.allclose(model_logits(baked.model),
                                                    model_logits(load_baked(first, 0.7).model))
    half = stack(baked, [lora_deltas(baked.model), deltas])
    half.strength = 0.0
    with modeling.BASE.active(baked.model):
        assert torch.allclose(model_logits(half.model), model_logits(baked.model), atol=1e-5)


def test_lora_stack_push_and_upto(first, prompt, round_config, model_logits):
    baked = load_baked(first)
    layers = LoraStack(baked)
    assert torch.allclose(model_logits(layers.current.model), model_logits(baked.model), atol=1e-5)
    kl = layers.push("Answer in French.", round_config(steps=2, seed=5))
    assert set(kl) >= {"before", "after", "reduction"} and len(layers.deltas) == 2
    assert not torch.allclose(model_logits(layers.current.model), model_logits(baked.model), atol=1e-5)
    assert torch.allclose(model_logits(layers.upto(0).model), model_logits(baked.model), atol=1e-5)
