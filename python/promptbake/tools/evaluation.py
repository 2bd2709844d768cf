"""Tool-use evaluation: an Evaluator (``promptbake.tasks.Evaluator``) that lets the model call
real tools and scores the calls and the answers.

Per item, greedily: the model answers the user's message; any call in its answer is parsed
(``promptbake.tools.calls``) and scored against the item's expected calls as the Berkeley
Function Calling Leaderboard's AST checker does (``promptbake.tools.matching``); the calls run
(``promptbake.tools.registry``: a bad call gets an ``error:`` result, as a real system would
answer), the results go back as a tool turn (``promptbake.tools.rendering.tool_turns``) and the
model continues, up to ``max_rounds`` turns that call; its last answer is checked against the
item's ``checks``. Measured per item, with standard errors over items (``metrics``):

* ``call_accuracy``: tool items whose first answer's calls match (BFCL AST);
* ``end_to_end``: tool items whose final answer passes its checks;
* ``over_calling``: no-tool items where the model tried to call anything;
* ``failure:<class>``: the share of tool items failing first at each stage: ``no_call``,
  ``malformed``, ``unknown_tool``, ``missing_argument``, ``extra_argument``,
  ``mistyped_argument``, ``out_of_range`` (the call itself), ``wrong_tool``, ``wrong_value``,
  ``wrong_count`` (against the expected call), ``wrong_answer`` (a right call, a wrong final
  answer).

The ``Score`` the evaluator returns has one number per item, ``metric`` of the evaluator:
``tool_use`` (default: a tool item scores its end-to-end success, a no-tool item scores 1 when
the model answers without calling and passes its checks, if any), ``call`` (a tool item scores
its call accuracy, a no-tool item 1 when it makes no call), or ``end_to_end``, ``call_accuracy``
and ``no_call`` on the tool or no-tool items alone. So the re-prompt matrix, strength sweeps
and the forgetting gate take it like any task; every per-item field stays in ``Score.items``
and ``metrics(score)`` recomputes all of the above from them, ``paired(before, after)`` their
differences paired item by item.

The prompt (``system``): None (the model as deployed, framed by ``framing`` as the shipped
tasks are), a string (a system message), or a list of messages, such as ``render(...)``'s,
put before the item's conversation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time

import torch

from promptbake.decoding import greedy, stop_token_ids
from promptbake.framing import Framing
from promptbake.stats import paired_difference
from promptbake.tasks import Score, checks
from promptbake.tools import calls as call_syntax, rendering, shipped
from promptbake.tools.matching import OVER_CALL, match
from promptbake.tools.registry import Registry
from promptbake.tools.spec import MENTIONS_NUMBER, ToolSpec, check_expected, check_item

log = logging.getLogger("promptbake")

WRONG_ANSWER = "wrong_answer"
METRICS = ("tool_use", "call", "end_to_end", "call_accuracy", "no_call")
_METRIC_KINDS = {"end_to_end": "tool", "call_accuracy": "tool", "no_call": "no_tool"}
# numbers as written in answers: 1,234.5 and -3 but not the "-03" of 2024-03-01
_NUMBER = re.compile(r"(?<![\d.])(?:(?<![\w-])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclasses.dataclass
class ToolUse:
    """The tool-use evaluator (an ``Evaluator``; see the module docstring).

    ``specs``: the tools on offer (default: the shipped ones); ``items``: test items (default:
    the specs' tests and the shipped no-tool items, interleaved); ``registry``: what runs the
    calls (default: the shipped tools; give your own for your tools); ``syntax`` and
    ``results``: the call syntax and where results go, as in ``render``; ``max_new_tokens``:
    the budget of each answer; ``max_rounds``: answers that may call tools before the last
    one is taken as final.
    """

    specs: list[ToolSpec] | None = None
    items: list[dict] | None = dataclasses.field(default=None, repr=False)
    registry: Registry | None = dataclasses.field(default=None, repr=False)
    syntax: str = rendering.DEFAULT_SYNTAX
    results: str = "auto"
    metric: str = "tool_use"
    name: str = "tool_use"
    max_new_tokens: int = 64
    max_rounds: int = 2
    batch_size: int = 8

    def __post_init__(self):
        if self.specs is None:
            self.specs = shipped.specs()
        if self.registry is None:
            self.registry = shipped.registry()
        if self.items is None:
            self.items = shipped.test_items(self.specs)
        by_name = {s.name: s for s in self.specs}
        missing = [name for name in by_name if name not in self.registry]
        if missing:
            raise ValueError(f"tools {missing} have no function in the registry: register them "
                             f"(Registry().register(spec, function)) and pass registry=")
        if not self.items:
            raise ValueError("no test items: give items=, or specs with tests")
        for i, item in enumerate(self.items):
            check_item(item, f"{self.name}: items[{i}]")
            check_expected(item, by_name, f"{self.name}: items[{i}]")
        ids = [str(item["id"]) for item in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: item ids repeat; make them unique")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}: choose one of {', '.join(METRICS)}")
        if self.syntax not in call_syntax.SYNTAXES or self.max_rounds < 1 or \
                self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"syntax={self.syntax!r} (one of {call_syntax.SYNTAXES}), "
                             f"max_rounds, max_new_tokens and batch_size (>= 1) are not usable")

    def head(self, limit: int | None) -> ToolUse:
        """The same evaluator on its first ``limit`` items (all for None)."""
        return self if limit is None else dataclasses.replace(self, items=self.items[:limit])

    def __call__(self, model, tokenizer, system: str | list[dict] | None = None, *,
                 framing: str = "default", limit: int | None = None) -> Score:
        """The model's score with ``system`` before every item (see the module docstring), on
        the first ``limit`` items (all for None)."""
        evaluator = self.head(limit)
        started = time.perf_counter()
        exchanges = converse(model, tokenizer, [item["prompt"] for item in evaluator.items],
                             specs=self.specs, registry=self.registry, system=system,
                             framing=framing, syntax=self.syntax, results=self.results,
                             max_new_tokens=self.max_new_tokens, max_rounds=self.max_rounds,
                             batch_size=self.batch_size)
        scored = [self._score(item, ex.first, ex.turns, ex.results)
                  for item, ex in zip(evaluator.items, exchanges)]
        kind = _METRIC_KINDS.get(self.metric)
        scored = [item for item in scored if kind is None or item["kind"] == kind]
        if not scored:
            raise ValueError(f"metric={self.metric!r} scores {kind} items, and there are none")
        score = Score.from_items(self.name, scored, None, metric=self.metric)
        log.info("%s (%.1f s)", score, time.perf_counter() - started)
        return score

    def _score(self, item: dict, parsed, turns: list[str], outputs: list[str]) -> dict:
        expected = item["expected"]
        answer = turns[-1]
        passed = answer_passes(item.get("checks", []), answer)
        if expected:
            found = match(parsed.calls if not parsed.failure else [], expected, self.specs)
            correct = parsed.failure is None and found.valid
            failure = parsed.failure or found.failure or (None if passed else WRONG_ANSWER)
            message = parsed.message if parsed.failure else found.message
        else:
            correct = None
            failure = OVER_CALL if parsed.called else (None if passed else WRONG_ANSWER)
            message = parsed.message if parsed.called else ""
        scores = {"call": float(correct) if expected else float(not parsed.called),
                  "tool_use": float(passed) if expected else float(
                      not parsed.called and passed),
                  "end_to_end": float(passed), "call_accuracy": float(bool(correct)),
                  "no_call": float(not parsed.called)}
        extra = {k: v for k, v in item.items() if k not in ("id", "prompt", "expected", "checks")}
        return {**extra, "id": item["id"], "kind": "tool" if expected else "no_tool",
                "score": scores[self.metric], "prediction": answer,
                "target": {"expected": expected, "checks": item.get("checks", [])},
                "called": parsed.called, "calls": [c.to_dict() for c in parsed.calls],
                "call_correct": correct, "end_to_end": passed, "failure": failure,
                "message": message, "turns": turns, "tool_results": outputs}


@dataclasses.dataclass
class Exchange:
    """One question's tool round trip: the first answer's calls (``first``), every answer's
    text (``turns``), the tool results given back (``results``), the whole conversation
    (``messages``: user, assistant, tool... and the final answer) and the conversation as it
    stood after the first answer's results (``after_results``, None without a call)."""

    first: call_syntax.Parsed
    turns: list[str]
    results: list[str]
    messages: list[dict]
    after_results: list[dict] | None


@torch.no_grad()
def converse(model, tokenizer, questions: list[str], *, specs: list[ToolSpec],
             registry: Registry, system=None, framing: str = "default",
             syntax: str = rendering.DEFAULT_SYNTAX, results: str = "auto",
             max_new_tokens: int = 64, max_rounds: int = 2,
             batch_size: int = 8) -> list[Exchange]:
    """Each question answered greedily with tools: the model answers (``system`` before the
    conversation: a prompt text, a message list such as ``render``'s, or None for the model as
    deployed, framed by ``framing``); its calls run in ``registry`` (a bad or unknown call gets
    an ``error:`` result, as a real system would answer), the results go back as tool turns and
    it answers again, up to ``max_rounds`` answers that call before the last is final. Batched
    over questions."""
    role = rendering.result_role(tokenizer, results)
    frame = Framing(tokenizer, system or "unused", framing)
    ids = frame.teacher_ids if system else frame.student_ids
    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    conversations = [[{"role": "user", "content": q}] for q in questions]
    turns: list[list[str]] = [[] for _ in questions]
    first: list = [None] * len(questions)
    outputs: list[list[str]] = [[] for _ in questions]
    after: list = [None] * len(questions)
    active = list(range(len(questions)))
    for round_ in range(max_rounds + 1):
        answers = greedy(model, [ids(conversations[i]) for i in active],
                         max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                         batch_size=batch_size)
        texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in answers]
        still = []
        for i, text in zip(active, texts):
            parsed = call_syntax.parse(text, specs, syntax)
            if first[i] is None:
                first[i] = parsed
            turns[i].append(text)
            if not parsed.called or round_ == max_rounds:
                conversations[i] = conversations[i] + [{"role": "assistant", "content": text}]
                continue
            given = [_run(registry, attempt) for attempt in parsed.attempts]
            outputs[i] += given
            conversations[i] = conversations[i] + \
                [{"role": "assistant", "content": text[:parsed.end]}] + \
                rendering.tool_turns(given, role)
            if after[i] is None:
                after[i] = list(conversations[i])
            still.append(i)
        active = still
        if not active:
            break
    return [Exchange(first[i], turns[i], outputs[i], conversations[i], after[i])
            for i in range(len(questions))]


