"""The tool-use evaluator end to end: a scripted model whose every answer is known, the tiny
random model with the real tokenizer, and (slow) the default model with the default rendering."""

import re
import types

import pytest
import torch

from promptbake.tools import ToolSpec, ToolUse, evaluation, metrics, paired, render, shipped
from promptbake.tools.evaluation import answer_passes, mentions_number
from promptbake.tools.spec import SpecError

ITEMS = [
    {"id": "right", "prompt": "What is 17 * 23?", "checks": [{"type": "mentions_number",
                                                              "value": 391}],
     "expected": [{"name": "CALC", "arguments": {"expression": ["17 * 23"]}}]},
    {"id": "other-order", "prompt": "What is 6 * 7?",
     "checks": [{"type": "mentions_number", "value": 42}],
     "expected": [{"name": "CALC", "arguments": {"expression": ["6 * 7"]}}]},
    {"id": "malformed", "prompt": "Capital of Peru?", "checks": [{"type": "contains",
                                                                  "value": "Lima"}],
     "expected": [{"name": "LOOKUP", "arguments": {"country": ["Peru"], "field": ["", "capital"]}}]},
    {"id": "unknown", "prompt": "Weather in Lima?", "checks": [{"type": "contains",
                                                                 "value": "Lima"}],
     "expected": [{"name": "LOOKUP", "arguments": {"country": ["Peru"]}}]},
    {"id": "stubborn", "prompt": "Days in early 2024?",
     "checks": [{"type": "mentions_number", "value": 60}],
     "expected": [{"name": "DAYS_BETWEEN", "arguments": {"start": ["2024-01-01"],
                                                         "end": ["2024-03-01"]}}]},
    {"id": "over", "prompt": "Say hi.", "expected": [], "checks": []},
    {"id": "direct", "prompt": "Tell me a joke.", "expected": [],
     "checks": [{"type": "contains", "value": "joke"}]},
]
FIRST = {"What is 17 * 23?": "CALC(17 * 23)", "What is 6 * 7?": "CALC(7 * 6)",
         "Capital of Peru?": "LOOKUP(Peru", "Weather in Lima?": "WEATHER(Lima)",
         "Days in early 2024?": "DAYS_BETWEEN(2024-01-01, 2024-03-01)",
         "Say hi.": "CALC(1 + 1)", "Tell me a joke.": "Here is a joke: none today."}
AFTER = {"What is 17 * 23?": "The answer is 391.", "What is 6 * 7?": "It is 42.",
         "Capital of Peru?": "I do not know.", "Weather in Lima?": "No idea.",
         "Days in early 2024?": "DAYS_BETWEEN(2024-01-01, 2024-03-01)", "Say hi.": "Hi!"}


