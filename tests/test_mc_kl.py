"""MC-KL and its standard errors: hand-checked figures, and independence of batching."""

import math

import pytest
import torch

from promptbake import mc_kl, modeling, models
from promptbake.framing import Framing
from promptbake.mc_kl import KL, reduction
from promptbake.modeling import BASE
from promptbake.trajectories import Trajectories


def test_standard_errors_by_hand():
    kl = KL.from_values([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1])
    assert kl.per_sequence == 2.5 and kl.per_token == 2.5
    assert kl.per_sequence_se == pytest.approx(math.sqrt(5 / 3) / 2)  # s / sqrt(n)
    assert kl.per_token_se == pytest.approx(kl.per_sequence_se)
    by_length = KL.from_values([2.0, 6.0], [1, 3])
    assert by_length.per_token == 2.0 and by_length.per_sequence == 4.0
    assert by_length.per_token_se == pytest.approx(0.0)  # both sequences at 2 nats/token


def test_samples_of_one_context_are_not_independent():
    values, lengths = [1.0, 1.0, 3.0, 3.0], [1, 1, 1, 1]
    alone = KL.from_values(values, lengths)
    paired = KL.from_values(values, lengths, clusters=[0, 0, 1, 1])
    assert alone.per_sequence_se == pytest.approx(math.sqrt(4 / 3) / 2)
    assert paired.per_sequence_se == pytest.approx(1.0)  # two contexts, not four samples
    assert KL.from_values([1.0], [1]).per_sequence_se is None  # nothing to estimate it from


def test_reduction_by_hand():
    before = KL.from_values([10.0, 20.0, 30.0], [1, 1, 1])
    after = KL.from_values([1.0, 2.0, 3.0], [1, 1, 1])
    r, se = reduction(before, after)
    assert r == pytest.approx(0.9) and se == pytest.approx(0.0)  # exactly 10x on every sequence
    noisy = KL.from_values([2.0, 2.0, 2.0], [1, 1, 1])
    r, se = reduction(before, noisy)
    resid = [2 - 0.1 * b for b in (10, 20, 30)]
    assert r == pytest.approx(0.9)
    assert se == pytest.approx(math.sqrt(3 / 2 * sum(x * x for x in resid)) / (3 * 20))
    with pytest.raises(ValueError, match="same sequences"):
        reduction(before, KL.from_values([1.0, 2.0], [1, 1]))


def test_kl_on_does_not_depend_on_batching(tiny_dir):
    lm, tok, _ = models.load(tiny_dir)
    framing = Framing(tok, "You are a pirate.")
    contexts = [[{"role": "user", "content": q}] for q in ("Hi!", "Why is the sky blue?", "2+2?")]
    traj = Trajectories([0, 0, 1, 2, 2, 2], [[5, 6, 7], [8], [9, 10], [11, 12], [13], [14, 15]])
    found = [mc_kl.kl_on(lm, framing, contexts, traj, {"base": BASE},
                            pad_id=tok.pad_token_id, batch_size=b)["base"] for b in (1, 3, 64)]
    for other in found[1:]:
        assert other.values == pytest.approx(found[0].values, rel=1e-5)
    assert found[0].clusters == [0, 0, 1, 2, 2, 2] and found[0].tokens == 11
    # One trajectory at a time, from whole sequences: the same per-sequence sums.
    from promptbake.ops import divergence

    for k, (c, response) in enumerate(zip(traj.context_index, traj.responses)):
        t, s = framing.teacher_ids(contexts[c]), framing.student_ids(contexts[c])
        with torch.no_grad():
            teacher = lm(input_ids=torch.tensor([t + response])).logits[0, len(t) - 1:-1]
            student = lm(input_ids=torch.tensor([s + response])).logits[0, len(s) - 1:-1]
        assert float(divergence(student, teacher, reduction="sum")) == pytest.approx(
            found[0].values[k], rel=1e-4)


def test_kept_teacher_states_give_the_same_kl_without_the_teacher_pass(tiny_dir):
    # A bake measures the same held-out samples before and after training: the teacher's
    # hidden states from the first call serve the second, which runs only its student.
    from peft import LoraConfig, get_peft_model

    lm, tok, _ = models.load(tiny_dir)
    torch.manual_seed(0)
    model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    framing = Framing(tok, "You are a pirate.")
    contexts = [[{"role": "user", "content": q}] for q in ("Hi!", "Why is the sky blue?", "2+2?")]
    traj = Trajectories([0, 0, 1, 2], [[5, 6, 7], [8], [9, 10], [11, 12]])
    other = Trajectories([0, 1, 2], [[5, 6], [9, 10], [11, 12, 13]])
    passes = []
    lm.model.register_forward_hook(lambda module, args, kwargs, out: passes.append(
        kwargs["input_ids"].shape), with_kwargs=True)

    def kl(samples, variant, states=None):
        passes.clear()
        found = mc_kl.kl_on(model, framing, contexts, samples, {"s": variant},
                            pad_id=tok.pad_token_id, batch_size=2, teacher_states=states)["s"]
        return found, len(passes)

    states: dict = {}
    before, first = kl(traj, BASE, states)
    after, second = kl(traj, modeling.BAKED, states)
    assert second < first and after.values != before.values
    fresh, again = kl(traj, modeling.BAKED)
    assert after.values == fresh.values and again == first  # the same numbers, bit for bit
    # Other samples never meet a kept state that is not theirs.
    assert kl(other, modeling.BAKED, states)[0].values == kl(other, modeling.BAKED)[0].values
