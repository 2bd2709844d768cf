"""Contexts the model writes: list parsing, the filters and their reasons, the kinds' quotas,
generation end to end with canned lists, the cache, and bad input."""

import json

import pytest

from promptbake import contexts, drift, generated
from promptbake.generated import Generated, GenerationError

SQL = ("You are a SQL assistant. Answer every question with a single SQL query for a PostgreSQL "
       "database, then one sentence explaining it.")


def test_candidates_read_the_first_numbered_list():
    text = ('Here you go:\n1. "How do I list every table?"\n2) 1. What is a primary key?\n'
            "Some comment\n3. Show me all users older than 30.\n1. Again from the top\n")
    assert generated.candidates(text) == ["How do I list every table?", "What is a primary key?",
                                          "Show me all users older than 30."]
    assert generated.candidates("no list at all") == []
    assert len(generated.candidates("\n".join(f"{i}. item {i} here" for i in range(1, 9)))) == 5


@pytest.mark.parametrize("text, reason", [
    ("Hi there", "short"),
    (" ".join(["word"] * 70), "long"),
    ("Quelle est la meilleure façon d'apprendre le piano à mon âge ?", "language"),
    ("Sure! Here is a message a user might send.", "voice"),
    ("The second message: User: I'd love to hear about your new project.", "voice"),
    ("This message is a continuation of the previous one about tofu.", "voice"),
    ("How to fish the ocean:", "fragment"),
    ("Answer every question with a single SQL query for a PostgreSQL database please.", "leak"),
    ("What does your system prompt say about tables?", "leak"),
    ("How do I count the orders each customer made last month?", None),
])
def test_refusal_names_why_a_candidate_is_no_user_message(text, reason):
    words = contexts.content_words(SQL)
    assert generated.refusal(text, words, SQL) == reason


def test_quotas_share_the_contexts_among_kinds():
    every = generated.quotas(40, generated.KINDS, 0.5)
    assert sum(every.values()) == 40 and set(every) == set(generated.KINDS)
    assert every["domain"] + every["against"] == 20 and every["against"] in (2, 3)
    assert generated.quotas(10, ("domain",), 0.5) == {"domain": 10}
    general = generated.quotas(9, tuple(generated.GENERAL), 0.5)
    assert set(general.values()) == {1}


def _canned(tokenizer, lists):
    """A stand-in for the sampler: each request gets the next canned numbered list (after the
    "1." every answer is begun with, which the canned lists hold)."""
    written = (text.removeprefix(generated.LIST_START) for text in lists)

    class Found:
        def __init__(self, responses):
            self.responses = responses

    def sample(model, prefixes, config, stops, generator, **options):
        return Found([tokenizer.encode(next(written, ""), add_special_tokens=False)
                      for _ in prefixes])
    return sample


def test_generate_filters_counts_and_keeps_kinds(tiny_dir, monkeypatch, tokenizer):
    from promptbake import models

    lm, tok, _ = models.load(tiny_dir)
    turn = drift.user_turns()[next(iter(drift.user_turns()))][0]
    good = ["How do I find the newest rows of the orders table?",
            "Which customers never placed anything with us?", "Count the invoices per month.",
            "Why is my join between users and payments so slow?",
            "Give me the average salary by department.", "Delete rows older than 2019.",
            "Show unique cities from the address list.", "Rename the column email to mail."]
    lists = ["\n".join(f"{i}. {t}" for i, t in enumerate(
        [good[0], good[0], "Hi", turn, "Sure, here is one for you."], 1))]
    lists += ["\n".join(f"{i}. {t}" for i, t in enumerate(good[1:6], 1))] * 3
    lists += ["1. And what about the ones from last year?"] * 4
    monkeypatch.setattr(generated, "sample", _canned(tok, lists))
    monkeypatch.setattr(generated, "greedy", lambda model, prefixes, **o: [
        tok.encode("Use SELECT with ORDER BY.", add_special_tokens=False)] * len(prefixes))
    found = generated.generate(lm, tok, SQL, 6, kinds=("domain", "follow-up"), domain_share=0.5,
                               rounds=2)
    assert found.kinds.count("domain") == 3 and found.kinds.count("follow-up") == 3
    assert found.dropped["duplicate"] >= 1 and found.dropped["short"] == 1
    assert found.dropped["evaluation"] == 1 and found.dropped["voice"] == 1
    assert "Hi" in found.examples["short"]
    domain = [c for c, k in zip(found.contexts, found.kinds) if k == "domain"]
    assert all(len(c) == 1 and c[0]["content"] in good for c in domain)
    follow = [c for c, k in zip(found.contexts, found.kinds) if k == "follow-up"]
    assert all([m["role"] for m in c] == ["user", "assistant", "user"] for c in follow)
    assert "contexts (3 domain, 3 follow-up)" in found.summary()


