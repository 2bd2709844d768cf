"""The task suite: scoring on hand-checked items, the checkers, the code sandbox, the shipped
data's integrity, determinism and ``limit``."""

import json
import math
import re

import pytest
import torch

from promptbake import tasks
from promptbake.decoding import cut, greedy
from promptbake.framing import Framing
from promptbake.modeling import continuation_logprobs
from promptbake.tasks import TASKS, Score, Task, TaskError, checks, sandbox


@pytest.fixture(scope="module")
def tiny(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def _scripted(tiny_dir, bias: torch.Tensor):
    """The tiny model with an LM head whose logits are ``bias`` at every position: its
    log-probabilities are known exactly, whatever the input."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, bias.numel(), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head
    return model


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- multiple choice ----------------------------------------------------------------------------

def test_multiple_choice_uniform_model_prefers_fewest_tokens(tiny_dir, tokenizer):
    vocab = len(tokenizer)
    model = _scripted(tiny_dir, torch.zeros(vocab))  # every token has log-probability -log V
    long, short = "a long answer with many words", "yes"
    n_long, n_short = len(_ids(tokenizer, long)), len(_ids(tokenizer, short))
    assert n_short == 1 and n_long > 3
    task = Task("hand", [{"id": "q1", "prompt": "Pick one.", "choices": [long, short], "answer": 1},
                         {"id": "q2", "prompt": "Pick one.", "choices": [short, long], "answer": 1}])
    score = task(model, tokenizer)
    first, second = score.items
    assert first["logprobs"] == pytest.approx([-n_long * math.log(vocab), -math.log(vocab)])
    assert (first["prediction"], first["score"]) == (1, 1.0)
    assert (second["prediction"], second["score"]) == (0, 0.0)
    # per character, the long answer costs less: acc_norm picks it
    assert first["prediction_norm"] == 0 and first["acc_norm"] == 0.0
    assert second["prediction_norm"] == 1 and second["acc_norm"] == 1.0
    assert score.value == 0.5 and score.n == 2 and score.chance == 0.5
    assert score.se == pytest.approx(math.sqrt(0.5 / 2))  # sample sd 0.707 / sqrt(2)


def test_multiple_choice_argmax_follows_the_logits(tiny_dir, tokenizer):
    paris, lyon = _ids(tokenizer, "Paris"), _ids(tokenizer, "Lyon")
    bias = torch.zeros(len(tokenizer))
    bias[paris] = 5.0  # every token of "Paris" is likelier than any other token
    model = _scripted(tiny_dir, bias)
    task = Task("capitals", [{"id": 1, "prompt": "Capital of France?",
                              "choices": ["Lyon", "Paris", "Nice"], "answer": 1},
                             {"id": 2, "prompt": "Capital of Spain?",
                              "choices": ["Madrid", "Paris"], "answer": 0}])
    score = task(model, tokenizer)
    assert [item["prediction"] for item in score.items] == [1, 1]
    assert [item["score"] for item in score.items] == [1.0, 0.0]
    assert score.chance == pytest.approx((1 / 3 + 1 / 2) / 2)
    logz = math.log(len(tokenizer) - len(set(paris)) + len(set(paris)) * math.exp(5.0))
    assert score.items[0]["logprobs"][0] == pytest.approx(-len(lyon) * logz)


def test_multiple_choice_matches_a_plain_forward(tiny, tokenizer):
    """Log-probabilities from the shared-prefix scorer equal those of one full forward pass."""
    framing = Framing(tokenizer, "unused", "default")
    prefix = framing.student_ids([{"role": "user", "content": "What is the capital of France?"}])
    choices = [_ids(tokenizer, c) for c in ("Paris", "The city of Lyon")]
    found = continuation_logprobs(tiny, [prefix], [choices], tokenizer.pad_token_id)[0]
    for (value, _), choice in zip(found, choices):
        with torch.no_grad():
            logits = tiny(torch.tensor([prefix + choice])).logits[0, len(prefix) - 1:-1]
        expected = torch.log_softmax(logits.double(), -1).gather(
            1, torch.tensor(choice)[:, None]).sum()
        assert value == pytest.approx(float(expected), abs=1e-4)


def test_system_prompt_and_framing_change_the_input(tiny, tokenizer):
    task = tasks.load_task("world_facts", limit=3)
    plain = task(tiny, tokenizer)
    prompted = task(tiny, tokenizer, "You are a pirate.")
    bare = task(tiny, tokenizer, framing="none")
    assert plain.items[0]["logprobs"] != prompted.items[0]["logprobs"]
    assert plain.items[0]["logprobs"] != bare.items[0]["logprobs"]
    with pytest.raises(ValueError, match="framing"):
        task(tiny, tokenizer, framing="sideways")


# -- generation ---------------------------------------------------------------------------------

def test_generation_scored_by_checks(tiny_dir, tokenizer):
    seven = _ids(tokenizer, "7")
    assert len(seven) == 1
    bias = torch.zeros(len(tokenizer))
    bias[seven[0]] = 10.0
    model = _scripted(tiny_dir, bias)  # answers "777..." to everything
    task = Task("digits", [
        {"id": "a", "prompt": "What is 3 + 4?", "checks": [{"type": "number", "value": 7}],
         "max_new_tokens": 1},
        {"id": "b", "prompt": "What is 4 + 4?", "checks": [{"type": "number", "value": 8}],
         "max_new_tokens": 1},
        {"id": "c", "prompt": "Say 777 in capitals.",
         "checks": [{"type": "number", "value": 777}, {"type": "starts_with", "value": "7"}],
         "max_new_tokens": 3},
    ])
    score = task(model, tokenizer)
    assert [item["prediction"] for item in score.items] == ["7", "7", "777"]
    assert [item["score"] for item in score.items] == [1.0, 0.0, 1.0]
    assert score.items[2]["checks"] == [True, True]
    assert score.items[2]["target"] == [777, {"type": "starts_with", "value": "7"}]
    assert score.chance is None and score.value == pytest.approx(2 / 3)


def test_generation_stops_at_until(tiny_dir, tokenizer):
    seven = _ids(tokenizer, "7")
    bias = torch.zeros(len(tokenizer))
    bias[seven[0]] = 10.0
    model = _scripted(tiny_dir, bias)  # answers "777..." to everything
    item = {"id": "a", "prompt": "Say 7.", "checks": [{"type": "contains", "value": "7"}]}
    free = Task("free", [item], max_new_tokens=8)(model, tokenizer)
    assert free.items[0]["prediction"] == "7" * 8 and free.items[0]["tokens"] == 8
    # Decoding stops once the answer holds a stop string; the answer ends before it.
    stopped = Task("stopped", [item], max_new_tokens=8, until=("777",))(model, tokenizer)
    assert stopped.items[0]["tokens"] == 3 and stopped.items[0]["prediction"] == ""
    assert stopped.value == 0.0
    assert Task("none", [item], until=None).until == ()
    with pytest.raises(TaskError, match="stop strings"):
        Task("bad", [item], until="777")


def test_arithmetic_answer_ends_at_a_new_question():
    # A model shown worked Q/A examples answers, then invents more: the shipped arithmetic task
    # cuts the answer at the new question, so the number checked is the answer's own.
    task = TASKS["arithmetic"]
    text = "2 * 5 = 10. The answer is 10.\n\nQ: What is 10 * 2?\nA: 10 * 2 = 20. The answer is 20."
    assert checks.last_number(text) == 20
    assert checks.last_number(cut(text, task.until)) == 10


def test_greedy_batches_equal_one_at_a_time(tiny, tokenizer):
    """Left-padded batches, finished rows leaving the batch, any order: the same tokens as
    decoding each prompt alone with transformers' own greedy search."""
    prompts = ["Hi", "Tell me a long story about the sea and ships", "What is 2+2?", "Bye now"]
    prefixes = [_ids(tokenizer, p) for p in prompts]
    stop = {tokenizer.eos_token_id}
    batched = greedy(tiny, prefixes, max_new_tokens=12, stop_ids=stop,
                     pad_id=tokenizer.pad_token_id, batch_size=3)
    for prefix, tokens in zip(prefixes, batched):
        with torch.no_grad():
            out = tiny.generate(torch.tensor([prefix]), attention_mask=torch.ones(1, len(prefix),
                                dtype=torch.long), do_sample=False, max_new_tokens=12,
                                eos_token_id=list(stop), pad_token_id=tokenizer.pad_token_id)
        expected = [t for t in out[0, len(prefix):].tolist() if t not in stop]
        assert tokens == expected


def test_deterministic_and_limit(tiny, tokenizer):
    task = tasks.load_task("arithmetic", limit=4, max_new_tokens=8)
    first, second = task(tiny, tokenizer), task(tiny, tokenizer)
    assert first.n == 4 and [i["id"] for i in first.items] == [i["id"] for i in task.items]
    assert first.items == second.items
    scores = tasks.evaluate(tiny, tokenizer, ["sentiment", "world_facts"], limit=3)
    assert list(scores) == ["sentiment", "world_facts"]
    assert all(s.n == 3 for s in scores.values())
    assert scores["sentiment"].chance == 0.5
    with pytest.raises(TaskError, match="limit"):
        tasks.load_task("sentiment", limit=0)


def test_score_to_dict():
    score = Score.from_items("t", [{"id": 1, "score": 1.0}], chance=0.25)
    assert score.se is None and score.value == 1.0
    assert score.to_dict() == {"task": "t", "metric": "accuracy", "value": 1.0, "se": None,
                               "n": 1, "chance": 0.25}
    assert score.to_dict(items=True)["items"] == [{"id": 1, "score": 1.0}]
    json.dumps(score.to_dict(items=True))


# -- user task files ----------------------------------------------------------------------------

def test_task_from_user_jsonl(tmp_path, tiny, tokenizer):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "x", "prompt": "Is water wet?", "choices": ["Yes", "No"], '
                    '"answer": 0, "category": "easy"}\n\n'
                    '{"id": "y", "prompt": "Is fire cold?", "choices": ["Yes", "No"], '
                    '"answer": 1}\n')
    task = tasks.load_task(path)
    assert task.name == "mine" and task.kind == tasks.MULTIPLE_CHOICE and len(task.items) == 2
    score = tasks.evaluate(tiny, tokenizer, [path])["mine"]
    assert score.n == 2 and score.items[0]["category"] == "easy"


