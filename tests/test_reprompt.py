"""The re-prompt matrix and strength sweeps of an evaluator, on the tiny model."""

import json
import math

import pytest
import torch

from promptbake import BakeConfig, bake, load_baked, modeling, reprompt
from promptbake.tasks import Score

QUESTIONS = ["How do I boil an egg?", "What is the capital of France?", "Tell me a joke.",
             "Why is the sky blue?", "Recommend a book.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def baked(tiny_dir, tmp_path_factory, prompt):
    out = tmp_path_factory.mktemp("reprompt") / "pirate"
    config = BakeConfig(train_contexts=4, eval_contexts=3, samples_per_context=2,
                        max_new_tokens=8, sample_batch=8, batch_size=4, steps=6, lr=2e-2,
                        warmup=0.0, snapshot_every=2)
    bake(prompt, model=tiny_dir, config=config, out=out)
    return load_baked(out)


def test_matrix_cells_are_the_four_conditions(baked, next_token_evaluator, prompt):
    token = 1000
    evaluator = next_token_evaluator(QUESTIONS, token)
    matrix = reprompt.reprompt_matrix(baked, evaluator)
    assert list(matrix.cells) == ["base", "prompted", "baked", "baked+prompt"]
    # Each cell equals a direct evaluation under the same condition.
    with modeling.adapter(baked.model, enabled=False):
        base_u = evaluator(baked.model, baked.tokenizer, prompt)
    with modeling.adapter(baked.model, enabled=True):
        plain = evaluator(baked.model, baked.tokenizer, None)
    assert matrix.cells["prompted"].value == pytest.approx(base_u.value)
    assert matrix.cells["baked"].value == pytest.approx(plain.value)
    assert matrix.cells["base"].value != pytest.approx(matrix.cells["baked"].value)
    assert "| without u |" in matrix.table() and set(matrix.to_dict()["cells"]) == set(CELLS)
    # Saved with its items, the matrix reads back whole (JSON and all); without them it cannot.
    back = reprompt.RepromptMatrix.from_dict(json.loads(json.dumps(matrix.to_dict(items=True))))
    assert back.to_dict(items=True) == matrix.to_dict(items=True)
    # as an earlier promptbake saved it, with the cells named base+u and baked+u
    legacy = matrix.to_dict(items=True)
    legacy["cells"] = {{"prompted": "base+u", "baked+prompt": "baked+u"}.get(k, k): v
                       for k, v in legacy["cells"].items()}
    assert reprompt.RepromptMatrix.from_dict(legacy).to_dict(items=True) == \
        matrix.to_dict(items=True)
    assert back.cells["baked"].items == matrix.cells["baked"].items
    with pytest.raises(ValueError, match="items=True"):
        reprompt.RepromptMatrix.from_dict(matrix.to_dict())


CELLS = reprompt.CELLS


class Fixed:
    """Scores fixed per condition, to check the recovery arithmetic by hand."""

    def __init__(self, values):
        self.values = values

    def __call__(self, result_name):
        from promptbake.tasks import Score
        items = [{"id": i, "score": v} for i, v in enumerate(self.values[result_name])]
        mean = sum(self.values[result_name]) / len(items)
        return Score(task="t", metric="accuracy", value=mean, se=None, n=len(items), chance=None,
                     items=items)


def test_recovery_by_hand():
    f = Fixed({"base": [0, 0, 1, 0], "prompted": [1, 1, 1, 0], "baked": [1, 0, 1, 0]})
    ratio, se = reprompt.recovery(f("base"), f("prompted"), f("baked"))
    assert ratio == pytest.approx(0.5)  # gains 1 of the prompt's 2 items
    gain, baked_gain = [1, 1, 0, 0], [1, 0, 0, 0]
    resid = [b - 0.5 * g for g, b in zip(gain, baked_gain)]
    expected = math.sqrt(sum(r * r for r in resid) / 3) / (2 * 0.5)
    assert se == pytest.approx(expected)
    same = Fixed({"base": [1, 0], "prompted": [1, 0], "baked": [1, 1]})
    assert reprompt.recovery(same("base"), same("prompted"), same("baked")) == (None, None)


def test_strength_sweep_zero_is_the_base_model(baked, next_token_evaluator):
    evaluator = next_token_evaluator(QUESTIONS, 1000)
    points = reprompt.strength_sweep(baked, evaluator, [0, 0.5, 1])
    base = reprompt.score(baked, evaluator, modeling.BASE)
    assert points[0.0].value == pytest.approx(base.value, abs=1e-6)
    assert points[1.0].value == pytest.approx(
        reprompt.score(baked, evaluator, modeling.BAKED).value)
    assert baked.strength == 1.0  # sweeping leaves the model as it was


def test_snapshot_sweep_and_plot(baked, next_token_evaluator, tmp_path):
    evaluator = next_token_evaluator(QUESTIONS, 1000)
    before = {k: v.clone() for k, v in baked.model.state_dict().items() if "lora" in k}
    points = reprompt.snapshot_sweep(baked, evaluator)
    assert sorted(points) == [0, 2, 4, 6]
    after = {k: v for k, v in baked.model.state_dict().items() if "lora" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # final adapter back in place
    assert points[6].value == pytest.approx(
        reprompt.score(baked, evaluator, modeling.BAKED).value)
    inner = reprompt.snapshot_sweep(baked, evaluator, ends=False)  # the matrix has the ends
    assert sorted(inner) == [2, 4] and reprompt.last_step(baked) == 6
    assert all(inner[k].value == points[k].value for k in inner)
    path = tmp_path / "sweep.png"
    reprompt.plot_sweep(points, path, xlabel="step", ylabel="p", title="t",
                        references={"base + u": points[0]})
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_snapshot_sweep_needs_snapshots(tiny_dir, tmp_path, next_token_evaluator, prompt):
    config = BakeConfig(train_contexts=2, eval_contexts=2, samples_per_context=1,
                        max_new_tokens=4, sample_batch=4, batch_size=2, steps=2)
    baked = bake(prompt, model=tiny_dir, config=config)
    with pytest.raises(ValueError, match="no directory"):
        reprompt.snapshot_sweep(baked, next_token_evaluator(QUESTIONS, 1))


def test_recovery_is_stated_only_for_a_significant_effect(baked, next_token_evaluator):
    """A prompt with no measurable effect on a score has nothing to recover: no ratio (it would
    divide by noise), and the line says so with the difference."""
    def score_of(values):
        items = [{"id": i, "score": float(v)} for i, v in enumerate(values)]
        return Score(task="t", metric="accuracy", value=sum(values) / len(values), se=None,
                     n=len(values), chance=None, items=items)

    flat = reprompt.prompt_effect(score_of([1, 0] * 10), score_of([0, 1] * 10))
    assert flat["difference"] == 0 and not flat["significant"]
    strong = reprompt.prompt_effect(score_of([0] * 20), score_of([1] * 20))
    assert strong["significant"] and strong["p"] < 1e-4 and strong["test"] == "exact McNemar"
    matrix = reprompt.RepromptMatrix("t", {}, None, None, flat)
    assert "no measurable effect on t" in matrix.describe_recovery()
    assert "recovers 80%" in reprompt.RepromptMatrix("t", {}, 0.8, 0.1,
                                                     strong).describe_recovery()
