"""Evaluators: a model and tokenizer in, a score with its standard error and per-item results out.

A task is a list of items read from JSON lines, one item per line, scored the two ways
lm-evaluation-harness scores tasks:

* **multiple choice** (an item has ``choices`` and ``answer``, the index of the right one): the
  summed log-probability of each choice's tokens after the chat-templated question; the argmax
  is the prediction. The length-normalised variant (log-probability per character, lm-eval's
  ``acc_norm``) is recorded in every item too.
* **generation** (an item has ``checks``): a greedy answer, then exact checkers
  (``promptbake.tasks.checks``); the item scores 1 when every check passes.

Every item has an ``id`` (unique) and a ``prompt`` (the user message); other fields are kept
in the per-item results. ``max_new_tokens`` on an item overrides the task's budget for it.

The suite shipped with the package (``TASKS``, files in ``promptbake/data/tasks``) has six tasks
of 100+ items: arithmetic, world_facts, commonsense, sentiment, instructions, code. Your own
file in the same schema becomes a task with ``Task.from_jsonl(path)`` or ``load_task(path)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

from promptbake import files
from promptbake.decoding import cut, greedy, stop_strings, stop_token_ids
from promptbake.framing import Framing
from promptbake.modeling import continuation_logprobs
from promptbake.tasks import checks, sandbox

log = logging.getLogger("promptbake")

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"


class TaskError(ValueError):
    """A task file or item cannot be used; the message names the file, the line and the fix."""


@dataclasses.dataclass
class Score:
    """A task's score: the mean of per-item scores, with its standard error."""

    task: str
    metric: str  # "accuracy" for every shipped task
    value: float  # mean over items
    se: float | None  # standard error of the mean (None if n < 2)
    n: int
    chance: float | None  # expected score of random guessing; None for generation
    items: list[dict] = dataclasses.field(repr=False)  # {"id", "score", "prediction", "target", ...}

    @classmethod
    def from_items(cls, task: str, items: list[dict], chance: float | None,
                   metric: str = "accuracy") -> Score:
        n = len(items)
        values = [float(item["score"]) for item in items]
        mean = sum(values) / n if n else float("nan")
        se = None
        if n >= 2:  # sample standard deviation / sqrt(n), as lm-eval's stderr of a mean
            se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
        return cls(task, metric, mean, se, n, chance, items)

    def to_dict(self, items: bool = False) -> dict:
        out = {k: getattr(self, k) for k in ("task", "metric", "value", "se", "n", "chance")}
        if items:
            out["items"] = self.items
        return out

    def __str__(self) -> str:
        se = "?" if self.se is None else f"{self.se:.3f}"
        chance = "" if self.chance is None else f", chance {self.chance:.3f}"
        return f"{self.task}: {self.metric} {self.value:.3f} ± {se} (n={self.n}{chance})"


@runtime_checkable
class Evaluator(Protocol):
    """Anything that scores a model: called with the model, its tokenizer and the system prompt
    to put in the chat (None: none, framed as ``framing`` says, see ``promptbake.framing``)."""

    name: str

    def __call__(self, model, tokenizer, system: str | None = None, *,
                 framing: str = "default") -> Score: ...