@pytest.mark.parametrize("lines, message", [
    (['{"id": 1, "prompt": "q", "choices": ["a", "b"], "answer": 2}'], "answer"),
    (['{"id": 1, "prompt": "q", "choices": ["a"], "answer": 0}'], "choices"),
    (['{"id": 1, "prompt": "q"}'], "needs 'choices'"),
    (['{"prompt": "q", "choices": ["a", "b"], "answer": 0}'], "'id'"),
    (['{"id": 1, "prompt": "q", "choices": ["a", "b"], "answer": 0}',
      '{"id": 1, "prompt": "r", "choices": ["a", "b"], "answer": 0}'], "repeats"),
    (['{"id": 1, "prompt": "q", "choices": ["a", "b"], "answer": 0}',
      '{"id": 2, "prompt": "r", "checks": [{"type": "uppercase"}]}'], "mixes"),
    (['{"id": 1, "prompt": "q", "checks": [{"type": "rhymes"}]}'], "type"),
    (['{"id": 1, "prompt": "q", "checks": [{"type": "language", "value": "xx"}]}'], "language"),
    (['{"id": 1, "prompt": "q", "checks": [{"type": "number", "value": "7"}]}'], "number"),
    (['not json'], "line 1"),
])
def test_bad_task_files_are_refused(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError, match=message):
        Task.from_jsonl(path)


