"""The baking engine on the tiny model: a two-cycle run end to end, switching and stopping on
scripted scores, resume after a kill, failing evaluators, and the candidate machinery."""

import dataclasses
import json
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from promptbake import BakeConfig, engine, load_baked
from promptbake.engine import Cycle, EngineConfig, run_engine
from promptbake.tasks import Score

SMALL = {"train_contexts": 3, "eval_contexts": 2, "probe_contexts": 0}  # bakes of a second or two
QUESTIONS = ["How are you?", "What is the sea?", "Hello!", "Name a colour."]


class Scripted:
    """An evaluator whose held-out values follow a script (one value per call, the last one
    repeating), each item scoring the value; it counts its calls and can fail on one."""

    def __init__(self, name, values, fail_on=None, error=RuntimeError):
        self.name, self.values, self.calls, self.fail_on, self.error = name, list(values), 0, \
            fail_on, error

    def __call__(self, model, tokenizer, system=None, *, framing="default"):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise self.error(f"{self.name} failed on call {self.calls}")
        value = self.values[min(self.calls, len(self.values)) - 1]
        items = [{"id": f"i{k}", "score": value, "prediction": "", "target": ""} for k in range(4)]
        return Score.from_items(self.name, items, chance=None, metric="scripted")


def cycles(next_token_evaluator, a_values=None, b_values=None, **options):
    """Two cycles on the tiny model: dev by a real next-token evaluator, held-out scripted (or
    real when no script is given)."""
    dev_a = next_token_evaluator(QUESTIONS[:2], 1000, name="dev-a")
    dev_b = next_token_evaluator(QUESTIONS[2:], 2000, name="dev-b")
    held_a = Scripted("held-a", a_values) if a_values else \
        next_token_evaluator(QUESTIONS, 1000, name="held-a")
    held_b = Scripted("held-b", b_values) if b_values else \
        next_token_evaluator(QUESTIONS, 2000, name="held-b")
    demo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr, hi."}]
    return [Cycle("a", "You are a pirate. Speak like one. Say arr.", dev_a, held_a,
                  demonstrations=[demo], **options),
            Cycle("b", [{"role": "system", "content": "Answer in French."},
                        {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": "Bonjour"}], dev_b, held_b)]


def test_two_cycles_end_to_end(tiny_dir, next_token_evaluator, round_config, tmp_path):
    out = tmp_path / "engine"
    result = run_engine(cycles(next_token_evaluator), model=tiny_dir,
                        config=EngineConfig(max_rounds=2, proposals=1, edits=2, threshold=0.0, proposal_tokens=24,
                                            patience=3),
                        bake_config=round_config(steps=3, **SMALL), out=out)
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert result.stopped == "round limit"
    first = result.rounds[0]
    assert first["cycle"] == "a" and "failed" not in first
    sources = [c["source"] for c in first["candidates"]]
    assert sources[0] == "incumbent" and len(sources) >= 2
    assert any(s.startswith("edit:") for s in sources)
    assert set(first["held_out"]) == {"a", "b"}  # every cycle measured after every round
    assert {"scoring", "proposing", "baking", "held-out"} <= set(first["phases"])  # wall time
    for cycle in ("a", "b"):
        assert set(result.references[cycle]) == {"base", "prompted"}
    saved = json.loads((out / "engine.json").read_text())
    assert saved["result"]["best_round"] == result.best_round and len(saved["rounds"]) == 2
    assert saved["references_seconds"] > 0  # the references' time, kept across resumes
    # each round's state loads with plain PEFT, and with load_baked
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                              out / "rounds" / "round-2")
    state = load_baked(out / "rounds" / "round-1")
    assert state.manifest["kind"] == "engine-round"
    assert (out / "final").is_dir() == bool(result.best_round) == (result.baked is not None)
    if result.best_round:
        kept = load_baked(out / "final")
        assert kept.manifest["engine"]["best_round"] == result.best_round
        assert result.baked.path == out / "final"
    # a bake report on a round's state says whose KL its manifest holds, with no gate on it
    from promptbake.report import report

    record = report(out / "rounds" / "round-2", tasks=[], persona="", strengths=(1.0,))
    assert "first bake" in record["stacked"] and "engine directory" in record["stacked"]
    assert not any("held-out KL reduction" in g["target"] for g in record["gates"])
    assert "**Note**: an engine round's state" in (out / "rounds" / "round-2" /
                                                   "report.md").read_text()
    # a finished run is read back, not run again; more rounds continue it
    again = run_engine(cycles(next_token_evaluator), model=tiny_dir,
                       config=EngineConfig(max_rounds=2, proposals=1, edits=2, threshold=0.0, proposal_tokens=24,
                                           patience=3),
                       bake_config=round_config(steps=3, **SMALL), out=out)
    assert again.rounds == result.rounds


def test_rounds_your_prompt_wins_bake_as_the_own_prompts_run_does(tiny_dir,
                                                                   next_token_evaluator,
                                                                   round_config):
    # every candidate ties on dev, so your prompt wins each round: the proposals and edits
    # scored beside it change nothing, and the run makes the own-prompts run's bakes exactly
    # (what lets the engine suite take that run from this one, python bench/ --only engine)
    def run(proposals, edits):
        two = cycles(next_token_evaluator)
        two[0].dev, two[1].dev = Scripted("dev-a", [0.5]), Scripted("dev-b", [0.5])
        return run_engine(two, model=tiny_dir, bake_config=round_config(steps=2, **SMALL),
                          config=EngineConfig(max_rounds=2, proposals=proposals, edits=edits,
                                              proposal_tokens=16, patience=3))

    engine_run, own = run(1, 2), run(0, 0)
    assert all(len(r["candidates"]) > 1 and r["winner"]["source"] == "incumbent"
               for r in engine_run.rounds)
    assert [r["held_out"] for r in engine_run.rounds] == [r["held_out"] for r in own.rounds]
    assert [r["bake_kl"] for r in engine_run.rounds] == [r["bake_kl"] for r in own.rounds]


def test_plateau_switches_and_stops(tiny_dir, next_token_evaluator, round_config):
    # held-out script per cycle: base, prompted, then one value per round. a gains in round 1,
    # not in round 2 (plateau, patience 1) -> b; b gains in round 3, not in round 4 -> stop.
    a = [0.1, 0.5, 0.3, 0.3, 0.3, 0.3]
    b = [0.2, 0.6, 0.2, 0.2, 0.5, 0.5]
    result = run_engine(cycles(next_token_evaluator, a, b), model=tiny_dir,
                        config=EngineConfig(max_rounds=8, proposals=0, edits=0, patience=1,
                                            threshold=0.05),
                        bake_config=round_config(steps=1, **SMALL))
    assert [r["cycle"] for r in result.rounds] == ["a", "a", "b", "b"]
    assert [bool(r.get("plateau")) for r in result.rounds] == [False, True, False, True]
    assert result.stopped == "every cycle plateaued"
    # objective: min(a / 0.5, b / 0.6); round 3 and 4: min(0.6, 0.833) = 0.6, round 1: 0.333
    assert result.best_round == 3
    assert result.baked is not None
    assert result.survival["a"]["after_own_round"] == pytest.approx(0.3)
    assert result.survival["b"]["kept"] == pytest.approx(0.5)


def test_every_cycle_gets_a_round_before_the_limit(tiny_dir, next_token_evaluator,
                                                   round_config):
    # a gains every round, so it never plateaus; with three rounds, b still gets the last one
    a = [0.1, 0.5, 0.2, 0.3, 0.4, 0.5]
    b = [0.2, 0.6, 0.2, 0.2, 0.2, 0.5]
    result = run_engine(cycles(next_token_evaluator, a, b), model=tiny_dir,
                        config=EngineConfig(max_rounds=3, proposals=0, edits=0, patience=1),
                        bake_config=round_config(steps=1, **SMALL))
    assert [r["cycle"] for r in result.rounds] == ["a", "a", "b"]
    assert result.stopped == "round limit"


def test_a_weak_teacher_is_flagged(tiny_dir, next_token_evaluator, round_config):
    reference = {"base": {"value": 0.1}, "prompted": {"value": 0.5}}
    assert engine.weak_teacher(0.1, reference) == pytest.approx(0.0)
    assert engine.weak_teacher(0.25, reference) == pytest.approx(0.375)
    assert engine.weak_teacher(0.35, reference) is None  # over half the gain: not weak
    assert engine.weak_teacher(0.0, {"base": {"value": 0.5}, "prompted": {"value": 0.4}}) is None
    # after round 1's bake, cycle b's prompt does on the current model (dev 0.2) what nothing
    # does on the base model (held-out 0.2, prompted 0.6): its round is flagged. Round 1's
    # dev 0.1 is as low against a's references, but before the first bake the current model
    # is the base model, whose reading of the prompt the references are: not flagged.
    two = cycles(next_token_evaluator, [0.1, 0.5, 0.3, 0.3], [0.2, 0.6, 0.2, 0.5])
    two[0].dev, two[1].dev = Scripted("dev-a", [0.1]), Scripted("dev-b", [0.2])
    said = []
    result = run_engine(two, model=tiny_dir, say=said.append,
                        config=EngineConfig(max_rounds=2, proposals=0, edits=0, patience=1),
                        bake_config=round_config(steps=1, **SMALL))
    assert [r["cycle"] for r in result.rounds] == ["a", "b"]
    assert "weak_teacher" not in result.rounds[0]
    assert result.rounds[1]["weak_teacher"] == pytest.approx(0.0)
    assert any("cycle b's prompt" in m and "teacher is weak" in m for m in said)


def test_the_base_model_can_teach_every_round(tiny_dir, next_token_evaluator, round_config):
    from transformers import AutoTokenizer

    two = cycles(next_token_evaluator)
    config = EngineConfig(max_rounds=2, proposals=0, edits=0, patience=3, threshold=0.0,
                          teacher="base")
    bake_config = round_config(steps=2, **SMALL)
    result = run_engine(two, model=tiny_dir, config=config, bake_config=bake_config)
    first, second = result.rounds
    assert second["cycle"] == "b"
    # The second round's bake learns from the base model with its prompt, and its candidates
    # are scored on the base model: the model that reads the winner.
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    expected = two[1].dev(base, AutoTokenizer.from_pretrained(tiny_dir), two[1].prompt,
                          framing=bake_config.framing)
    assert second["candidates"][0]["dev"]["value"] == pytest.approx(expected.value, rel=1e-5)
    assert "the teacher is" in second["bake_kl"][0]["measured_on"]
    assert "the teacher is" not in first["bake_kl"][0]["measured_on"]  # the base model anyway
    # With the current model as teacher (the default), the same round scores on that model.
    current = run_engine(cycles(next_token_evaluator), model=tiny_dir,
                         config=dataclasses.replace(config, teacher="current"),
                         bake_config=bake_config)
    assert current.rounds[1]["candidates"][0]["dev"]["value"] != pytest.approx(expected.value,
                                                                               rel=1e-5)
    with pytest.raises(ValueError, match="teacher='teachers'"):
        EngineConfig(teacher="teachers").validate()


def test_rehearsal_adds_earlier_cycles_contexts_to_a_bake(tiny_dir, next_token_evaluator,
                                                          round_config, monkeypatch, tmp_path):
    from promptbake.report import engine_report
    from promptbake.orchestrate import stacking

    told = []
    real = engine.bake

    def spy(prompt, *args, rehearse=(), **kwargs):
        told.append([(r.prompt, r.count) for r in rehearse])
        return real(prompt, *args, rehearse=rehearse, **kwargs)

    monkeypatch.setattr(stacking, "bake", spy)  # bakes on top of the first
    monkeypatch.setattr(engine, "bake", spy)  # the first
    two = cycles(next_token_evaluator)
    two[0].contexts = QUESTIONS * 3
    result = run_engine(two, model=tiny_dir,
                        config=EngineConfig(max_rounds=2, proposals=0, edits=0, patience=3,
                                            threshold=0.0, rehearse=0.5, teacher="base"),
                        bake_config=round_config(steps=1, **SMALL), out=tmp_path / "run")
    first, second = result.rounds
    assert "rehearsed" not in first and second["rehearsed"] == {"a": 2}  # 0.5 x 3, rounded
    assert told == [[], [(two[0].prompt, 2)]]  # a's incumbent teaches a's contexts
    engine_report(tmp_path / "run")
    written = (tmp_path / "run" / "engine-report.md").read_text()
    assert "rehearsed a (2 contexts)" in written
    assert "Bakes taught by the base model, rehearsing 0.5× a bake's contexts" in written
    assert "| incumbent | 2 | — | 2 | — |" in written  # candidate sources: the only kind here
    with pytest.raises(ValueError, match="rehearse=-1"):
        EngineConfig(rehearse=-1).validate()
    two[1].contexts = "generated:8"  # not rehearsable: refused before any work
    with pytest.raises(ValueError, match="cycle b: rehearsal contexts 'generated:8'"):
        run_engine(two, model=tiny_dir, config=EngineConfig(rehearse=0.5),
                   bake_config=round_config(steps=1, **SMALL))
    # runs made before these settings existed keep their identity at the defaults
    assert not {"teacher", "rehearse"} & set(engine.resume_settings(EngineConfig()))
    assert {"teacher", "rehearse"} <= set(engine.resume_settings(
        EngineConfig(teacher="base", rehearse=0.5)))
    assert "sample_precision" not in engine.outcome_settings(BakeConfig())
    assert engine.outcome_settings(BakeConfig(sample_precision="bf16"))["sample_precision"] \
        == "bf16"


def test_a_cycles_bake_settings_apply_to_its_own_bakes(tiny_dir, next_token_evaluator,
                                                       round_config, monkeypatch):
    used = []
    real = engine._State.bake
    monkeypatch.setattr(engine._State, "bake", lambda self, prompt, contexts, config, *rest: (
        used.append(config), real(self, prompt, contexts, config, *rest))[1])
    run_engine(cycles(next_token_evaluator, [0.1, 0.5, 0.4, 0.4], [0.2, 0.6, 0.3, 0.3],
                      bake={"first_token_weight": 4.0}), model=tiny_dir,
               config=EngineConfig(max_rounds=3, proposals=0, edits=0, patience=1,
                                   threshold=0.05),
               bake_config=round_config(steps=1, **SMALL))
    assert [c.first_token_weight for c in used] == [4.0, 4.0, None]  # a, a, then b


def test_a_fallen_cycle_is_flagged_and_runs_again(tiny_dir, next_token_evaluator, round_config):
    # a reaches 0.4 and plateaus; b's first round drops a to 0.2 (< 95% of 0.4), so a runs again
    # once b has plateaued: it gains in round 5 (on 0.4 just before it), not in round 6
    a = [0.1, 0.5, 0.4, 0.4, 0.2, 0.4, 0.45, 0.45]
    b = [0.2, 0.6, 0.2, 0.2, 0.5, 0.5, 0.5, 0.5]
    result = run_engine(cycles(next_token_evaluator, a, b), model=tiny_dir,
                        config=EngineConfig(max_rounds=8, proposals=0, edits=0),
                        bake_config=round_config(steps=1, **SMALL))
    assert [r["cycle"] for r in result.rounds] == ["a", "a", "b", "b", "a", "a"]
    assert [r["fallen"] for r in result.rounds] == [[], [], ["a"], [], [], []]
    assert [bool(r.get("plateau")) for r in result.rounds] == [False, True, False, True, False,
                                                                True]
    assert result.stopped == "every cycle plateaued" and result.survival["a"]["flagged"]


def test_a_cycle_that_stays_low_is_not_reopened_forever(tiny_dir, next_token_evaluator,
                                                        round_config):
    # b's rounds leave a below its best for good: a reruns once, then the engine stops
    a = [0.1, 0.5, 0.4, 0.4, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    b = [0.2, 0.6, 0.3, 0.3, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    result = run_engine(cycles(next_token_evaluator, a, b), model=tiny_dir,
                        config=EngineConfig(max_rounds=9, proposals=0, edits=0),
                        bake_config=round_config(steps=1, **SMALL))
    assert [r["cycle"] for r in result.rounds] == ["a", "a", "b", "b", "a"]
    assert result.stopped == "every cycle plateaued"


def test_resume_after_a_kill(tiny_dir, next_token_evaluator, round_config, tmp_path,
                             monkeypatch):
    out = tmp_path / "engine"
    settings = {"model": tiny_dir, "out": out, "bake_config": round_config(steps=1, **SMALL),
                "config": EngineConfig(max_rounds=3, proposals=0, edits=1, patience=5)}
    killed = cycles(next_token_evaluator, [0.1, 0.5, 0.2, 0.3, 0.4], [0.2, 0.6, 0.3, 0.3, 0.3])
    # cycle a's 4th held-out call is round 2's measurement: the process dies there
    killed[0].held_out.fail_on, killed[0].held_out.error = 4, KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_engine(killed, **settings)
    saved = json.loads((out / "engine.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1]
    saved["rounds"][0]["seconds"] = 1000.0  # as if round 1 had taken that long
    (out / "engine.json").write_text(json.dumps(saved))
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["round-1"]
    bakes = []
    original = engine._State.bake
    monkeypatch.setattr(engine._State, "bake",
                        lambda self, *a: bakes.append(1) or original(self, *a))
    resumed = run_engine(cycles(next_token_evaluator, [0.3, 0.4], [0.3, 0.3]), **settings)
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3]
    assert resumed.rounds[0] == saved["rounds"][0]  # round 1 kept as it was
    assert len(bakes) == 2  # rounds 2 and 3 only
    assert resumed.rounds[1]["deltas"] == 2  # baked on round 1's state, read back from disk
    assert resumed.rounds[1]["candidates"][0]["prompt"] == saved["rounds"][0]["winner"]["prompt"]
    # its time is the whole run's, the killed call's round included, not this call's alone
    assert resumed.seconds >= 1000.0
    # a run made with other settings is refused, or replaced when asked (a pipeline's stage)
    other = {**settings, "config": EngineConfig(max_rounds=1, proposals=0, edits=0)}
    with pytest.raises(ValueError, match="made with other engine settings: choose another"):
        run_engine(cycles(next_token_evaluator, [0.3], [0.3]), **other)
    said = []
    fresh = run_engine(cycles(next_token_evaluator, [0.3], [0.3]), replace_changed=True,
                       say=said.append, **other)
    assert [r["round"] for r in fresh.rounds] == [1]
    assert any("starting afresh" in m for m in said)
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["round-1"]


def test_failing_evaluator(tiny_dir, next_token_evaluator, round_config):
    options = {"model": tiny_dir, "bake_config": round_config(steps=1, **SMALL)}
    broken = cycles(next_token_evaluator, [0.1, 0.5, 0.2, 0.3], [0.2, 0.6, 0.3, 0.3])
    broken[0].held_out.fail_on = 3  # round 1's measurement
    result = run_engine(broken, config=EngineConfig(max_rounds=2, proposals=0, edits=0,
                                                    patience=5), **options)
    assert "RuntimeError: held-a failed" in result.rounds[0]["failed"]
    assert "held_out" in result.rounds[1]  # it went on, with the next cycle (a failure may
    assert result.rounds[1]["cycle"] == "b"  # repeat: it does not keep its cycle's turn)
    assert result.rounds[1]["deltas"] == 1  # on the base model: round 1's bake was undone
    assert not result.rounds[0].get("plateau")  # a failure is no round without gain
    broken = cycles(next_token_evaluator, [0.1, 0.5, 0.2, 0.3], [0.2, 0.6, 0.3, 0.3])
    broken[0].held_out.fail_on = 3
    stopped = run_engine(broken, config=EngineConfig(max_rounds=2, proposals=0, edits=0,
                                                     on_error="stop"), **options)
    assert stopped.stopped == "error" and len(stopped.rounds) == 1 and stopped.baked is None


def test_bad_input(tiny_dir, next_token_evaluator, tmp_path):
    two = cycles(next_token_evaluator)
    with pytest.raises(ValueError, match="repeat"):
        run_engine([two[0], two[0]], model=tiny_dir)
    with pytest.raises(ValueError, match="cycle name"):
        Cycle("a b", "x", None, None)
    with pytest.raises(ValueError, match="prompt"):
        Cycle("a", "", None, None)
    with pytest.raises(ValueError, match="not BakeConfig fields"):
        Cycle("a", "x", None, None, bake={"first_token_wieght": 8.0})
    for reserved in ("seed", "merge"):  # each would break every round's bake
        with pytest.raises(ValueError, match=f"engine sets {reserved} for every bake"):
            Cycle("a", "x", None, None, bake={reserved: 3})
    with pytest.raises(ValueError, match="on_error"):
        EngineConfig(on_error="ignore").validate()
    with pytest.raises(ValueError, match=r"max_rounds=0 \(at least 1\), edits=-1 \(at least 0\)"):
        EngineConfig(edits=-1, max_rounds=0).validate()
    bad = cycles(next_token_evaluator)
    bad[1].bake = {"epochs": -1.0}  # refused before the model loads, naming the cycle
    with pytest.raises(ValueError, match="cycle b: its bake settings: epochs=-1.0"):
        run_engine(bad, model=tmp_path / "no-model-here")
    with pytest.raises(ValueError, match="threshold"):
        EngineConfig(threshold=float("nan")).validate()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no engine run"):
        run_engine(two, model=tiny_dir, out=tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="proposer model"):
        run_engine(two, model=tiny_dir, config=EngineConfig(max_rounds=1, proposer=str(
            tmp_path / "missing")))


# -- candidates --------------------------------------------------------------------------------


def test_an_evaluator_is_identified_by_its_settings_too(pirate):
    from promptbake import tools
    from promptbake.persona import AdherenceEvaluator

    specs = tools.shipped.specs()[:2]
    items = tools.shipped.test_items(specs)[:4]
    key = engine.evaluator_key(tools.ToolUse(specs=specs, items=items))
    assert engine.evaluator_key(tools.ToolUse(specs=specs, items=items, batch_size=2)) == key
    reworded = [dataclasses.replace(specs[0], description="Does sums."), specs[1]]
    for other in ({"metric": "end_to_end"}, {"max_new_tokens": 32}, {"items": items[:3]},
                  {"specs": reworded}):
        assert engine.evaluator_key(tools.ToolUse(**{"specs": specs, "items": items,
                                                     **other})) != key, other
    contexts = ["Hello!", "What is the sea?"]
    key = engine.evaluator_key(AdherenceEvaluator(pirate, contexts))
    assert engine.evaluator_key(AdherenceEvaluator(pirate, contexts, batch_size=1)) == key
    assert engine.evaluator_key(AdherenceEvaluator(pirate, contexts, max_new_tokens=8)) != key
    louder = dataclasses.replace(pirate, saturation=pirate.saturation * 2)
    assert engine.evaluator_key(AdherenceEvaluator(louder, contexts)) != key


def test_demonstrations_and_edits():
    prompt = [{"role": "system", "content": "Use tools. Be brief."},
              {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "CALC(1+1)"},
              {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2."},
              {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "CALC(2+2)"}]
    head, demos = engine.demonstrations_in(prompt)
    assert head == prompt[:1] and [len(d) for d in demos] == [4, 2]
    extra = [{"role": "user", "content": "3*3?"}, {"role": "assistant", "content": "CALC(3*3)"}]
    found = dict(engine.edits(prompt, [extra, demos[0]], limit=10, rng=random.Random(0)))
    assert found["edit: drop demonstration 1"] == prompt[:1] + prompt[5:]
    assert found["edit: last demonstration first"] == prompt[:1] + prompt[5:] + prompt[1:5]
    assert found["edit: add a demonstration"] == prompt + extra  # the one not present yet
    assert found["edit: shorten"][0] == {"role": "system", "content": "Use tools."}
    assert len(engine.edits(prompt, [], limit=2, rng=random.Random(0))) == 2
    # a system text stays a text; one sentence cannot be shortened
    assert engine.edits("Be a cat.", [], limit=5, rng=random.Random(0)) == []
    assert dict(engine.edits("Be a cat. Purr.", [], 5, random.Random(0)))["edit: shorten"] == \
        "Be a cat."


def test_unique_and_choose():
    same = engine.unique([("incumbent", "Be a cat."), ("proposed", " be  a CAT. "),
                          ("edit", "Be a dog.")])
    assert [s for s, _ in same] == ["incumbent", "edit"]

    def score(values):
        return Score.from_items("t", [{"id": k, "score": v} for k, v in enumerate(values)],
                                chance=None)

    incumbent = score([0, 0, 1, 1])
    noisy = score([1, 0, 1, 0])  # same mean, no gain
    better = score([1, 1, 1, 1])
    assert engine.choose([incumbent, noisy])[0] == 0
    winner, record = engine.choose([incumbent, noisy, better])
    assert winner == 2 and record["difference"] == pytest.approx(0.5)
    assert engine.choose([better, incumbent])[0] == 0  # worse candidates never win


def test_proposals_come_from_the_model(tiny_dir):
    from promptbake import models

    lm, tokenizer, _ = models.load(tiny_dir)
    torch.manual_seed(0)
    found = engine.proposals(lm, tokenizer, "You are a pirate. Say arr.", 3,
                             failures=["- Hello -> hi"], seed=0, max_new_tokens=24)
    # a random tiny model writes noise: whatever it keeps is a plausible, new system text
    for source, prompt in found:
        assert source.startswith("proposed: ") and isinstance(prompt, str)
        assert prompt != "You are a pirate. Say arr." and len(prompt) <= 4 * 26 + 80
    assert engine.proposals(lm, tokenizer, "Be a cat.", 0, failures=[], seed=0) == []
