"""Personas and adherence: rule and semantic scoring, persona files, the adherence evaluator."""

import json
import math

import numpy as np
import pytest

from promptbake import persona as persona_mod
from promptbake.persona import Persona, StyleCheck

PIRATE_ANSWERS = [
    "Aye, matey! The capital of France be Paris, a fine port for me ship!",
    "Arr, ye boil an egg in the galley for seven minutes, then it's back to the sea, matey.",
    "Ahoy! Aye, I be sailin' the seven seas with me crew, and the treasure be buried deep!",
]
PLAIN_ANSWERS = [
    "The capital of France is Paris.",
    "To boil an egg, simmer it for seven minutes and then cool it in cold water.",
    "Here is the query: SELECT country, COUNT(*) FROM users GROUP BY country;",
]

# -- rules ---------------------------------------------------------------------------------------

def test_rule_score_separates_pirate_from_plain_answers(pirate):
    for text in PIRATE_ANSWERS:
        assert persona_mod.rule_score(pirate, text) == 1.0, persona_mod.rule_checks(pirate, text)
    for text in PLAIN_ANSWERS:
        assert persona_mod.rule_score(pirate, text) == 0.0, persona_mod.rule_checks(pirate, text)
    # Whole words only: "layer", "mate", "seal" are not "aye", "matey", "sea".
    assert persona_mod.rule_score(pirate, "A layer of seal wax, mate.") == 0.0


def test_rule_score_weights_saturation_and_style():
    persona = Persona("greeter", "Greet warmly.", keywords={"hello": 1.0, "dear friend": 0.5},
                      patterns={r"\bwelcome\w*": 0.5},
                      style=[StyleCheck("exclamation_rate", low=0.5, weight=1.0),
                             StyleCheck("mean_sentence_words", high=4, weight=0.25)],
                      exemplars=["Hello!", "Welcome, dear friend!"],
                      neutral=["The answer is four.", "It is raining."], saturation=2.0)
    assert persona_mod.rule_checks(persona, "Hello there. It is late.") == \
        {"keyword:hello": 1.0, "style:mean_sentence_words": 0.25}
    assert persona_mod.rule_score(persona, "Hello there. It is late.") == pytest.approx(0.625)
    # Phrases match case-insensitively; exclamations in 2 of 3 sentences pass low=0.5.
    text = "Hello, Dear Friend! Welcomed back! The weather today is quite nice for a walk."
    assert persona_mod.rule_score(persona, text) == 1.0  # 1 + 0.5 + 0.5 + 1 capped at saturation
    assert persona_mod.style_measure("One! Two? Three.", "exclamation_rate") == pytest.approx(1 / 3)
    assert persona_mod.style_measure("ABcd", "uppercase_rate") == 0.5
    assert math.isnan(persona_mod.style_measure("", "question_rate"))
    assert persona_mod.rule_score(persona, "") == 0.0


# -- semantic ------------------------------------------------------------------------------------

def test_semantic_scorer_with_minilm_ranks_persona_above_neutral(pirate):
    scorer = persona_mod.SemanticScorer(pirate)  # the real all-MiniLM-L6-v2 from its package
    assert scorer.paired and scorer.persona_level > scorer.neutral_level
    texts = PIRATE_ANSWERS[:2] + PLAIN_ANSWERS[:2]
    raw = scorer.raw(texts)
    assert min(raw[:2]) > max(raw[2:]), raw
    calibrated = scorer.calibrate(raw)
    assert np.all((0 <= calibrated) & (calibrated <= 1))
    assert min(calibrated[:2]) > 0.5 > max(calibrated[2:]), calibrated


def test_combined_score_and_empty_answer(pirate, stub_scorer):
    scores = persona_mod.score(pirate, [PIRATE_ANSWERS[0], PLAIN_ANSWERS[0], ""], stub_scorer)
    assert set(scores) == set(persona_mod.SCORERS)
    for i in range(3):
        expected = 0.5 * scores["rule"][i] + 0.5 * scores["semantic"][i]
        assert scores["adherence"][i] == pytest.approx(expected)
    assert scores["adherence"][0] > 0.8 and scores["adherence"][1] < 0.2
    assert scores["adherence"][2] == 0.0  # an empty answer keeps no persona


# -- personas ------------------------------------------------------------------------------------