def test_unknown_task_name():
    with pytest.raises(TaskError, match="unknown task"):
        tasks.load_task("no_such_task")


# -- checkers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, good, bad", [
    ({"type": "number", "value": 1081}, "23 * 47 = 1,081", "It is 1080, not 1081 minus 1: 1080"),
    ({"type": "number", "value": 64}, "Step 1: 8 * 8.\nSo the answer is 64.", "The answer is 6 4"),
    ({"type": "number", "value": -5}, "3 - 8 = -5", "3 - 8 = 5"),
    ({"type": "number", "value": 12}, "twelve, i.e. 12.0", "no digits here"),
    ({"type": "starts_with", "value": "Yes"}, "  yes, it is.", "Well, yes."),
    ({"type": "ends_with", "value": "Have a nice day!"}, "Paris. Have a nice day!\n",
     "Have a nice day! Paris."),
    ({"type": "contains", "value": "banana"}, "A BANANA is yellow.", "An apple is red."),
    ({"type": "excludes", "value": "the"}, "A cat sat.", "The cat sat."),
    ({"type": "language", "value": "fr"}, "Le chat est sur la table et il dort dans la maison.",
     "The cat is on the table and it sleeps in the house."),
    ({"type": "language", "value": "es"}, "El perro está en el jardín y el gato en la mesa.",
     "Le chien est dans le jardin et le chat est sur la table."),
    ({"type": "language", "value": "de"}, "Das Wetter ist heute sehr schön und die Sonne scheint.",
     "El tiempo es muy bueno hoy y el sol brilla."),
    ({"type": "uppercase"}, "THE SKY IS BLUE! 123", "THE SKY is BLUE"),
    ({"type": "lowercase"}, "the sea is wide.", "The sea is wide."),
    ({"type": "word_count", "min": 3, "max": 5}, "one two three four", "one two"),
    ({"type": "word_count", "max": 3}, "one two three", "one two three four"),
    ({"type": "json", "keys": ["name", "age"]}, '```json\n{"name": "Ann", "age": 30}\n```',
     '{"name": "Ann"}'),
    ({"type": "json"}, '["apple", "pear", "plum"]', "['apple', 'pear']"),
])
def test_checkers(kind, good, bad):
    checks.validate(kind, "test")
    assert checks.check(kind, good)
    assert not checks.check(kind, bad)