class Scripted:
    """A stand-in for a causal LM whose greedy answer to each conversation is scripted: the
    first answer to a user message from FIRST, any answer after a tool result from AFTER.
    ``scripted_greedy`` replaces the evaluator's decoding while it is used."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.generation_config = types.SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.prompts = []

    def reply(self, prompt: str) -> str:
        turns = re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", prompt, re.DOTALL)
        last_user = max(i for i, (role, _) in enumerate(turns) if role == "user")
        question = turns[last_user][1]
        answered = any(role == "tool" for role, _ in turns[last_user:])
        return (AFTER if answered else FIRST)[question]


def scripted_greedy(model, prefixes, *, max_new_tokens, stop_ids, pad_id, batch_size):
    answers = []
    for ids in prefixes:
        prompt = model.tokenizer.decode(ids)
        model.prompts.append(prompt)
        answer = model.tokenizer(model.reply(prompt), add_special_tokens=False)["input_ids"]
        answers.append(answer[:max_new_tokens])
    return answers


@pytest.fixture
def scripting(monkeypatch):
    monkeypatch.setattr(evaluation, "greedy", scripted_greedy)


@pytest.fixture(scope="module")
def scored(tokenizer):
    model = Scripted(tokenizer)
    evaluator = ToolUse(items=ITEMS, batch_size=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "greedy", scripted_greedy)
        return evaluator(model, tokenizer, render(evaluator.specs, tokenizer)), model


def by_id(score):
    return {item["id"]: item for item in score.items}


def test_a_right_call_runs_and_its_result_answers(scored):
    item = by_id(scored[0])["right"]
    assert item["calls"] == [{"name": "CALC", "arguments": {"expression": "17 * 23"}}]
    assert item["tool_results"] == ["391"] and item["turns"] == ["CALC(17 * 23)",
                                                                  "The answer is 391."]
    assert item["call_correct"] and item["end_to_end"] and item["failure"] is None
    assert item["score"] == 1.0 and item["prediction"] == "The answer is 391."


def test_a_call_bfcl_rejects_can_still_answer_right(scored):
    item = by_id(scored[0])["other-order"]
    assert not item["call_correct"] and item["end_to_end"]
    assert item["failure"] == "wrong_value" and "expected one of ['6 * 7']" in item["message"]


def test_a_malformed_call_gets_an_error_result_and_a_second_turn(scored):
    item = by_id(scored[0])["malformed"]
    assert item["failure"] == "malformed" and item["tool_results"][0].startswith("error: ")
    assert item["turns"] == ["LOOKUP(Peru", "I do not know."] and not item["end_to_end"]
    unknown = by_id(scored[0])["unknown"]
    assert unknown["failure"] == "unknown_tool"
    assert "unknown tool 'WEATHER'" in unknown["tool_results"][0]


def test_a_model_that_keeps_calling_stops_after_max_rounds(scored):
    item = by_id(scored[0])["stubborn"]
    assert len(item["turns"]) == 3 and item["tool_results"] == ["60 days", "60 days"]
    assert item["call_correct"] and not item["end_to_end"]
    assert item["failure"] == "wrong_answer"


def test_over_calling_is_seen_on_no_tool_items(scored):
    over, direct = by_id(scored[0])["over"], by_id(scored[0])["direct"]
    assert over["called"] and over["failure"] == "over_call" and over["score"] == 0.0
    assert over["call_correct"] is None and over["kind"] == "no_tool"
    assert not direct["called"] and direct["failure"] is None and direct["score"] == 1.0


def test_metrics_have_standard_errors_over_the_items_they_concern(scored):
    found = metrics(scored[0])
    assert (found["call_accuracy"].value, found["call_accuracy"].n) == (pytest.approx(2 / 5), 5)
    assert found["end_to_end"].value == pytest.approx(2 / 5)
    assert (found["over_calling"].value, found["over_calling"].n) == (0.5, 2)
    assert found["failure:malformed"].value == pytest.approx(1 / 5)
    assert found["failure:wrong_answer"].value == pytest.approx(1 / 5)
    # sample standard deviation / sqrt(n), as every Score: values 1, 0, 0, 0, 1
    assert found["call_accuracy"].se == pytest.approx(((2 * 0.6 ** 2 + 3 * 0.4 ** 2) / 4 / 5) ** 0.5)
    # the headline: tool items by their end-to-end result, no-tool items by not calling
    assert scored[0].value == pytest.approx(3 / 7) and scored[0].n == 7


def test_paired_differences_are_item_by_item(scored, tokenizer, scripting):
    base = ToolUse(items=ITEMS, metric="call")(Scripted(tokenizer), tokenizer)
    gains = paired(base, scored[0])
    assert gains["call_accuracy"] == (0.0, 0.0, 5)  # the same script: no difference
    assert base.value == pytest.approx(3 / 7)  # calls right on 2 of 5, no call on 1 of 2
    no_call = ToolUse(items=ITEMS, metric="no_call")(Scripted(tokenizer), tokenizer)
    assert (no_call.n, no_call.value) == (2, 0.5)  # the no-tool items alone


def test_the_prompt_goes_before_the_conversation(scored, tokenizer, scripting):
    model = scored[1]
    first = next(p for p in model.prompts if "What is 17 * 23?" in p)
    assert first.index("You can use tools.") < first.index("What is 17 * 23?")
    assert first.endswith("<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n")
    for system, expected in [(None, "You are a helpful AI assistant named SmolLM"),
                             ("Be brief.", "<|im_start|>system\nBe brief.<|im_end|>")]:
        scripted = Scripted(tokenizer)
        ToolUse(items=ITEMS[:1])(scripted, tokenizer, system)
        assert scripted.prompts[0].startswith("<|im_start|>system") and \
            expected in scripted.prompts[0]


def test_the_evaluator_checks_what_it_is_given():
    spec = ToolSpec("SEARCH", "web search", {"type": "object", "properties": {}})
    with pytest.raises(ValueError, match=r"tools \['SEARCH'\] have no function"):
        ToolUse(specs=[spec], items=ITEMS)
    with pytest.raises(SpecError, match="calls 'WEATHER', which is not among the tools"):
        ToolUse(items=[{"id": 1, "prompt": "p", "expected": [
            {"name": "WEATHER", "arguments": {}}]}])
    with pytest.raises(ValueError, match="item ids repeat"):
        ToolUse(items=ITEMS[:1] * 2)
    with pytest.raises(ValueError, match="metric='f1'"):
        ToolUse(items=ITEMS, metric="f1")


def test_answers_are_checked_by_any_number_they_mention():
    assert mentions_number("There are 1,081 days from 2020-01-05 to 2022-12-21.", 1081)
    assert mentions_number("It is -40 degrees.", -40)
    assert not mentions_number("2024-03-01", -3)  # a date's parts are not negative numbers
    assert mentions_number("2024-03-01", 3) and not mentions_number("17 * 23", 391)
    assert answer_passes([{"type": "mentions_number", "value": 2.5},
                          {"type": "contains", "value": "km"}], "2.5 km")
    assert not answer_passes([{"type": "contains", "value": "Paris"}], "Lyon")


# -- the tiny random model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def test_the_evaluator_runs_on_a_real_model_batch_size_aside(tiny, tokenizer):
    evaluator = ToolUse(max_new_tokens=12)
    u = render(evaluator.specs, tokenizer)
    one = evaluator(tiny, tokenizer, u, limit=6)
    again = ToolUse(max_new_tokens=12, batch_size=1)(tiny, tokenizer, u, limit=6)
    assert one.n == 6 and [i["turns"] for i in one.items] == [i["turns"] for i in again.items]
    assert {i["kind"] for i in one.items} == {"tool", "no_tool"}
    assert set(metrics(one)) >= {"call_accuracy", "end_to_end", "over_calling"}
    base = evaluator(tiny, tokenizer, limit=6)
    assert [i["id"] for i in base.items] == [i["id"] for i in one.items]


# -- the default model --------------------------------------------------------------------------

@pytest.mark.slow
def test_default_rendering_gains_on_the_default_model(smollm2_dir):
    from promptbake import models

    torch.set_num_threads(1)
    model, tokenizer, _ = models.load(smollm2_dir)
    evaluator = ToolUse(items=shipped.test_items()[:24])
    base = evaluator(model, tokenizer)
    prompted = evaluator(model, tokenizer, render(evaluator.specs, tokenizer))
    gain, se, n = paired(base, prompted)["call_accuracy"]
    assert metrics(base)["call_accuracy"].value == 0.0
    assert gain > 2 * se, (gain, se, n)