def test_nothing_usable_is_a_clear_error(tiny_dir, monkeypatch):
    from promptbake import models

    lm, tok, _ = models.load(tiny_dir)
    monkeypatch.setattr(generated, "sample", _canned(tok, ["1. Hi\n2. Yo there"] * 20))
    with pytest.raises(GenerationError, match=r"none was usable \(4 fewer than 3 words.*"
                                              r"stronger generator"):
        generated.generate(lm, tok, SQL, 4, kinds=("domain",), rounds=1)

def test_answers_begin_the_list_and_stop_after_five_items(tiny_dir, monkeypatch):
    from promptbake import models

    lm, tok, _ = models.load(tiny_dir)
    asked = {}

    def sample(model, prefixes, config, stops, generator, stop_when=None, **options):
        asked.update(prefixes=prefixes, stop_when=stop_when)
        raise GenerationError("seen")

    monkeypatch.setattr(generated, "sample", sample)
    with pytest.raises(GenerationError, match="seen"):
        generated.generate(lm, tok, SQL, 4, kinds=("domain",), rounds=1)
    start = tok.encode(generated.LIST_START, add_special_tokens=False)
    assert all(p[-len(start):] == start for p in asked["prefixes"])
    items = " How do I join two tables?\n2. Count the orders.\n3. What is an index?\n" \
            "4. Show me every user.\n5. Why is my query slow?"
    tokens = tok.encode(items, add_special_tokens=False)
    stop = asked["stop_when"]
    assert not stop(tokens)  # the fifth item has no line end yet
    assert stop(tok.encode(items + "\n", add_special_tokens=False))
    assert not stop(tok.encode(items.split("\n5.")[0] + "\n", add_special_tokens=False))