def _run(registry: Registry, attempt: call_syntax.Attempt) -> str:
    if attempt.failure and attempt.failure != call_syntax.UNKNOWN_TOOL:
        return f"error: {attempt.message}"
    return registry.run(attempt.call).content


def answer_passes(item_checks: list[dict], answer: str) -> bool:
    """Whether ``answer`` passes every check (``mentions_number`` or ``promptbake.tasks.checks``)."""
    return all(mentions_number(answer, kind["value"]) if kind["type"] == MENTIONS_NUMBER
               else checks.check(kind, answer) for kind in item_checks)


def mentions_number(text: str, value: float) -> bool:
    """Whether some number written in ``text`` equals ``value`` (to 1e-9 relative)."""
    for token in _NUMBER.findall(text):
        number = float(token.replace(",", ""))
        if math.isclose(number, value, rel_tol=1e-9, abs_tol=1e-12):
            return True
    return False


def metrics(score: Score) -> dict[str, Score]:
    """Every tool-use measure of a ToolUse score, each a Score (mean, standard error, n) over
    the items it concerns: ``call_accuracy``, ``end_to_end`` (tool items), ``over_calling``
    (no-tool items) and ``failure:<class>`` (tool items)."""
    tool = [i for i in score.items if i["kind"] == "tool"]
    no_tool = [i for i in score.items if i["kind"] == "no_tool"]
    found = {}

    def add(name, items, value):
        if items:
            found[name] = Score.from_items(score.task, [{"id": i["id"], "score": float(value(i))}
                                                        for i in items], None, metric=name)

    add("call_accuracy", tool, lambda i: bool(i["call_correct"]))
    add("end_to_end", tool, lambda i: i["end_to_end"])
    add("over_calling", no_tool, lambda i: i["called"])
    classes = call_syntax.FAILURES + ("wrong_tool", "wrong_value", "wrong_count", WRONG_ANSWER)
    for name in classes:
        add(f"failure:{name}", tool, lambda i, name=name: i["failure"] == name)
    return found


def paired(before: Score, after: Score) -> dict[str, tuple[float, float | None, int]]:
    """For each measure of ``metrics``: (after - before, its paired standard error, n) over the
    items both scored (e.g. the base model and the prompted one, on the same items)."""
    out = {}
    a, b = metrics(before), metrics(after)
    for name in a.keys() & b.keys():
        out[name] = paired_difference({i["id"]: i["score"] for i in a[name].items},
                                      {i["id"]: i["score"] for i in b[name].items})
    return dict(sorted(out.items()))
