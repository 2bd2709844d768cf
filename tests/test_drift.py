"""Persona drift: the multi-turn loop, cache reuse, self-play, drift arithmetic, the modes."""

import json
import logging
import math
import re

import numpy as np
import pytest
import torch

from promptbake import decoding, drift as drift_mod, modeling
from promptbake.drift import DriftResult

# -- user turns ----------------------------------------------------------------------------------

def test_shipped_user_turns():
    sections = drift_mod.user_turns()
    assert sum(len(v) for v in sections.values()) >= 60
    assert {"openers", "follow-ups", "topic changes", "pulls"} <= set(sections)
    script = drift_mod.scripted_conversation(100, seed=3)
    assert len(script) == 100 and script[0] in sections["openers"]
    assert script == drift_mod.scripted_conversation(100, seed=3)
    assert script[:30] != drift_mod.scripted_conversation(100, seed=4)[:30]


# -- the conversation loop -----------------------------------------------------------------------

def test_history_grows_turn_by_turn(monkeypatch, tiny64, tokenizer, pirate, stub_scorer):
    seen = []
    respond = decoding.Conversations.respond

    def recording(self, contexts, *args, **kwargs):
        seen.append([tokenizer.decode(c) for c in contexts])
        return respond(self, contexts, *args, **kwargs)

    monkeypatch.setattr(decoding.Conversations, "respond", recording)
    result = drift_mod.drift(tiny64, tokenizer, pirate, system=pirate.prompt, turns=4,
                             conversations=2, max_new_tokens=5, semantic=stub_scorer)
    assert len(seen) == 4 and result.turns == 4 and result.conversations == 2
    for c, transcript in enumerate(result.transcripts):
        for k, context in enumerate(seen):
            text = context[c]
            assert text.count(pirate.prompt) == 1
            assert text.count("<|im_start|>user") == k + 1
            assert text.count("<|im_start|>assistant") == k + 1  # k answers + the open header
            at = 0
            for turn in transcript[:k]:  # every earlier exchange, in order
                for part in (turn["user"], turn["answer"]):
                    at = text.index(part, at) + len(part)
            assert transcript[k]["user"] in text[at:]
    # The two conversations get different user turns (their own orderings).
    assert [t["user"] for t in result.transcripts[0]] != [t["user"] for t in result.transcripts[1]]


@pytest.mark.parametrize("framing, system_turns", [("default", 1), ("empty", 1), ("none", 0)])
def test_framing_without_system_prompt(monkeypatch, tiny64, tokenizer, pirate, stub_scorer,
                                       framing, system_turns):
    seen = []
    respond = decoding.Conversations.respond
    monkeypatch.setattr(decoding.Conversations, "respond", lambda self, contexts, *a, **k: (
        seen.append(tokenizer.decode(contexts[0])), respond(self, contexts, *a, **k))[1])
    drift_mod.drift(tiny64, tokenizer, pirate, framing=framing, turns=1, conversations=1,
                    max_new_tokens=2, semantic=stub_scorer)
    assert pirate.prompt not in seen[0]
    assert seen[0].count("<|im_start|>system") == system_turns
    assert ("SmolLM" in seen[0]) == (framing == "default")


def _run(model, tokenizer, persona, scorer, reuse, **options):
    return drift_mod.drift(model, tokenizer, persona, system=persona.prompt, turns=4,
                           conversations=3, max_new_tokens=6, reuse_cache=reuse,
                           semantic=scorer, **options)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_reuse_gives_the_same_tokens(monkeypatch, tiny64, tokenizer, pirate, stub_scorer,
                                           temperature):
    # User turns of very different lengths leave masked columns; compact at every chance.
    monkeypatch.setattr(decoding.Conversations, "compact_fraction", 0.0)
    long = ("What is the tallest mountain in the world and how was its height measured by "
            "surveyors in the nineteenth century, and by satellites today?")
    turns = ["Hi", long, "Why?", "Ok"]
    runs = [_run(tiny64, tokenizer, pirate, stub_scorer, reuse, temperature=temperature,
                 user_turns_list=turns) for reuse in (True, False)]
    assert runs[0].transcripts == runs[1].transcripts
    assert runs[0].scores == runs[1].scores
    reused, fresh = runs[0].stats["answerer"], runs[1].stats["answerer"]
    assert reused["reused_tokens"] > 0 and fresh["reused_tokens"] == 0
    assert reused["prefill_tokens"] < fresh["prefill_tokens"]
    assert reused["compactions"] > 0