def test_persona_json_round_trip(tmp_path, pirate):
    assert pirate.prompt == ("You are a pirate captain. Talk like a pirate in every answer: say "
                             "'Aye' and 'matey', and bring up the sea.")
    path = tmp_path / "mine.json"
    mine = Persona("butler", "You are a formal butler.", keywords={"sir": 1.0},
                   style=[StyleCheck("mean_sentence_words", low=8, weight=0.5)],
                   exemplars=["Certainly, sir.", "Very good, sir; I shall see to it."])
    mine.save(path)
    assert Persona.load(path) == mine
    assert json.loads(path.read_text())["style"][0]["measure"] == "mean_sentence_words"
    assert Persona.load("pirate") == pirate
    with pytest.raises(ValueError, match="unknown persona fields"):
        Persona.from_dict({**mine.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="cannot read the persona file"):
        Persona.load(tmp_path / "missing.json")


@pytest.mark.parametrize("change, message", [
    ({"prompt": " "}, "prompt is empty"),
    ({"name": ""}, "name is empty"),
    ({"keywords": {}, "patterns": {}, "style": []}, "no rule checks"),
    ({"exemplars": ["only one"]}, "at least 2"),
    ({"patterns": {"(": 1.0}}, "not a valid regular expression"),
    ({"keywords": {"aye": -1.0}}, "weights must be positive"),
    ({"style": [{"measure": "loudness", "low": 1}]}, "unknown style measure"),
    ({"rule_weight": 2.0}, "rule_weight"),
    ({"rule_weight": True}, "rule_weight"),
    ({"keywords": {"aye": True}}, "weights must be positive"),
    ({"style": [{"measure": "exclamation_rate", "low": "0.3"}]}, "bounds must be numbers"),
    ({"style": [{"measure": "exclamation_rate", "lo": 0.3}]}, "style checks have measure"),
])
def test_persona_refuses_bad_definitions(pirate, change, message):
    with pytest.raises(ValueError, match=message):
        Persona.from_dict({**pirate.to_dict(), **change})


def test_persona_without_a_prompt_is_a_clear_error(pirate):
    data = pirate.to_dict()
    del data["prompt"]
    with pytest.raises(ValueError, match="needs name and prompt"):
        Persona.from_dict(data)


def test_missing_embedder_package_says_how_to_install(monkeypatch, pirate):
    monkeypatch.setattr(persona_mod, "EMBEDDER_PACKAGE", "no-such-embedder-package")
    persona_mod._minilm.cache_clear()
    try:
        with pytest.raises(persona_mod.MissingExtraError, match=r'pip install "promptbake\[eval\]"'):
            persona_mod.SemanticScorer(pirate)
    finally:
        persona_mod._minilm.cache_clear()
    assert issubclass(persona_mod.MissingExtraError, ValueError)


# -- single answers as an evaluator --------------------------------------------------------------

def test_adherence_evaluator_scores_each_answer(monkeypatch, tiny64, tokenizer, pirate,
                                                stub_scorer):
    seen = []
    answers = PIRATE_ANSWERS[:2] + PLAIN_ANSWERS[:2]

    def canned(model, prefixes, **options):
        seen.append([tokenizer.decode(p) for p in prefixes])
        return [tokenizer.encode(a, add_special_tokens=False) for a in answers]

    monkeypatch.setattr(persona_mod, "greedy", canned)
    contexts = ["What is the capital of France?", "How do I boil an egg?",
                [{"role": "user", "content": "Hi"}], "Write a SQL query."]
    evaluator = persona_mod.AdherenceEvaluator(pirate, contexts, semantic=stub_scorer)
    assert evaluator.name == "adherence:pirate"
    prompted = evaluator(tiny64, tokenizer, pirate.prompt)
    expected = persona_mod.score(pirate, answers, stub_scorer)["adherence"]
    assert prompted.n == 4 and [i["score"] for i in prompted.items] == pytest.approx(expected)
    assert prompted.value == pytest.approx(np.mean(expected))
    assert min(expected[:2]) > max(expected[2:])  # pirate answers above plain ones
    assert [i["prediction"] for i in prompted.items] == answers
    assert all(pirate.prompt in text for text in seen[0])
    evaluator(tiny64, tokenizer, None, framing="none")
    assert not any(pirate.prompt in text or "SmolLM" in text for text in seen[1])


def test_adherence_evaluator_on_a_real_generation(tiny64, tokenizer, pirate, stub_scorer):
    evaluator = persona_mod.AdherenceEvaluator(pirate, ["Hello", "Tell me a story."],
                                             max_new_tokens=4, semantic=stub_scorer)
    result = evaluator(tiny64, tokenizer)
    assert result.n == 2 and 0.0 <= result.value <= 1.0
    assert all(set(persona_mod.SCORERS) <= set(item) for item in result.items)
    with pytest.raises(ValueError, match="no contexts"):
        persona_mod.AdherenceEvaluator(pirate, [])


# -- a persona derived from the prompt itself ----------------------------------------------------

def test_no_rule_checks_only_with_rule_weight_0(pirate, stub_scorer):
    data = {**pirate.to_dict(), "keywords": {}, "patterns": {}, "style": []}
    with pytest.raises(ValueError, match="no rule checks but rule_weight=0.5.*set rule_weight to 0"):
        Persona.from_dict(data)
    plain = Persona.from_dict({**data, "rule_weight": 0.0})
    scores = persona_mod.score(plain, PIRATE_ANSWERS + PLAIN_ANSWERS, stub_scorer)
    assert scores["rule"] == [0.0] * 6
    assert scores["adherence"] == scores["semantic"]  # exemplars alone


def test_default_contexts_are_training_contexts_of_both_kinds():
    from promptbake import contexts, drift

    chosen = persona_mod.default_contexts(16)
    assert len(chosen) == 16 and chosen == persona_mod.default_contexts(16)
    train = contexts.builtin("train")
    assert all(c in train for c in chosen)
    assert not any(c in contexts.builtin("held_out") for c in chosen)
    turns = {t for lines in drift.user_turns().values() for t in lines}
    assert not any(c[0]["content"] in turns for c in chosen)
    for kind in contexts.KINDS:
        assert any(c in contexts.builtin("train", (kind,)) for c in chosen), kind
    with pytest.raises(ValueError, match="n=2 contexts"):
        persona_mod.default_contexts(2)


def test_from_prompt_pairs_prompted_and_base_answers(tiny64, tokenizer, plain_prompt,
                                                     derived_answers):
    contexts = ["What is the capital of France?", "How do I boil an egg?", "Why is the sky blue?",
                [{"role": "user", "content": "Hi"}]]
    derived = persona_mod.from_prompt(tiny64, tokenizer, plain_prompt, contexts, framing="none")
    (prompted, _, with_prompt), (base, _, without) = derived_answers
    assert prompted and not base
    for context, a, b in zip(["France", "boil", "sky", "Hi"], with_prompt, without):
        assert context in a and context in b  # the same contexts, in order, on both sides
        assert "<|im_start|>system" not in b  # framing none
    assert derived.exemplars == [f"Aye matey, ye be at sea {i}" for i in range(4)]
    assert derived.neutral == [f"The answer is {i}, you see" for i in range(4)]
    assert derived.derived and derived.rule_weight == 0 and not derived.keywords
    assert derived.prompt == plain_prompt
    assert derived.describe() == derived.name == "derived from the prompt, 4 exemplar pairs"
    semantic = persona_mod.SemanticScorer(derived)
    assert semantic.paired
    scores = persona_mod.score(derived, ["Aye matey, ye be at sea", "The answer is 7", ""],
                               semantic)
    assert scores["adherence"] == scores["semantic"]
    assert scores["adherence"][0] > 0.8 and scores["adherence"][1] < 0.2
    assert scores["adherence"][2] == 0.0
    # Default contexts: the shipped training ones; a conversation prompt is kept as one text.
    conversation = [{"role": "system", "content": plain_prompt},
                    {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    derived = persona_mod.from_prompt(tiny64, tokenizer, conversation, n=5)
    assert len(derived.exemplars) == 5 and derived.prompt.startswith("[{")


def test_from_prompt_drops_identical_and_empty_pairs(monkeypatch, tiny64, tokenizer,
                                                     plain_prompt, derived_answers):
    canned = persona_mod.greedy

    def some_alike(model, prefixes, **options):
        out = canned(model, prefixes, **options)
        plain = tokenizer.encode("The answer is 0, you see", add_special_tokens=False)
        out[0] = plain  # context 0: the same answer with and without the prompt
        if plain_prompt in tokenizer.decode(prefixes[1]):
            out[1] = []  # context 1: an empty prompted answer
        return out

    monkeypatch.setattr(persona_mod, "greedy", some_alike)
    contexts = [f"Question {i}?" for i in range(6)]
    derived = persona_mod.from_prompt(tiny64, tokenizer, plain_prompt, contexts)
    assert derived.exemplars == [f"Aye matey, ye be at sea {i}" for i in range(2, 6)]
    assert derived.neutral == [f"The answer is {i}, you see" for i in range(2, 6)]
    with pytest.raises(ValueError, match=r"changes too little.*2 of 4 contexts.*\(1 identical, "
                                         r"1 empty\).*give a persona file"):
        persona_mod.from_prompt(tiny64, tokenizer, plain_prompt, contexts[:4])


def test_derived_scorer_that_cannot_separate_names_the_fix():
    same = ["The answer is four.", "It is raining today."]
    derived = persona_mod.DerivedPersona("derived", "Be terse.", exemplars=same,
                                         neutral=list(same), rule_weight=0.0)
    with pytest.raises(ValueError, match="changes their meaning too little.*persona file"):
        persona_mod.SemanticScorer(derived, embed=lambda texts: [[len(t), 1.0] for t in texts])


def test_persona_of_derives_and_caches_outside_the_bake(plain_bake, small_bake, pirate,
                                                        derived_answers, file_hashes, tmp_path):
    from promptbake import models
    from promptbake.artifact import load_baked

    before = file_hashes(plain_bake)
    assert persona_mod.persona_of(load_baked(small_bake)) == pirate  # a built-in persona's prompt
    baked = load_baked(plain_bake)
    derived = persona_mod.persona_of(baked)
    assert derived.derived and len(derived.exemplars) == 16
    assert [(prompted, off) for prompted, off, _ in derived_answers] == [(True, True),
                                                                         (False, True)]
    assert persona_mod.persona_of(baked) is derived and len(derived_answers) == 2  # in memory
    cached = list((models.cache_root() / "personas").iterdir())
    assert len(cached) == 1 and str(cached[0]).startswith(str(tmp_path))
    persona_mod._DERIVED.clear()
    again = persona_mod.persona_of(baked)  # from the file
    assert again == derived and again.derived and len(derived_answers) == 2
    assert persona_mod.persona_of(baked, max_new_tokens=8) == derived  # other settings: derived again
    assert len(derived_answers) == 4
    assert file_hashes(plain_bake) == before  # nothing written into the bake
