import pytest
import torch

from promptbake.decoding import stop_token_ids, top_p_filter
from promptbake.framing import align
from promptbake.trajectories import SamplingConfig, Trajectories, sample

CONTEXTS = [[{"role": "user", "content": q}] for q in
            ("What is the capital of France?", "How do I boil an egg?", "Hi!")]


@pytest.fixture(scope="module")
def tiny(tiny_framed):
    return tiny_framed


def run(tiny, cache, seed=0, **config):
    lm, tok, f = tiny
    cfg = SamplingConfig(**{"samples_per_context": 2, "max_new_tokens": 6, "batch_size": 4, **config})
    return sample(lm, [f.teacher_ids(c) for c in CONTEXTS], cfg, stop_token_ids(tok, lm),
                  torch.Generator().manual_seed(seed), cache=cache, topk=16,
                  pad_id=tok.pad_token_id)


def live_teacher_logprobs(tiny, traj):
    """The teacher's log-probabilities at every response position, from one plain forward pass
    over each whole prompt + response."""
    lm, tok, f = tiny
    rows = []
    for i, response in zip(traj.context_index, traj.responses):
        t, _, t0, _ = align(f.teacher_ids(CONTEXTS[i]), f.student_ids(CONTEXTS[i]), response)
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([t])).logits[0]
        rows.append(logits[t0 - 1:-1])
    return torch.log_softmax(torch.cat(rows), -1)


def test_counts_lengths_and_order(tiny):
    traj = run(tiny, "none")
    assert traj.context_index == [0, 0, 1, 1, 2, 2]
    assert all(1 <= len(r) <= 6 for r in traj.responses)
    assert traj.offsets[-1] == traj.tokens()


def test_cached_teacher_equals_a_live_teacher_forward(tiny):
    # Targets recorded while sampling (prefix KV cache shared by samples, left-padded batches)
    # must equal a fresh teacher forward over prefix + response.
    full = run(tiny, "full")
    live = live_teacher_logprobs(tiny, full)
    assert full.full_logprobs.dtype == torch.float16 and full.full_logprobs.shape == live.shape
    torch.testing.assert_close(full.full_logprobs.float(), live, atol=2e-2, rtol=1e-3)
    top = run(tiny, "topk")
    assert top.responses == full.responses  # the same draws: the cache does not touch sampling
    values, ids = live.topk(16, dim=-1)
    torch.testing.assert_close(top.topk_logprobs, values, atol=1e-4, rtol=1e-4)
    assert (top.topk_ids == ids).float().mean() > 0.99  # ties aside, the same tokens


def test_same_seed_same_trajectories(tiny):
    assert run(tiny, "none", seed=3).responses == run(tiny, "none", seed=3).responses
    assert run(tiny, "none", seed=3).responses != run(tiny, "none", seed=4).responses


def test_stop_tokens_end_a_response(tiny):
    lm, tok, f = tiny
    every = set(range(len(tok)))
    traj = sample(lm, [f.teacher_ids(c) for c in CONTEXTS], SamplingConfig(1, 5, batch_size=2),
                  every, torch.Generator().manual_seed(0), cache="full", pad_id=tok.pad_token_id)
    assert [len(r) for r in traj.responses] == [1, 1, 1]
    assert traj.full_logprobs.shape[0] == 3


def test_stop_when_ends_a_response_and_leaves_the_others_as_they_were(tiny):
    """A row the callback stops keeps its tokens up to that step, and the rows go on; until
    then every row is what it is without the callback (afterwards the draws shift, one uniform
    per row still alive)."""
    lm, tok, f = tiny
    free = run(tiny, "none", max_new_tokens=8, batch_size=6)  # one group: one stream of draws
    seen = []

    def stop_when(tokens):
        seen.append(len(tokens))
        return len(tokens) == 3 and tokens[0] == free.responses[0][0]

    stopped = sample(lm, [f.teacher_ids(c) for c in CONTEXTS],
                     SamplingConfig(2, 8, batch_size=6), stop_token_ids(tok, lm),
                     torch.Generator().manual_seed(0), cache="none", pad_id=tok.pad_token_id,
                     stop_when=stop_when)
    assert stopped.responses[0] == free.responses[0][:3]
    assert 1 in seen and max(seen) <= 8
    for before, after in zip(free.responses, stopped.responses):
        assert after[:3] == before[:3]
    assert max(len(r) for r in stopped.responses) > 3