@dataclasses.dataclass
class Task:
    """A task read from JSON lines; calling it evaluates a model (an ``Evaluator``).

    ``batch_size``: questions per forward pass (multiple choice) or answers decoded together
    (generation). ``max_new_tokens``: the answer budget of generation items. ``until``: stop
    strings (lm-eval's ``until``): a generated answer ends before the first of them.
    """

    name: str
    items: list[dict] = dataclasses.field(repr=False)
    max_new_tokens: int = 128
    batch_size: int = 16
    description: str = ""
    until: tuple[str, ...] = ()
    kind: str = dataclasses.field(init=False)

    def __post_init__(self):
        if not self.items:
            raise TaskError(f"task {self.name!r} has no items")
        kinds = {_kind(item, f"task {self.name!r}, item {item.get('id')!r}")
                 for item in self.items}
        if len(kinds) > 1:
            raise TaskError(f"task {self.name!r} mixes multiple-choice and generation items: "
                            f"split them into two files")
        self.kind = kinds.pop()
        ids = [item["id"] for item in self.items]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise TaskError(f"task {self.name!r} repeats item ids {twice[:5]}: make them unique")
        self.until = () if self.until is None else self.until
        if isinstance(self.until, str) or not all(isinstance(u, str) and u for u in self.until):
            raise TaskError(f"task {self.name!r}: until={self.until!r} must be a list of "
                            f"non-empty stop strings")
        self.until = tuple(self.until)
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise TaskError(f"task {self.name!r}: max_new_tokens={self.max_new_tokens} and "
                            f"batch_size={self.batch_size} must be >= 1")

    @classmethod
    def from_jsonl(cls, path: str | Path, name: str | None = None, **options) -> Task:
        """A task from a JSON-lines file (one item per line, see the module docstring);
        ``name`` defaults to the file's stem, ``options`` are Task fields."""
        path = Path(path)
        if not path.is_file():
            raise TaskError(f"task file not found: {path}")
        return cls(name or path.stem, _read_items(path.read_text("utf-8"), str(path)), **options)

    @property
    def chance(self) -> float | None:
        """The expected accuracy of guessing uniformly among the choices (None: generation)."""
        if self.kind != MULTIPLE_CHOICE:
            return None
        return sum(1 / len(item["choices"]) for item in self.items) / len(self.items)

    def check_ready(self) -> None:
        """Raises before any scoring when the task cannot run here: code checks need the
        sandbox (``sandbox.SandboxUnavailable`` says why it is missing and how to opt out)."""
        if any(kind.get("type") == "python" for item in self.items
               for kind in item.get("checks", [])):
            sandbox.require()

    def head(self, limit: int | None) -> Task:
        """The same task on its first ``limit`` items (all of them for None)."""
        if limit is None:
            return self
        if limit < 1:
            raise TaskError(f"limit={limit} must be >= 1 (or None for every item)")
        return dataclasses.replace(self, items=self.items[:limit])

    def __call__(self, model, tokenizer, system: str | None = None, *, framing: str = "default",
                 limit: int | None = None) -> Score:
        task = self.head(limit)
        framer = Framing(tokenizer, system or "unused", framing)
        prefixes = [framer.teacher_ids([_user(item)]) if system else
                    framer.student_ids([_user(item)]) for item in task.items]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        started = time.perf_counter()
        progress = _Progress(task.name, len(task.items))
        if task.kind == MULTIPLE_CHOICE:
            items = task._multiple_choice(model, tokenizer, prefixes, pad_id, progress)
        else:
            items = task._generation(model, tokenizer, prefixes, pad_id, progress)
        score = Score.from_items(task.name, items, task.chance)
        log.info("%s (%.1f s)", score, time.perf_counter() - started)
        return score

    def _multiple_choice(self, model, tokenizer, prefixes, pad_id, progress) -> list[dict]:
        choices = [[_encode(tokenizer, c) for c in item["choices"]] for item in self.items]
        scored = continuation_logprobs(model, prefixes, choices, pad_id, self.batch_size,
                                       progress)
        out = []
        for item, found in zip(self.items, scored):
            logprobs = [lp for lp, _ in found]
            # lm-eval's acc_norm: log-probability per character of the choice
            per_char = [lp / max(1, len(c)) for lp, c in zip(logprobs, item["choices"])]
            prediction, normed = _argmax(logprobs), _argmax(per_char)
            out.append({**_extra(item), "id": item["id"],
                        "score": float(prediction == item["answer"]),
                        "prediction": prediction, "target": item["answer"],
                        "acc_norm": float(normed == item["answer"]), "prediction_norm": normed,
                        "logprobs": logprobs})
        return out

    def _generation(self, model, tokenizer, prefixes, pad_id, progress) -> list[dict]:
        stop_ids = stop_token_ids(tokenizer, model)
        stop = stop_strings(tokenizer, self.until)
        budgets = [item.get("max_new_tokens", self.max_new_tokens) for item in self.items]
        answers: list[list[int]] = [[] for _ in self.items]
        for budget in sorted(set(budgets)):  # one pass per distinct budget
            which = [i for i, b in enumerate(budgets) if b == budget]
            for i, tokens in zip(which, greedy(model, [prefixes[i] for i in which],
                                               max_new_tokens=budget, stop_ids=stop_ids,
                                               pad_id=pad_id, batch_size=self.batch_size,
                                               stop=stop,
                                               progress=progress)):
                answers[i] = tokens
        out = []
        for item, tokens in zip(self.items, answers):
            text = cut(tokenizer.decode(tokens, skip_special_tokens=True), self.until)
            passed = [checks.check(kind, text) for kind in item["checks"]]
            target = [_describe(kind) for kind in item["checks"]]
            out.append({**_extra(item), "id": item["id"], "score": float(all(passed)),
                        "prediction": text, "target": target[0] if len(target) == 1 else target,
                        "checks": passed, "tokens": len(tokens)})
        return out


def _user(item: dict) -> dict:
    return {"role": "user", "content": item["prompt"]}


