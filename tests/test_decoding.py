"""Decoding: greedy answers after a long shared prompt are the same whether the prompt is
encoded once and its cache shared, or with every question."""

import pytest

from promptbake import decoding
from promptbake.decoding import greedy, stop_token_ids


def _counted(model, monkeypatch) -> list:
    """The input shapes of every forward pass of ``model`` from now on."""
    calls = []
    real = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return calls


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_a_shared_prompt_is_encoded_once_and_changes_nothing(tiny64, tokenizer, monkeypatch,
                                                             batch_size):
    prompt = tokenizer.encode("You are a careful assistant. " * 12, add_special_tokens=False)
    questions = ["What is two plus two?", "Name a colour.", "Why is the sea salty?", "Hi",
                 "Tell me about the moon and the tides, in a few words please."]
    prefixes = [prompt + tokenizer.encode(q, add_special_tokens=False) for q in questions]
    options = dict(max_new_tokens=12, stop_ids=stop_token_ids(tokenizer, tiny64), pad_id=0,
                   batch_size=batch_size)
    calls = _counted(tiny64, monkeypatch)
    shared = greedy(tiny64, prefixes, **options)
    assert calls[0] == (1, len(prompt))  # the shared start, once
    assert all(shape[1] < len(prompt) for shape in calls[1:])  # never again
    monkeypatch.setattr(decoding, "SHARED_PREFIX", 10 ** 9)  # every prefix whole
    assert greedy(tiny64, prefixes, **options) == shared
    assert any(len(answer) > 0 for answer in shared)


@pytest.mark.parametrize("shared", [False, True])
def test_a_prefix_given_twice_is_encoded_once_and_answers_alike(tiny64, tokenizer, monkeypatch,
                                                                shared):
    """Alone or after a long shared start (encoded once itself), a repeated prefix goes through
    the model once and every copy gets the answer it gets alone."""
    questions = ["What is two plus two?", "Name a colour.", "What is two plus two?", "Hi",
                 "Name a colour.", "What is two plus two?"]
    start = "You are a careful assistant. " * 12 if shared else ""
    prefixes = [tokenizer.encode(start + q, add_special_tokens=False) for q in questions]
    options = dict(max_new_tokens=8, stop_ids=stop_token_ids(tokenizer, tiny64), pad_id=0,
                   batch_size=8)
    alone = [greedy(tiny64, [p], **options)[0] for p in prefixes[:2] + prefixes[3:4]]
    calls = _counted(tiny64, monkeypatch)
    answers = greedy(tiny64, prefixes, **options)
    assert calls[int(shared)][0] == 3  # three distinct prefixes go through the model
    assert answers == [alone[0], alone[1], alone[0], alone[2], alone[1], alone[0]]