def test_save_and_load_round_trip(tiny, tmp_path):
    for cache in ("full", "topk", "none"):
        traj = run(tiny, cache)
        traj.save(tmp_path / f"{cache}.safetensors")
        back = Trajectories.load(tmp_path / f"{cache}.safetensors")
        assert back.responses == traj.responses and back.context_index == traj.context_index
        for name in ("full_logprobs", "topk_ids", "topk_logprobs"):
            a, b = getattr(traj, name), getattr(back, name)
            assert (a is None and b is None) or torch.equal(a, b)


def test_samples_saved_before_the_one_entry_metadata_still_load(tiny, tmp_path):
    import json

    from safetensors.torch import save_file

    traj = run(tiny, "topk")
    meta = {"context_index": json.dumps(traj.context_index),
            "responses": json.dumps(traj.responses), "cache": traj.cache}  # three entries
    save_file({"topk_ids": traj.topk_ids, "topk_logprobs": traj.topk_logprobs},
              str(tmp_path / "old.safetensors"), metadata=meta)
    back = Trajectories.load(tmp_path / "old.safetensors")
    assert back.responses == traj.responses and back.context_index == traj.context_index
    assert back.cache == "topk" and torch.equal(back.topk_ids, traj.topk_ids)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.5, 0.3, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, 0.1), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_top_p_matches_a_full_sort_on_peaked_and_flat_rows():
    """The nucleus is searched among the top k, k growing: rows whose nucleus is a handful of
    tokens, thousands of them, or the whole vocabulary in one batch give what a full sort does."""
    generator = torch.Generator().manual_seed(0)
    vocab = 5000
    scales = torch.tensor([[8.0], [3.0], [1.0], [0.01]])  # from peaked to nearly uniform
    probs = torch.softmax(torch.randn(4, vocab, generator=generator) * scales, dim=-1)
    for top_p in (0.5, 0.95, 0.999):
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered[ordered.cumsum(-1) - ordered >= top_p] = 0.0
        expected = torch.zeros_like(probs).scatter_(-1, order, ordered)
        kept = top_p_filter(probs, top_p)
        assert torch.equal(kept, expected)
        assert (kept[0] > 0).sum() < 64 < (kept[3] > 0).sum()  # the search had to grow


@pytest.mark.parametrize("bad,message", [
    (dict(samples_per_context=0), "samples_per_context"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
])
def test_bad_sampling_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**bad).validate()


def test_a_long_shared_prompt_is_encoded_once_and_changes_nothing(tiny64, tokenizer,
                                                                  monkeypatch):
    from promptbake import decoding

    prompt = tokenizer.encode("You are a careful assistant. " * 12, add_special_tokens=False)
    prefixes = [prompt + tokenizer.encode(q, add_special_tokens=False)
                for q in ("What is two plus two?", "Hi", "Why is the sea salty, and how?")]
    config = SamplingConfig(samples_per_context=2, max_new_tokens=8, batch_size=4)
    calls = []
    real = tiny64.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    def run_once():
        return sample(tiny64, prefixes, config, stop_token_ids(tokenizer, tiny64),
                      torch.Generator().manual_seed(3), cache="topk", topk=8,
                      pad_id=tokenizer.pad_token_id)

    monkeypatch.setattr(tiny64, "forward", counting)
    shared = run_once()
    assert calls[0] == (1, len(prompt))  # the shared start, once for every batch
    assert all(shape[1] < len(prompt) for shape in calls[1:])
    monkeypatch.setattr(decoding, "SHARED_PREFIX", 10 ** 9)  # every prefix whole
    whole = run_once()
    assert shared.responses == whole.responses and any(len(r) > 1 for r in whole.responses)
    assert torch.equal(shared.topk_ids, whole.topk_ids)
    torch.testing.assert_close(shared.topk_logprobs, whole.topk_logprobs, rtol=0, atol=1e-9)