def _encode(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise TaskError(f"choice {text!r} encodes to no tokens: give every choice some text")
    return ids


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first


def _describe(kind: dict) -> object:
    if kind["type"] == "number":
        return kind["value"]
    return {k: v for k, v in kind.items() if k not in ("tests",)}


_OWN = {"id", "prompt", "choices", "answer", "checks", "max_new_tokens", "solution"}


def _extra(item: dict) -> dict:
    """The item's own descriptive fields (category, expression, ...) for the per-item results."""
    return {k: v for k, v in item.items() if k not in _OWN}


def _kind(item: dict, where: str) -> str:
    if not isinstance(item.get("id"), (str, int)) or isinstance(item.get("id"), bool):
        raise TaskError(f"{where}: every item needs an 'id' (a string or integer)")
    if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise TaskError(f"{where}: every item needs a non-empty 'prompt' (the user message)")
    if "choices" in item:
        choices = item["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{where}: 'choices' must be a list of two or more non-empty strings")
        answer = item.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool) or \
                not 0 <= answer < len(choices):
            raise TaskError(f"{where}: 'answer' must be the index of the right choice "
                            f"(0..{len(choices) - 1}), got {answer!r}")
        return MULTIPLE_CHOICE
    if "checks" in item:
        if not isinstance(item["checks"], list) or not item["checks"]:
            raise TaskError(f"{where}: 'checks' must be a non-empty list of checks")
        for kind in item["checks"]:
            try:
                checks.validate(kind, where)
            except ValueError as err:
                raise TaskError(str(err)) from err
        budget = item.get("max_new_tokens", 1)
        if not isinstance(budget, int) or budget < 1:
            raise TaskError(f"{where}: 'max_new_tokens' must be a positive integer")
        return GENERATION
    raise TaskError(f"{where}: an item needs 'choices' and 'answer' (multiple choice) or "
                    f"'checks' (generation)")


def _read_items(text: str, source: str) -> list[dict]:
    return files.json_lines(text, source, TaskError)


class _Progress:
    """Logs a task's progress at most every few seconds."""

    def __init__(self, name: str, total: int, every: float = 5.0):
        self.name, self.total, self.every = name, total, every
        self.done, self.last = 0, time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            log.info("%s: %d/%d items", self.name, self.done, self.total)


# -- the shipped suite ------------------------------------------------------------------------

# Answer budgets: arithmetic leaves room for worked steps (a "think step by step" prompt makes
# the model write them), code for a function and a short explanation. Arithmetic stops at a new
# question, as lm-eval's GSM8K stops at "Question:": a model shown worked "Q: ... A: ..."
# examples may answer, then go on inventing more of them, and the last number would be theirs.
_SHIPPED = {
    "arithmetic": {"max_new_tokens": 160, "until": ("\nQ:", "\nQuestion:"),
                   "description": "addition, subtraction, one- and two-digit products; the last "
                                  "number in the answer is checked"},
    "world_facts": {"description": "geography, science, history and culture, four choices"},
    "commonsense": {"description": "everyday physical and social reasoning, four choices"},
    "sentiment": {"description": "short reviews, positive or negative"},
    "instructions": {"max_new_tokens": 128,
                     "description": "format instructions: starts/ends with, contains, language, "
                                    "case, word count, JSON"},
    "code": {"max_new_tokens": 192,
             "description": "write a small Python function; asserts run in a sandbox"},
}


def shipped() -> list[str]:
    """Names of the tasks that ship with the package."""
    return list(_SHIPPED)


def load_task(name: str | Path, limit: int | None = None, **options) -> Task:
    """A shipped task by name, or a task from a JSON-lines file path; its first ``limit``
    items (None: all). ``options`` override Task fields (batch_size, max_new_tokens, until)."""
    if str(name) in _SHIPPED:
        text = resources.files("promptbake").joinpath(f"data/tasks/{name}.jsonl") \
            .read_text("utf-8")
        task = Task(str(name), _read_items(text, f"promptbake/data/tasks/{name}.jsonl"),
                    **{**_SHIPPED[str(name)], **options})
    elif Path(name).suffix == ".jsonl" or Path(name).is_file():
        task = Task.from_jsonl(name, **options)
    else:
        raise TaskError(f"unknown task {str(name)!r}: use one of {', '.join(_SHIPPED)} or the "
                        f"path of a .jsonl task file")
    return task.head(limit)


# Reading the six files takes milliseconds.
TASKS: dict[str, Task] = {name: load_task(name) for name in _SHIPPED}


def evaluate(model, tokenizer, tasks=None, system: str | None = None, framing: str = "default",
             limit: int | None = None) -> dict[str, Score]:
    """Scores of ``model`` on several tasks: names of shipped tasks, paths of task files, or
    Evaluators (None: the whole shipped suite). ``limit``: the first items of each task."""
    chosen = []
    for task in list(TASKS) if tasks is None else list(tasks):
        if isinstance(task, (str, Path)):
            task = TASKS[task].head(limit) if task in TASKS else load_task(task, limit)
        elif limit is not None and isinstance(task, Task):
            task = task.head(limit)
        elif limit is not None:
            log.warning("promptbake: limit=%d does not apply to the evaluator %r", limit,
                        getattr(task, "name", task))
        chosen.append(task)
    for task in chosen:  # a task that cannot run here fails now, not after the others
        getattr(task, "check_ready", lambda: None)()
    scores = {}
    for task in chosen:
        scores[task.name] = task(model, tokenizer, system, framing=framing)
    return scores


__all__ = [
    "GENERATION",
    "MULTIPLE_CHOICE",
    "TASKS",
    "Evaluator",
    "Score",
    "Task",
    "TaskError",
    "checks",
    "evaluate",
    "load_task",
    "sandbox",
    "shipped",
]