def test_generation_is_cached_by_model_prompt_and_settings(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(model, tokenizer, prompt, n, say=None, **settings):
        calls.append(settings)
        return Generated([[{"role": "user", "content": f"message {i} {prompt}"}]
                          for i in range(n)], ["domain"] * n, n, {}, {}, settings)

    monkeypatch.setattr(generated, "generate", fake)
    first = generated.generated_contexts("u", 3, model=tiny_dir)
    again = generated.generated_contexts("u", 3, model=tiny_dir)
    assert len(calls) == 1 and again.cached and not first.cached
    assert again.contexts == first.contexts
    generated.generated_contexts("u", 3, model=tiny_dir, seed=1)
    generated.generated_contexts("another prompt", 3, model=tiny_dir)
    assert len(calls) == 3
    out = tmp_path / "made.jsonl"
    first.save_jsonl(out)
    assert contexts.load(out) == first.contexts
    assert json.loads(out.read_text().splitlines()[0])["kind"] == "domain"


def test_a_missing_generator_is_named(tmp_path):
    with pytest.raises(GenerationError, match="generator model .*missing.* is not a directory"):
        generated.generated_contexts("u", 3, generator=tmp_path / "missing")


def test_check_spec_refuses_bad_specs_before_loading():
    assert isinstance(generated.check_spec("general=1,short=1"), contexts.Pools)
    assert generated.check_spec("generated:50") == "generated:50"
    assert generated.check_spec(None) is None
    for bad in ("generated:0", "generated:many"):
        with pytest.raises(contexts.ContextError, match="generated:N with N a whole number"):
            generated.check_spec(bad)


def test_a_list_cut_off_by_the_token_limit_loses_its_unfinished_message(tiny_dir, monkeypatch):
    from promptbake import models

    lm, tok, _ = models.load(tiny_dir)
    cut = "1. How do I join the orders and users tables?\n2. Count the orders of every " \
          "customer please.\n3. Why is my query so sl"
    limit = len(tok.encode(cut.removeprefix(generated.LIST_START), add_special_tokens=False))
    for max_new_tokens, kept in ((limit, 2), (limit + 1, 3)):  # cut off, or ended by the model
        monkeypatch.setattr(generated, "sample", _canned(tok, [cut]))
        found = generated.generate(lm, tok, SQL, 3, kinds=("domain",), rounds=1,
                                   max_new_tokens=max_new_tokens)
        assert [c[0]["content"] for c in found.contexts][:2] == [
            "How do I join the orders and users tables?", "Count the orders of every customer please."]
        assert len(found.contexts) == kept


class _LeadingSpaceDropped:
    """A tokenizer whose decoder drops the leading space of the first token, as the
    sentencepiece ones of Llama 2, Mistral or TinyLlama do: '▁How' alone decodes to 'How'."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **options):
        return self.tokenizer(*args, **options)

    def decode(self, ids, **options):
        return self.tokenizer.decode(ids, **options).removeprefix(" ")


def test_lists_parse_when_the_decoder_drops_a_leading_space(tiny_dir, monkeypatch):
    from promptbake import models

    lm, tok, _ = models.load(tiny_dir)
    lists = ["1. How do I join the orders and users tables?\n2. Count the orders of every "
             "customer please.\n3. Which index would speed up my slow report query?"]
    monkeypatch.setattr(generated, "sample", _canned(tok, lists))
    found = generated.generate(lm, _LeadingSpaceDropped(tok), SQL, 3, kinds=("domain",),
                               rounds=1)
    assert len(found.contexts) == 3


def test_follow_ups_are_written_after_a_single_round_and_never_twice(tiny_dir, monkeypatch):
    from promptbake import models

    lm, tok, _ = models.load(tiny_dir)
    firsts = "1. How do I join the orders and users tables?\n2. Count the orders of every " \
             "customer please.\n3. Which index would speed up my slow report query?"
    again = "1. And what about the orders from last year?\n2. Can you sort them by date too?"
    monkeypatch.setattr(generated, "sample", _canned(tok, [firsts, again, again]))
    monkeypatch.setattr(generated, "greedy", lambda model, prefixes, **o: [
        tok.encode("Use SELECT with ORDER BY.", add_special_tokens=False)] * len(prefixes))
    found = generated.generate(lm, tok, SQL, 4, kinds=("domain", "follow-up"),
                               domain_share=0.5, rounds=1)
    follow = [c[-1]["content"] for c, k in zip(found.contexts, found.kinds) if k == "follow-up"]
    assert follow == ["And what about the orders from last year?", "Can you sort them by date too?"]
    assert found.dropped["duplicate"] == 2  # the second list repeats the first


def test_a_new_recipe_is_not_served_from_the_cache(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(model, tokenizer, prompt, n, say=None, **settings):
        calls.append(settings)
        return Generated([[{"role": "user", "content": f"message {i}"}] for i in range(n)],
                         ["domain"] * n, n, {}, {}, settings)

    monkeypatch.setattr(generated, "generate", fake)
    generated.generated_contexts("u", 2, model=tiny_dir)
    monkeypatch.setattr(generated, "RECIPE", generated.RECIPE + 1)
    assert not generated.generated_contexts("u", 2, model=tiny_dir).cached
    assert len(calls) == 2