def test_cache_keeps_only_the_agreeing_prefix(tiny64, tokenizer):
    """A context that rewrites part of the cached history (an answer that re-tokenizes
    differently) is answered exactly as from scratch."""
    stops = {tokenizer.eos_token_id}
    first = [tokenizer("Hello there, how are you?")["input_ids"],
             tokenizer("Tell me a story about a ship.")["input_ids"]]
    generator = torch.Generator().manual_seed(0)
    kept = decoding.Conversations(tiny64, 2, tokenizer.pad_token_id, stops, reuse=True)
    answers = kept.respond(first, 5, 0.0, 1.0, generator)
    second = [first[0] + answers[0] + tokenizer(" And then?")["input_ids"],
              first[1][:3] + tokenizer(" completely different text")["input_ids"]]
    again = kept.respond(second, 5, 0.0, 1.0, generator)
    fresh = decoding.Conversations(tiny64, 2, tokenizer.pad_token_id, stops, reuse=False)
    assert again == fresh.respond(second, 5, 0.0, 1.0, generator)
    assert kept.stats["mismatches"] == 1
    assert kept.tokens[1][:len(second[1])] == second[1]


def test_self_play_user(tiny64, tokenizer, pirate, stub_scorer):
    entered = []

    class Side:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    result = drift_mod.drift(tiny64, tokenizer, pirate, system=pirate.prompt, turns=3,
                             conversations=2, max_new_tokens=4, user="self",
                             user_max_new_tokens=6, user_side=Side, semantic=stub_scorer)
    assert len(entered) == 2  # turns 2 and 3 are written by the user side
    scripted = {t for lines in drift_mod.user_turns().values() for t in lines}
    for transcript in result.transcripts:
        assert transcript[0]["user"] in scripted
        assert all(turn["user"] for turn in transcript)
    assert result.stats["asker"]["generated_tokens"] > 0


@pytest.mark.parametrize("options, message", [
    ({"turns": 0}, "turns=0"),
    ({"conversations": 0}, "conversations=0"),
    ({"user": "robot"}, "user='robot'"),
    ({"framing": "sideways"}, "unknown framing"),
    ({"system": "  "}, "system is an empty string"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"user_turns_list": ["", " "]}, "user_turns_list is empty"),
])
def test_drift_refuses_bad_input(tiny64, tokenizer, pirate, stub_scorer, options, message):
    with pytest.raises(ValueError, match=message):
        drift_mod.drift(tiny64, tokenizer, pirate, semantic=stub_scorer, **options)


# -- drift arithmetic and plots ------------------------------------------------------------------

def _constructed() -> DriftResult:
    # Two conversations of 6 turns; only "adherence" matters for the arithmetic.
    values = [[1.0, 0.9, 0.8, 0.6, 0.4, 0.2], [0.8, 0.8, 0.8, 0.8, 0.5, 0.5]]
    scores = {s: values for s in drift_mod.SCORERS}
    transcripts = [[{"user": f"u{t}", "answer": f"a{t}"} for t in range(6)] for _ in values]
    return DriftResult("pirate", None, scores, transcripts, {"user": "scripted"})


def test_drift_arithmetic_on_a_constructed_curve():
    result = _constructed()
    mean, se = result.curve()
    assert mean == pytest.approx([0.9, 0.85, 0.8, 0.7, 0.45, 0.35])
    assert se[0] == pytest.approx(np.std([1.0, 0.8], ddof=1) / math.sqrt(2))
    d = result.drift(k=3)
    # First-3 means 0.9 and 0.8; turn 6: 0.2 and 0.5 -> drifts 0.7 and 0.3.
    assert d["first"] == pytest.approx(0.85) and d["at_value"] == pytest.approx(0.35)
    assert d["drift"] == pytest.approx(0.5)
    assert d["drift_se"] == pytest.approx(np.std([0.7, 0.3], ddof=1) / math.sqrt(2))
    # Last 3: 0.4 and 0.6 -> drifts 0.5 and 0.2.
    assert d["drift_last"] == pytest.approx(0.35)
    assert d["drift_last_se"] == pytest.approx(np.std([0.5, 0.2], ddof=1) / math.sqrt(2))
    assert result.drift(k=1, at=2)["drift"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="k=7"):
        result.drift(k=7)
    with pytest.raises(ValueError, match="at=0"):
        result.drift(at=0)
    one = DriftResult("p", None, {"adherence": [[1.0, 0.0]]}, [[{}, {}]])
    assert one.drift(k=1)["drift"] == 1.0 and one.drift(k=1)["drift_se"] is None

    other = _constructed()
    other.scores = {s: [[v - 0.1 * (t > 0) for t, v in enumerate(row)] for row in rows]
                    for s, rows in other.scores.items()}
    diff = drift_mod.drift_difference(other, result, k=1)
    # Paired by conversation: every conversation's drift grows by exactly 0.1.
    assert diff["paired"] and diff["drift"] == pytest.approx(0.1)
    assert diff["drift_se"] == pytest.approx(0.0, abs=1e-12)

    data = json.loads(json.dumps(result.to_dict()))
    assert data["drift"]["adherence"]["drift"] == pytest.approx(0.5)
    assert DriftResult.from_dict(data).scores == result.scores


