"""Baking a tool on the tiny model, end to end: the prompt rendered from the specs, contexts of
questions and of conversations holding an executed result, the specs in the manifest, a tool
round trip in `promptbake chat`."""

import json

import pytest

from promptbake import cli, load_baked, tools
from promptbake.orchestrate import tools as tool_bake


def test_tool_specs_by_name():
    assert [s.name for s in tool_bake.tool_specs("shipped:CALC,WEEKDAY")] == ["CALC", "WEEKDAY"]
    assert len(tool_bake.tool_specs("shipped")) == 5
    with pytest.raises(ValueError, match="no shipped tool named NOPE"):
        tool_bake.tool_specs("shipped:CALC,NOPE")


def test_tool_config_has_the_tool_defaults_and_what_is_given():
    config = tool_bake.tool_config(epochs=2.0)
    assert (config.train_contexts, config.samples_per_context, config.first_token_weight,
            config.epochs) == (288, 1, tool_bake.TOOL_FIRST_TOKEN_WEIGHT, 2.0)
    assert tool_bake.tool_config(train_contexts=50).train_contexts == 50
    assert tool_bake.tool_config().epochs == tool_bake.TOOL_DEFAULTS["epochs"] == 8.0
    with pytest.raises(ValueError, match="samples_per_context"):
        tool_bake.tool_config(samples_per_context=0)


def test_conversations_with_results_come_from_the_prompted_models_own_calls(monkeypatch,
                                                                            tokenizer, tiny64):
    """Where the prompted model calls, the call runs and the conversation up to the result is a
    context; where it does not, nothing is added."""
    specs = tool_bake.tool_specs("shipped:CALC")
    answers = iter(["CALC(6 * 7)", "Paris is the capital.", "6 * 7 is 42."])

    def canned(model, prefixes, **options):
        return [tokenizer.encode(next(answers), add_special_tokens=False) for _ in prefixes]

    monkeypatch.setattr(tools.evaluation, "greedy", canned)
    made = tool_bake.tool_contexts(tiny64, tokenizer, tools.render(specs, tokenizer),
                                   ["What is 6 times 7?", "Capital of France?"], specs,
                                   tools.shipped.registry())
    assert made == [[{"role": "user", "content": "What is 6 times 7?"},
                     {"role": "assistant", "content": "CALC(6 * 7)"},
                     {"role": "tool", "content": "42"}]]


def test_a_tool_bake_end_to_end(tiny_dir, tmp_path, capsys, monkeypatch):
    real = tools.converse

    def calls_sometimes(model, tokenizer, questions, **options):
        """The random tiny model never writes a call: give every other question one, as the
        prompted default model does for some."""
        found = real(model, tokenizer, questions, **options)
        for i, ex in enumerate(found[::2]):
            ex.after_results = [{"role": "user", "content": questions[2 * i]},
                                {"role": "assistant", "content": "CALC(2 + 2)"},
                                {"role": "tool", "content": "4"}]
        return found

    monkeypatch.setattr(tools, "converse", calls_sometimes)
    out = tmp_path / "calc"
    assert cli.main(["bake", "--tools", "shipped:CALC", "--model", str(tiny_dir), "--out",
                     str(out), "--train-contexts", "6", "--eval-contexts", "2",
                     "--max-new-tokens", "6", "--steps", "2", "--sample-batch", "8",
                     "--quiet"]) == 0
    assert "conversations with a result" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["tools"]
    assert [s["name"] for s in record["specs"]] == ["CALC"] and len(record["sha256"]) == 64
    assert record["contexts"]["with_results"] > 0
    # a tool bake's defaults (the call-or-answer token weighing more, one sample per
    # question), except what the user sets
    assert manifest["config"]["first_token_weight"] == tool_bake.TOOL_FIRST_TOKEN_WEIGHT
    assert manifest["config"]["samples_per_context"] == 1
    assert manifest["config"]["epochs"] == tool_bake.TOOL_DEFAULTS["epochs"]
    assert manifest["config"]["train_contexts"] == 6
    messages = manifest["prompt"]["messages"]
    assert messages[0]["role"] == "system" and "CALC(" in messages[0]["content"]
    assert any(m["role"] == "tool" for m in messages)  # a demonstration with its result
    baked = load_baked(out)
    assert baked.prompt == messages
    monkeypatch.setattr(tools, "converse", real)
    assert cli.main(["chat", str(out), "--question", "What is 2 + 2?",
                     "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "--- base" in printed and "--- prompted" in printed and "--- baked" in printed
