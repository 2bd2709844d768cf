"""A short bake on the real default model, SmolLM2-135M-Instruct (converted from its GGUF)."""

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from promptbake import BakeConfig, bake, load_baked

pytestmark = pytest.mark.slow


def test_short_bake_on_the_default_model(smollm2_dir, tmp_path):
    config = BakeConfig(train_contexts=4, eval_contexts=4, samples_per_context=1,
                        max_new_tokens=16, batch_size=4, steps=3, lr=2e-3, sample_batch=8)
    out = tmp_path / "pirate"
    baked = bake("You are a pirate captain. Talk like a pirate in every answer.", config=config,
                 out=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["name"] == "smollm2-135m-instruct"
    assert manifest["framing"]["default_system_prompt"].startswith("You are a helpful AI")
    kl = manifest["kl"]
    assert kl["before"]["per_token"] > 0.05  # the persona prompt changes the model measurably
    assert kl["after"]["per_sequence"] < kl["before"]["per_sequence"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), out)
    again = load_baked(out, strength=0.5)
    assert isinstance(again.generate("Hi!", max_new_tokens=8), str)
    assert baked.manifest["trajectories"]["count"] == 4
