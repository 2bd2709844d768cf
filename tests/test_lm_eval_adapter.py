"""The lm-evaluation-harness adapter: a task defined by a local YAML file and JSON lines, run
offline on the tiny model, agrees with promptbake's own scorer on the same items."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from promptbake import tasks
from promptbake.decoding import greedy
from promptbake.lm_eval_adapter import PromptbakeLM, run_lm_eval

ITEMS = 12


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A multiple-choice harness task over the first items of the shipped world_facts file."""
    folder = tmp_path_factory.mktemp("lm-eval-task")
    data = folder / "facts.jsonl"
    items = tasks.load_task("world_facts", limit=ITEMS).items
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "pb_facts.yaml").write_text(f"""task: pb_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))


@pytest.mark.parametrize("system", [None, "You are a careful geography teacher."])
def test_harness_accuracy_matches_own_scorer(tiny, tokenizer, local_task, system):
    found = run_lm_eval(tiny, tokenizer, ["pb_facts"], system=system, include_path=local_task,
                        include_defaults=False, log_samples=True)
    ours = tasks.load_task("world_facts", limit=ITEMS)(tiny, tokenizer, system)
    result = found["results"]["pb_facts"]
    assert result["acc,none"] == pytest.approx(ours.value)
    assert result["acc_stderr,none"] == pytest.approx(ours.se)
    samples = sorted(found["samples"]["pb_facts"], key=lambda s: s["doc_id"])
    assert len(samples) == ITEMS
    for sample, item in zip(samples, ours.items):
        harness = [r[0] for r in sample["filtered_resps"]]
        # The harness moves the context's trailing newline (the end of the assistant header)
        # into every continuation, as its HF model does: the same constant for every choice.
        shifts = [h - o for h, o in zip(harness, item["logprobs"])]
        assert max(shifts) - min(shifts) == pytest.approx(0, abs=1e-4)
        assert shifts[0] < 0
        assert sample["acc"] == item["score"]
        context = sample["arguments"][0][0]
        assert (system in context) if system else "You are a helpful AI assistant" in context


def test_loglikelihood_rolling_equals_a_plain_forward(tiny, tokenizer):
    lm = PromptbakeLM(tiny, tokenizer)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.prefix_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny(torch.tensor([ids])).logits[0, :-1].double()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).sum()
    assert total == pytest.approx(float(expected), abs=1e-3)
    # windows shorter than the text: each token is predicted from at most 8 tokens of context
    short = PromptbakeLM(tiny, tokenizer, max_length=8)
    (windowed,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert math.isfinite(windowed) and windowed != pytest.approx(total, abs=1e-3)


def test_loglikelihood_greedy_flag(tiny, tokenizer):
    lm = PromptbakeLM(tiny, tokenizer)
    context = "Once upon a time"
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        best = int(tiny(torch.tensor([ids])).logits[0, -1].argmax())
    other = (best + 1) % len(tokenizer)
    greedy_text, other_text = tokenizer.decode([best]), tokenizer.decode([other])
    requests = [Instance("loglikelihood", {}, (context, c), k)
                for k, c in enumerate([greedy_text, other_text])]
    (lp_best, is_best), (lp_other, is_other) = lm.loglikelihood(requests)
    if tokenizer(context + greedy_text, add_special_tokens=False)["input_ids"] == ids + [best]:
        assert is_best and lp_best > lp_other
    assert not is_other


def test_generate_until_is_greedy_and_stops(tiny, tokenizer):
    lm = PromptbakeLM(tiny, tokenizer)
    chat = [{"role": "user", "content": "Name a colour."}]
    context = lm.apply_chat_template(chat)
    prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
    expected = greedy(tiny, [prefix], max_new_tokens=10, stop_ids=lm.stop_ids,
                      pad_id=lm.pad_id)[0]
    full = tokenizer.decode(expected, skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a stop string inside the greedy answer
    free, cut = lm.generate_until([
        Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 10}), 0),
        Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 10}), 1)])
    assert free == full
    assert cut == full.split(stop, 1)[0] and len(cut) < len(full)


def test_chat_template_follows_system_and_framing(tiny, tokenizer):
    chat = [{"role": "user", "content": "Hi"}]
    default = PromptbakeLM(tiny, tokenizer).apply_chat_template(chat)
    bare = PromptbakeLM(tiny, tokenizer, framing="none").apply_chat_template(chat)
    prompted = PromptbakeLM(tiny, tokenizer, system="Be brief.").apply_chat_template(chat)
    harness = PromptbakeLM(tiny, tokenizer, system="Be brief.").apply_chat_template(
        [{"role": "system", "content": "Be kind."}] + chat)
    assert "SmolLM" in default and "SmolLM" not in bare and "system" not in bare
    assert "Be brief." in prompted and "SmolLM" not in prompted
    assert "Be kind." in harness and "Be brief." not in harness
    with pytest.raises(ValueError, match="framing"):
        PromptbakeLM(tiny, tokenizer, framing="odd")
    with pytest.raises(ValueError, match="chat_template"):
        run_lm_eval(tiny, tokenizer, ["x"], system="u", chat_template=False)


def test_registered_model_type():
    from lm_eval.api.registry import get_model

    assert get_model("promptbake") is PromptbakeLM
