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