def test_plot_drift_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "drift.png"
    assert drift_mod.plot_drift({"prompted": _constructed(), "baked": _constructed()}, path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["drift.png"]
    with pytest.raises(ValueError, match="no drift results"):
        drift_mod.plot_drift({}, tmp_path / "empty.png")


def test_drift_modes_of_a_baked_model(tiny_dir, tokenizer, pirate, stub_scorer, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from promptbake.artifact import Baked
    from promptbake.framing import Framing

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()
    baked = Baked(model, tokenizer, Framing(tokenizer, pirate.prompt, "empty"), manifest={})
    with caplog.at_level(logging.INFO, logger="promptbake"):
        results = drift_mod.drift_modes(baked, turns=2, conversations=2, max_new_tokens=4,
                                        temperature=0.0, semantic=stub_scorer)
    assert list(results) == ["prompted", "baked", "base"]
    said = [r.getMessage() for r in caplog.records if "drift of the" in r.getMessage()]
    assert len(said) == 3 and all(re.fullmatch(r"promptbake: drift of the \w+ model: -?\d+\.\d{3} "
                                               r"± \d+\.\d{3}", line) for line in said), said
    assert results["prompted"].system == pirate.prompt and results["baked"].system is None
    assert all(r.settings["framing"] == "empty" for r in results.values())
    users = [[t["user"] for t in c] for c in results["base"].transcripts]
    assert all([[t["user"] for t in c] for c in r.transcripts] == users for r in results.values())
    answers = {mode: [[t["answer"] for t in c] for c in r.transcripts]
               for mode, r in results.items()}
    assert answers["baked"] != answers["base"]  # the adapter was on for "baked" only
    with torch.no_grad(), modeling.BASE.active(model):
        again = drift_mod.drift(model, tokenizer, pirate, framing="empty", turns=2,
                                conversations=2, max_new_tokens=4, temperature=0.0,
                                semantic=stub_scorer)
    assert [[t["answer"] for t in c] for c in again.transcripts] == answers["base"]
    with pytest.raises(ValueError, match="modes="):
        drift_mod.drift_modes(baked, modes=["teacher"], semantic=stub_scorer)


def test_one_line_user_list_repeats_instead_of_hanging():
    assert drift_mod.scripted_conversation(3, 0, {"openers": ["Hello"]}) == ["Hello"] * 3


def test_seeds_share_no_conversation(tiny64, tokenizer, pirate, stub_scorer):
    users = {}
    for seed in (0, 1):
        result = drift_mod.drift(tiny64, tokenizer, pirate, turns=4, conversations=2, seed=seed,
                                 max_new_tokens=1, semantic=stub_scorer)
        users[seed] = [[t["user"] for t in c] for c in result.transcripts]
    assert users[0][0] != users[0][1]
    assert not any(a == b for a in users[0] for b in users[1])  # seed + c would share one


def test_drift_difference_needs_a_common_turn():
    long = _constructed()
    short = DriftResult(long.persona, None, {s: [v[:2] for v in vals]
                                             for s, vals in long.scores.items()},
                        [t[:2] for t in long.transcripts])
    with pytest.raises(ValueError, match="pass at="):
        drift_mod.drift_difference(long, short, k=1)
    assert drift_mod.drift_difference(long, short, k=1, at=2)["at"] == 2