def test_language_detector_abstains():
    assert checks.detect_language("") is None
    assert checks.detect_language("OK 42") is None
    assert checks.detect_language("Bonjour, je suis très content de vous voir.") == "fr"


def test_python_check_runs_the_answer():
    kind = {"type": "python", "entry_point": "add", "tests": "assert add(2, 3) == 5\n"}
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nThis adds them."
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    assert checks.check(kind, good) and not checks.check(kind, bad)
    assert not checks.check(kind, "I cannot write code.")


def test_extract_code():
    two = "```python\nprint(1)\n```\nand\n```python\ndef f(x):\n    return x\n```"
    assert sandbox.extract_code(two, "f").startswith("def f(x)")
    assert sandbox.extract_code(two) == "print(1)\n"
    assert sandbox.extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"
    assert sandbox.extract_code("Sure.\ndef f():\n    return 1\n").startswith("def f")
    assert sandbox.extract_code("```js\nlet x = 1;\n```") is None
    assert sandbox.extract_code("no code") is None


# -- the shipped data ---------------------------------------------------------------------------

def test_shipped_suite():
    assert list(tasks.TASKS) == tasks.shipped() == ["arithmetic", "world_facts", "commonsense",
                                                    "sentiment", "instructions", "code"]
    kinds = {name: task.kind for name, task in tasks.TASKS.items()}
    assert kinds == {"arithmetic": "generation", "world_facts": "multiple_choice",
                     "commonsense": "multiple_choice", "sentiment": "multiple_choice",
                     "instructions": "generation", "code": "generation"}
    for name, task in tasks.TASKS.items():
        assert isinstance(task, tasks.Evaluator)
        assert task.name == name and len(task.items) >= 100, name
        prompts = [item["prompt"] for item in task.items]
        assert len(set(prompts)) == len(prompts), name
        if task.kind == "multiple_choice":
            for item in task.items:
                assert len(set(item["choices"])) == len(item["choices"]), item["id"]


_ARITHMETIC = re.compile(r"^(\d+) ([-+*]) (\d+)$")


def test_arithmetic_targets_are_computed():
    categories = {}
    for item in tasks.TASKS["arithmetic"].items:
        a, op, b = _ARITHMETIC.match(item["expression"]).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert item["checks"] == [{"type": "number", "value": value}], item["id"]
        assert item["prompt"] == f"What is {item['expression']}?"
        categories.setdefault(item["category"], []).append((int(a), int(b)))
    assert set(categories) == {"addition", "subtraction", "one_digit_product",
                               "two_digit_product"}
    assert all(a < 10 and b < 10 for a, b in categories["one_digit_product"])
    assert all(10 <= a < 100 and 10 <= b < 100 for a, b in categories["two_digit_product"])
    assert all(a > b for a, b in categories["subtraction"])


def test_code_items_reference_solutions_pass():
    for item in tasks.TASKS["code"].items:
        (kind,) = item["checks"]
        namespace = {}
        exec(item["solution"], namespace)  # noqa: S102 - our own reference solutions
        assert kind["entry_point"] in namespace, item["id"]
        exec(kind["tests"], namespace)  # noqa: S102
        assert f"`{kind['entry_point']}(" in item["prompt"]
    # and one through the sandbox, as model answers are run
    item = tasks.TASKS["code"].items[0]
    answer = f"```python\n{item['solution']}```"
    assert checks.check(item["checks"][0], answer)


def test_sentiment_is_balanced():
    answers = [item["answer"] for item in tasks.TASKS["sentiment"].items]
    assert abs(answers.count(0) - answers.count(1)) <= 2


def test_package_data_is_declared():
    from importlib import resources

    folder = resources.files("promptbake").joinpath("data/tasks")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".jsonl"))
    assert names == sorted(f"{n}.jsonl" for n in tasks.shipped())


# -- the real default model ---------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_answers_easy_items(smollm2_dir):
    from promptbake import models

    model, tokenizer, _ = models.load(smollm2_dir)
    facts = Task("easy", [{"id": "france", "prompt": "What is the capital of France?",
                           "choices": ["Lyon", "Paris", "Marseille", "Nice"], "answer": 1}])
    assert facts(model, tokenizer).value == 1.0
    sums = Task("sum", [{"id": "2+2", "prompt": "What is 2 + 2?",
                         "checks": [{"type": "number", "value": 4}]}], max_new_tokens=24)
    assert sums(model, tokenizer).value == 1.0
