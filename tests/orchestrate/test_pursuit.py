"""Prompt pursuit and sequential baking on the tiny model: rounds stop where the plateau rule
says, and the output directory loads like a bake."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from promptbake import load_baked, pursue, sequential


def test_pursue_rounds_and_directory(tiny_dir, first, tmp_path, next_token_evaluator, round_config, model_logits):
    baked = load_baked(first)
    out = tmp_path / "pursued"
    evaluator = next_token_evaluator(["How are you?", "What is the sea?", "Hello!"], 1000)
    result = pursue(baked, rounds=2, evaluator=evaluator, config=round_config(steps=4),
                    threshold=10.0, patience=1, out=out)
    # threshold 1000%: round 1 cannot improve enough, so pursuit stops on a plateau there
    assert result.stopped == "plateau" and [r.round for r in result.rounds] == [0, 1]
    assert result.rounds[0].kl_teacher_before == baked.manifest["kl"]["before"]
    assert result.rounds[1].kl_teacher_after["per_token"] < \
        result.rounds[1].kl_teacher_before["per_token"]
    assert result.best in (0, 1) and result.rounds[1].score.task == "next-token"
    saved = json.loads((out / "pursuit.json").read_text())
    assert saved["stopped"] == "plateau" and len(saved["rounds"]) == 2
    assert (out / "rounds" / "round-1" / "adapter_model.safetensors").is_file()
    again = load_baked(out)
    assert again.manifest["kind"] == "pursuit"
    assert torch.allclose(model_logits(again.model), model_logits(result.baked.model), atol=1e-5)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    with pytest.raises(ValueError, match="not empty"):
        pursue(baked, rounds=1, config=round_config(steps=2), out=out)


def test_pursue_without_evaluator_tracks_kl(first, round_config):
    baked = load_baked(first)
    # patience 2 > 1 round: no plateau can be declared, whether or not round 1 improves
    result = pursue(baked, rounds=1, config=round_config(steps=3), patience=2)
    assert result.stopped == "round limit" and len(result.rounds) == 2
    assert result.tracked.startswith("-KL")
    assert result.rounds[0].metric == pytest.approx(-result.rounds[0].kl_to_prompted["per_token"])


def test_sequential_measures_the_first_prompt_again(tiny_dir, prompt, round_config):
    result = sequential([prompt, "Answer in French."], model=tiny_dir,
                        config=round_config(steps=4))
    assert [s["stage"] for s in result.stages] == [0, 1]
    first_then = result.stages[0]["effects"][0]
    first_after = result.stages[1]["effects"][0]
    assert first_then["kl_base"] == first_after["kl_base"]  # the same samples, the same base
    assert first_then["reduction"] > 0
    assert len(result.stages[1]["effects"]) == 2
    assert result.baked.manifest["kind"] == "sequential"


def test_bad_input(first, prompt):
    baked = load_baked(first)
    with pytest.raises(ValueError, match="rounds"):
        pursue(baked, rounds=0)
    with pytest.raises(ValueError, match="two or more"):
        sequential([prompt])
