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

    # The evaluation on the real model: the pirate prompt raises persona adherence (rules
    # and MiniLM similarity) measurably, and the re-prompt matrix and forgetting gate run.
    from promptbake import contexts, forgetting, persona, reprompt
    from promptbake.tasks import load_task

    adherence = persona.AdherenceEvaluator(persona.pirate(), contexts.builtin("held_out")[:6],
                                           max_new_tokens=32)
    matrix = reprompt.reprompt_matrix(baked, adherence)
    assert matrix.cells["prompted"].value > matrix.cells["base"].value + 0.1, matrix.table()
    facts = load_task("world_facts", limit=12)
    facts_matrix = reprompt.reprompt_matrix(baked, facts)
    gate = forgetting.compare({"world_facts": facts_matrix.cells["base"]},
                              {"world_facts": facts_matrix.cells["baked"]})
    assert facts_matrix.cells["base"].value > facts.chance  # the suite is not at chance
    assert set(gate.to_dict()["tasks"]) == {"world_facts"}
