"""Prompt pursuit and sequential baking on the tiny model: stacked LoRA deltas are exact, the
plateau rule stops where it should, and the output directory loads like a bake."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from promptbake import pursuit
from promptbake.bake import BakeConfig, bake, load_baked

PROMPT = "You are a pirate captain. Talk like a pirate in every answer."


def config(**changes):
    base = dict(train_contexts=4, eval_contexts=3, samples_per_context=2, max_new_tokens=8,
                sample_batch=8, batch_size=4, steps=6, lr=2e-2, warmup=0.0)
    return BakeConfig(**{**base, **changes})


def logits(model, ids=(1, 2, 3, 4, 5, 6)):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits[0]


@pytest.fixture(scope="module")
def first(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pursuit") / "round0"
    bake(PROMPT, model=tiny_dir, config=config(), out=out)
    return out


@pytest.mark.parametrize("metrics, patience, expected", [
    ([1.0, 2.0], 1, False),  # still improving
    ([1.0, 2.0, 2.01], 1, True),  # +0.5% < 2%
    ([1.0, 2.0, 1.5], 1, True),  # worse than the best: no improvement
    ([1.0, 2.0, 2.01], 2, False),  # one flat round is not enough with patience 2
    ([1.0, 2.0, 2.01, 2.02], 2, True),
    ([1.0, 2.0, 2.01, 3.0], 2, False),
    ([-0.5, -0.2], 1, False),  # negative metrics (-KL): improving
    ([-0.5, -0.499], 1, True),
])
def test_plateau_rule(metrics, patience, expected):
    assert pursuit.plateaued(metrics, 0.02, patience) is expected


@pytest.mark.parametrize("metrics, patience, expected", [
    ([0.317, 0.283, 0.225, 0.167], 1, (1, 0, "plateau")),  # stops at the first flat round
    ([0.317, 0.283, 0.225, 0.167], 3, (3, 0, "plateau")),  # three flat rounds: the last one
    ([0.317, 0.283, 0.225, 0.167], 4, (3, 0, "round limit")),
    ([1.0, 2.0, 3.0], 1, (2, 2, "round limit")),  # improving to the end: keeps the last
    ([1.0, 2.0, 1.0, 5.0], 2, (3, 3, "round limit")),  # a rise after a dip resets patience
    ([1.0, 2.0, 2.01, 1.5], 2, (3, 2, "plateau")),  # keeps the best, 2.01, not the last
    ([1.0], 1, (0, 0, "round limit")),
])
def test_stopping_replays_the_rule_on_a_curve(metrics, patience, expected):
    assert pursuit.stopping(metrics, 0.02, patience) == expected
    _, _, why = expected
    if why == "plateau":  # more rounds after the stop change nothing: the rule reads up to it
        assert pursuit.stopping(metrics + [9.0, 9.5], 0.02, patience) == expected
    with pytest.raises(ValueError, match="no rounds"):
        pursuit.stopping([], 0.02, patience)


def test_plateau_round():
    assert pursuit.plateau_round([1.0, 2.0, 2.01, 1.9], 0.02) == 1  # +0.5% after round 1
    assert pursuit.plateau_round([1.0, 2.0, 3.0], 0.02) == 2
    assert pursuit.plateau_round([1.0, 0.5], 0.02) == 0
    assert pursuit.plateau_round([1.0, 1.0, 5.0], 0.02) == 2  # a late rise moves the plateau


@pytest.mark.parametrize("metrics, stopped_at, expected", [
    ([0.325, 0.325, 0.283, 0.183], 1, True),  # plateau at 0, stopped 1 round after it
    ([0.325, 0.325, 0.283, 0.183], 3, False),  # ran 3 rounds past its plateau, no gain
    ([0.3, 0.3, 0.5], 1, False),  # stopped before the improvement at round 2
    ([0.3, 0.3, 0.5], 2, True),  # improved on round 0
    ([0.3, 0.303, 0.5], 1, False),  # +1% is under the threshold: not an improvement
    ([0.3], 0, True),
])
def test_meets_target_judges_the_stop_on_every_round(metrics, stopped_at, expected):
    assert pursuit.meets_target(metrics, stopped_at, 0.02) is expected
    with pytest.raises(ValueError, match="not a round"):
        pursuit.meets_target(metrics, len(metrics), 0.02)


def test_stacked_adapters_equal_merged_bakes_on_top(tiny_dir, first):
    baked = load_baked(first, strength=0.7)
    top, deltas = pursuit.bake_on_top(baked, "Answer in French.", config(seed=3))
    stacked = pursuit.stack(baked, [pursuit.lora_deltas(baked.model), deltas])
    assert torch.allclose(logits(stacked.model), logits(top.model), atol=1e-4)
    rank = next(iter(deltas.values()))[0].shape[0]
    assert stacked.model.peft_config["default"].r == 2 * rank
    # baked itself is untouched
    assert baked.strength == 0.7 and torch.allclose(logits(baked.model),
                                                    logits(load_baked(first, 0.7).model))
    half = pursuit.stack(baked, [pursuit.lora_deltas(baked.model), deltas])
    half.strength = 0.0
    from promptbake import _lm
    with _lm.adapter(baked.model, enabled=False):
        assert torch.allclose(logits(half.model), logits(baked.model), atol=1e-5)


def test_pursue_rounds_and_directory(tiny_dir, first, tmp_path, next_token_evaluator):
    baked = load_baked(first)
    out = tmp_path / "pursued"
    evaluator = next_token_evaluator(["How are you?", "What is the sea?", "Hello!"], 1000)
    result = pursuit.pursue(baked, rounds=2, evaluator=evaluator, config=config(steps=4),
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
    assert torch.allclose(logits(again.model), logits(result.baked.model), atol=1e-5)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    with pytest.raises(ValueError, match="not empty"):
        pursuit.pursue(baked, rounds=1, config=config(steps=2), out=out)


def test_pursue_without_evaluator_tracks_kl(first):
    baked = load_baked(first)
    # patience 2 > 1 round: no plateau can be declared, whether or not round 1 improves
    result = pursuit.pursue(baked, rounds=1, config=config(steps=3), patience=2)
    assert result.stopped == "round limit" and len(result.rounds) == 2
    assert result.tracked.startswith("-KL")
    assert result.rounds[0].metric == pytest.approx(-result.rounds[0].kl_to_prompted["per_token"])


def test_sequential_measures_the_first_prompt_again(tiny_dir):
    result = pursuit.sequential([PROMPT, "Answer in French."], model=tiny_dir,
                                config=config(steps=4))
    assert [s["stage"] for s in result.stages] == [0, 1]
    first_then = result.stages[0]["effects"][0]
    first_after = result.stages[1]["effects"][0]
    assert first_then["kl_base"] == first_after["kl_base"]  # the same samples, the same base
    assert first_then["reduction"] > 0
    assert len(result.stages[1]["effects"]) == 2
    assert result.baked.manifest["kind"] == "sequential"


def test_bad_input(first):
    baked = load_baked(first)
    with pytest.raises(ValueError, match="rounds"):
        pursuit.pursue(baked, rounds=0)
    with pytest.raises(ValueError, match="two or more"):
        pursuit.sequential([PROMPT])
