"""Cross-task forgetting: paired tests by hand, the gate's rules, the heatmap, a real run."""

import pytest

from promptbake import BakeConfig, bake, forgetting as fg, modeling


def score(values, task="t"):
    from promptbake.tasks import Score
    items = [{"id": i, "score": float(v)} for i, v in enumerate(values)]
    return Score(task=task, metric="accuracy", value=sum(values) / len(values), se=None,
                 n=len(values), chance=None, items=items)


def test_gate_rules():
    base = score([1] * 60 + [0] * 40)
    small = score([1] * 58 + [0] * 42)  # -3.3% relative: within the 3.4% threshold
    noisy = score([1] * 57 + [0] * 43)  # -5% relative, but 3 discordant pairs: not significant
    real = score([1] * 40 + [0] * 60)  # -33% relative, 20 discordant pairs
    assert not fg._change(base, small, 0.034, "strict", 0.05).failed
    assert fg._change(base, noisy, 0.034, "strict", 0.05).failed
    assert not fg._change(base, noisy, 0.034, "significant", 0.05).failed
    change = fg._change(base, real, 0.034, "significant", 0.05)
    assert change.failed and change.relative == pytest.approx(-1 / 3)
    assert change.absolute == pytest.approx(-0.2) and change.test == "exact McNemar"
    better = fg._change(base, score([1] * 100), 0.034, "strict", 0.05)
    assert not better.failed and better.relative > 0
    graded = fg._change(score([0.5, 0.7, 0.2]), score([0.4, 0.7, 0.3]), 0.034, "strict", 0.05)
    assert graded.test == "paired sign-flip"
    with pytest.raises(ValueError, match="different items"):
        fg._change(base, score([1, 0], task="t").__class__(
            task="t", metric="accuracy", value=1.0, se=None, n=1, chance=None,
            items=[{"id": "other", "score": 1.0}]), 0.034, "strict", 0.05)


def test_beyond_prompt_separates_the_prompts_effect_from_damage():
    base = {"mc": score([1] * 60 + [0] * 40, "mc"), "math": score([1] * 20 + [0] * 80, "math"),
            "gain": score([1] * 20 + [0] * 80, "gain")}
    prompted = {"mc": score([1] * 40 + [0] * 60, "mc"),  # the prompt lowers mc
                "math": score([1] * 20 + [0] * 80, "math"),
                "gain": score([1] * 60 + [0] * 40, "gain")}  # and raises gain
    baked = {"mc": score([1] * 40 + [0] * 60, "mc"),  # reproduces the prompt's drop
             "math": score([1] * 2 + [0] * 98, "math"),  # worse than both: damage
             "gain": score([1] * 40 + [0] * 60, "gain")}  # recovers half the gain
    against_prompt, damaged = fg.beyond_prompt(base, prompted, baked)
    assert against_prompt.changes["gain"].failed and not against_prompt.changes["mc"].failed
    assert not fg.compare(base, baked).changes["gain"].failed
    assert fg.compare(base, baked).changes["mc"].failed
    assert damaged == ["math"]


def test_forgetting_on_the_tiny_model(tiny_dir, next_token_evaluator, tmp_path):
    config = BakeConfig(train_contexts=4, eval_contexts=2, samples_per_context=2,
                        max_new_tokens=8, sample_batch=8, batch_size=4, steps=6, lr=2e-2,
                        warmup=0.0)
    baked = bake("You are a pirate captain. Talk like a pirate.", model=tiny_dir, config=config)
    questions = [f"Question number {i}: what do you think?" for i in range(12)]
    tasks = [next_token_evaluator(questions, 1000, binary=True, name="argmax"),
             next_token_evaluator(questions, 1000, name="probability")]
    result = fg.forgetting(None, baked, tasks)
    assert set(result.changes) == {"argmax", "probability"}
    change = result.changes["probability"]
    with modeling.BASE.active(baked.model):
        direct = tasks[1](baked.model, baked.tokenizer, None)
    assert change.base.value == pytest.approx(direct.value)
    assert change.baked.value != pytest.approx(direct.value)  # the bake changed the model
    assert result.passed == (not any(c.failed for c in result.changes.values()))
    record = result.to_dict()
    assert record["rule"].startswith("no task") and "| argmax |" in result.table()
    path = tmp_path / "heatmap.png"
    fg.plot_heatmap({"pirate": result, "pirate again": result}, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="rule"):
        fg.forgetting(None, baked, tasks, rule="lenient")
