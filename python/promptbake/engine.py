"""The baking engine: cycles of prompt discovery and baking, switched on plateaus.

A cycle is a skill to bake (tool use, a persona, anything an ``Evaluator`` scores) with a
prompt, a dev split to choose prompts on and a held-out split to judge the model on. One round
of a cycle:

1. candidates: the incumbent prompt, rewrites proposed by a model (the current model itself, or
   a proposer model the user names) from a meta-prompt, and programmatic edits (shorten; add,
   drop or reorder a demonstration turn), deduplicated;
2. each candidate scored with the current model prompted by it on the dev split;
3. the winner (better than the incumbent by more than their paired standard error, otherwise the
   incumbent) baked on top of the current model (``LoraStack.push``: LoRA deltas stacked), with
   ``pursuit_rounds`` more bakes of it (Eq. 4) if asked. The teacher (``teacher``) is the
   current model with the winner, as sequential baking does ("current"), or the base model
   with it ("base"): a bake can stop a small model following other system prompts, and then
   the current model with the next cycle's prompt no longer shows that cycle's skill. With
   "base", step 2 scores the candidates on the base model too (the model that reads them),
   and ``pursuit_rounds`` bake the same base-model target again rather than Eq. 4's moving one.
   With ``rehearse``, a bake also trains on the contexts of every cycle baked before, taught by
   that cycle's incumbent prompt (``bake.Rehearsal``), so one skill is not taught over another;
4. every cycle's held-out score measured on the model without any prompt, so each round shows
   what it did to the other skills.

A cycle whose held-out score gains less than ``threshold`` (relative) for ``patience`` of its
rounds has plateaued and the engine switches to the next cycle; it stops when every cycle has
plateaued or at ``max_rounds``, and keeps the best state by the objective: the minimum over
cycles of the held-out score relative to the base model prompted with the cycle's own prompt.
A cycle that falls below ``survive`` of its best held-out score is flagged and, with
``rerun_fallen``, runs again. Each round's state and the history are written atomically under
``out``; a rerun with the same cycles and settings resumes after the last finished round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import re
import time
from pathlib import Path
from typing import Callable

import torch

from promptbake import files, modeling, models
from promptbake.artifact import Baked, contexts_key, load_baked
from promptbake.bake import Rehearsal, bake
from promptbake.config import LATER_DEFAULTS, BakeConfig
from promptbake.decoding import stop_token_ids
from promptbake.framing import Framing, prompt_messages
from promptbake.orchestrate.plateau import gains
from promptbake.orchestrate.stacking import LoraStack
from promptbake.reprompt import item_scores
from promptbake.stats import paired_difference
from promptbake.train import Clock, TrainingLog
from promptbake.trajectories import SamplingConfig, sample

log = logging.getLogger("promptbake")

HISTORY = "engine.json"
ROUNDS = "rounds"
FINAL = "final"
ON_ERROR = ("continue", "stop")
TEACHERS = ("current", "base")  # EngineConfig.teacher
# What a proposer is asked, in turn; {failures} is filled with dev items the incumbent missed.
META_PROMPTS = {
    "rewrite": "Rewrite these instructions for an AI assistant so they are clearer. Reply with "
               "only the rewritten instructions.\n\nInstructions:\n{prompt}",
    "specific": "Make these instructions for an AI assistant more specific and concrete. Reply "
                "with only the new instructions.\n\nInstructions:\n{prompt}",
    "example": "Add one short example of the expected behaviour to these instructions for an AI "
               "assistant. Reply with only the new instructions.\n\nInstructions:\n{prompt}",
    "failures": "An AI assistant followed these instructions:\n{prompt}\n\nIt got these "
                "wrong:\n{failures}\n\nRewrite the instructions so it gets them right. Reply "
                "with only the new instructions.",
}


@dataclasses.dataclass
class Cycle:
    """A skill the engine bakes: its starting prompt (a system text or a conversation), the
    evaluators of its dev and held-out splits (higher is better), the contexts its bakes train
    on (``bake``'s ``contexts``; None: the built-in ones), demonstrations (lists of turns,
    user first) that an edit may add to the prompt, and ``BakeConfig`` fields its bakes set
    over the engine's bake settings (``bake``; a pipeline's tool cycle weighs the first token
    as a tool bake does)."""

    name: str
    prompt: str | list
    dev: Callable
    held_out: Callable
    contexts: object = None
    demonstrations: list = dataclasses.field(default_factory=list)
    bake: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_name(self.name)
        prompt_messages(self.prompt)  # a text or a conversation, or a clear error
        fields = {f.name for f in dataclasses.fields(BakeConfig)}
        unknown = sorted(set(self.bake) - fields)
        if unknown:
            raise ValueError(f"cycle {self.name}: bake settings {', '.join(unknown)} are not "
                             f"BakeConfig fields (see promptbake bake --help)")
        reserved = sorted({"seed", "merge"} & set(self.bake))
        if reserved:
            raise ValueError(f"cycle {self.name}: the engine sets {' and '.join(reserved)} for "
                             f"every bake itself (EngineConfig.seed; rounds stack unmerged): "
                             f"drop them from the cycle's bake settings")


def check_name(name) -> None:
    """A cycle's name names directories and plots: letters, digits, '.', '_' or '-'."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"cycle name {name!r}: use letters, digits, '.', '_' or '-'")


@dataclasses.dataclass
class EngineConfig:
    """How the engine runs (bake settings are a ``BakeConfig`` beside it)."""

    max_rounds: int = 6
    threshold: float = 0.02  # relative held-out gain below which a round counts as no gain
    patience: int = 1  # rounds without gain before a cycle has plateaued
    proposals: int = 2  # rewrites proposed by a model per round
    proposer: str | None = None  # a model directory; None: the current model proposes
    edits: int = 2  # programmatic edits per round
    pursuit_rounds: int = 0  # extra bakes of each round's winner (Eq. 4)
    survive: float = 0.95  # a cycle below this share of its best held-out score is flagged
    rerun_fallen: bool = True  # a flagged cycle that had plateaued runs again
    on_error: str = "continue"  # an evaluator or bake that raises: record and go on, or stop
    teacher: str = "current"  # who reads a round's prompt when it is baked: current or base
    rehearse: float = 0.0  # per earlier-baked cycle, its contexts added to a bake (share of it)
    proposal_tokens: int = 160
    seed: int = 0

    def validate(self) -> None:
        counts = {"max_rounds": 1, "patience": 1, "proposal_tokens": 1, "proposals": 0,
                  "edits": 0, "pursuit_rounds": 0}  # each with its least value
        wrong = [f"{k}={getattr(self, k)} (at least {least})" for k, least in counts.items()
                 if getattr(self, k) < least]
        if wrong:
            raise ValueError(f"engine: {', '.join(wrong)}")
        if not self.threshold >= 0 or not 0 < self.survive <= 1:  # NaN too
            raise ValueError(f"engine: threshold={self.threshold} must be >= 0 and "
                             f"survive={self.survive} in (0, 1]")
        if self.proposer is not None and not Path(self.proposer).is_dir():
            raise ValueError(f"engine: proposer model {self.proposer} is not a directory: name a "
                             f"local transformers model directory, or leave proposer unset for "
                             f"the current model to propose")
        if not 0 <= self.rehearse <= 4:  # NaN too
            raise ValueError(f"engine: rehearse={self.rehearse} must be in [0, 4] (a share of "
                             f"a bake's training contexts per earlier-baked cycle)")
        if self.teacher not in TEACHERS:
            raise ValueError(f"engine: teacher={self.teacher!r}: choose one of "
                             f"{', '.join(TEACHERS)}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"engine: on_error={self.on_error!r} must be one of "
                             f"{', '.join(ON_ERROR)}")


@dataclasses.dataclass
class EngineRun:
    """What the engine did: every round, the references, why it stopped and the kept state."""

    rounds: list[dict]
    references: dict  # cycle -> {"base": score, "prompted": score} on its held-out split
    best_round: int  # 0: no round beat the starting model
    stopped: str
    survival: dict  # cycle -> its held-out after its own last round, at the end, flags
    baked: Baked | None  # the kept state (None when it is the base model)
    seconds: float  # the references and every round, over every call that worked on the run

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "references": self.references,
                "best_round": self.best_round, "stopped": self.stopped,
                "survival": self.survival, "seconds": round(self.seconds, 2)}


# -- candidates --------------------------------------------------------------------------------


def demonstrations_in(prompt) -> tuple[list[dict], list[list[dict]]]:
    """(the messages before the first user turn, the demonstrations: each a user turn with the
    turns that follow it up to the next user turn)."""
    head, demos = [], []
    for message in prompt_messages(prompt):
        if message["role"] == "user":
            demos.append([message])
        elif demos:
            demos[-1].append(message)
        else:
            head.append(message)
    return head, demos


def _joined(head: list[dict], demos: list[list[dict]]):
    messages = head + [m for demo in demos for m in demo]
    if not demos and len(messages) == 1 and messages[0]["role"] == "system":
        return messages[0]["content"]  # a system text stays a text
    return messages


def _system_text(prompt) -> str:
    head, _ = demonstrations_in(prompt)
    return "\n".join(m["content"] for m in head if m["role"] == "system")


def _with_system(prompt, text: str):
    head, demos = demonstrations_in(prompt)
    others = [m for m in head if m["role"] != "system"]
    return _joined([{"role": "system", "content": text}] + others, demos)


def _shortened(text: str) -> str | None:
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    return " ".join(sentences[:-1]) if len(sentences) > 1 else None


def edits(prompt, demonstrations: list, limit: int, rng: random.Random) -> list[tuple[str, object]]:
    """Up to ``limit`` programmatic edits of ``prompt``: drop or add a demonstration, move the
    last demonstration first, drop the system text's last sentence. (source, prompt) pairs."""
    head, demos = demonstrations_in(prompt)
    found = []
    for k in range(len(demos)):
        found.append((f"edit: drop demonstration {k + 1}", _joined(head, demos[:k] + demos[k + 1:])))
    if len(demos) > 1:
        found.append(("edit: last demonstration first", _joined(head, demos[-1:] + demos[:-1])))
    present = [json.dumps(d, sort_keys=True) for d in demos]
    for demo in demonstrations:
        if json.dumps(list(demo), sort_keys=True) not in present:
            found.append(("edit: add a demonstration", _joined(head, demos + [list(demo)])))
    shorter = _shortened(_system_text(prompt))
    if shorter:
        found.append(("edit: shorten", _with_system(prompt, shorter)))
    found = [(s, p) for s, p in found if p and (not isinstance(p, list) or any(
        m["role"] == "system" or m["role"] == "user" for m in p))]
    rng.shuffle(found)
    return found[:limit]


def _clean(text: str) -> str:
    text = text.strip().strip('"').strip()
    text = re.sub(r"^(here (is|are)[^:\n]*:|instructions:|new instructions:)\s*", "", text,
                  flags=re.IGNORECASE)
    return text.strip()


def proposals(model, tokenizer, prompt, count: int, *, failures: list[str], seed: int,
              max_new_tokens: int = 160) -> list[tuple[str, object]]:
    """Up to ``count`` rewrites of ``prompt``'s system text written by ``model`` (as it
    stands: the caller sets its adapter) from the meta-prompts, sampled with ``seed``; kept when
    they are a plausible instruction (some letters, not a copy, at most 4x as long)."""
    if count < 1:
        return []
    text = _system_text(prompt)
    if not text:
        return []
    kinds = [k for k in META_PROMPTS if k != "failures" or failures]
    order = (["failures"] if failures else []) + [k for k in kinds if k != "failures"]
    asked = [order[i % len(order)] for i in range(count)]
    framing = Framing(tokenizer, "proposer", "default")
    requests = [framing.student_ids([{"role": "user", "content": META_PROMPTS[k].format(
        prompt=text, failures="\n".join(failures[:3]))}]) for k in asked]
    config = SamplingConfig(1, max_new_tokens, 0.8, 0.95, len(requests))
    with torch.no_grad():
        found = sample(model, requests, config, stop_token_ids(tokenizer, model),
                       torch.Generator().manual_seed(seed), cache="none",
                       pad_id=tokenizer.pad_token_id)
    out = []
    for kind, response in zip(asked, found.responses):
        rewrite = _clean(tokenizer.decode(response, skip_special_tokens=True))
        if len(re.findall(r"[A-Za-z]", rewrite)) >= 12 and rewrite != text and \
                len(rewrite) <= 4 * len(text) + 80:
            out.append((f"proposed: {kind}", _with_system(prompt, rewrite)))
    return out


def _key(prompt) -> str:
    """The prompt with case and runs of white space ignored."""
    return json.dumps([(m["role"], " ".join(m["content"].split()).lower())
                       for m in prompt_messages(prompt)])


def unique(candidates: list[tuple[str, object]]) -> list[tuple[str, object]]:
    seen, out = set(), []
    for source, prompt in candidates:
        key = _key(prompt)
        if key not in seen:
            seen.add(key)
            out.append((source, prompt))
    return out


def failures_of(score, evaluator, limit: int = 3) -> list[str]:
    """Short descriptions of the dev items the incumbent scored lowest on: the question (looked
    up in the evaluator's items or contexts by the item's id) and the answer."""
    questions = {}
    for item in getattr(evaluator, "items", None) or []:
        questions[item.get("id")] = item.get("prompt")
    for k, context in enumerate(getattr(evaluator, "contexts", None) or []):
        questions[k] = context[-1]["content"] if isinstance(context, list) else str(context)
    worst = sorted((i for i in score.items if float(i["score"]) < 1.0),
                   key=lambda i: float(i["score"]))[:limit]
    out = []
    for item in worst:
        question = questions.get(item["id"]) or item.get("prompt") or item["id"]
        out.append(f"- {str(question)[:160]} -> {str(item.get('prediction', ''))[:160]}")
    return out


def choose(scores: list, incumbent: int = 0) -> tuple[int, dict]:
    """The winner among candidates' dev Scores: the best one that beats the incumbent by more
    than their paired standard error, else the incumbent. Returns (index, its comparison)."""
    base = item_scores(scores[incumbent])
    best, record = incumbent, {"difference": 0.0, "se": None}
    for k, found in enumerate(scores):
        if k == incumbent:
            continue
        diff, se, _ = paired_difference(base, item_scores(found))
        if diff > max(se or 0.0, 0.0) and (best == incumbent or found.value > scores[best].value):
            best, record = k, {"difference": diff, "se": se}
    return best, record


# -- the engine --------------------------------------------------------------------------------


class _State:
    """The current model: the base model until the first bake, then the stacked adapters."""

    def __init__(self, lm, tokenizer, model_dir: Path, progress: bool = False,
                 teacher: str = "current"):
        self.lm, self.tokenizer, self.model_dir = lm, tokenizer, model_dir
        self.teacher = teacher  # "base": bakes learn from, and candidates are scored on, the base
        self.layers: LoraStack | None = None
        self.progress = progress  # the bakes' progress bars
        self.proposer = None  # a named proposer model, loaded on first use

    @property
    def model(self):
        return self.lm if self.layers is None else self.layers.current.model

    @property
    def deltas(self) -> int:
        return 0 if self.layers is None else len(self.layers.deltas)

    def rollback(self, count: int) -> None:
        """Back to the state of ``count`` stacked deltas (0: the base model)."""
        if count == self.deltas:
            return
        if count == 0:
            self.layers = None
            self.lm = models.load(self.model_dir)[0]
            return
        self.layers.deltas = self.layers.deltas[:count]
        self.layers.current = self.layers.upto(count - 1)

    def bake(self, prompt, contexts, config: BakeConfig, rehearse=()) -> dict:
        if self.layers is None:
            first = bake(prompt, model=self.model_dir, contexts=contexts, config=config,
                         progress=self.progress, rehearse=rehearse)
            self.layers, self.lm = LoraStack(first), None  # the bake loaded its own copy
            return first.manifest["kl"]
        return self.layers.push(prompt, config, contexts, progress=self.progress,
                                teacher_model=None if self.teacher == "current" else
                                self.model_dir, rehearse=rehearse)

    def score(self, evaluator, prompt, framing: str, *, teacher: bool = False):
        """``evaluator``'s score of the current model with ``prompt``; with ``teacher``, of the
        model that teaches a bake of it (the base model under ``teacher = "base"``)."""
        base = teacher and self.teacher != "current" and self.layers is not None
        with torch.no_grad(), modeling.adapter(self.model, enabled=False) if base \
                else contextlib.nullcontext():
            return evaluator(self.model, self.tokenizer, prompt, framing=framing)


def stalled(rounds: list[dict], name: str, start: float, since: int, threshold: float,
            patience: int) -> bool:
    """True when each of the cycle's last ``patience`` measured rounds after round ``since``
    gained less than ``threshold`` (relative) on its held-out score just before that round
    (``start`` before round 1; other cycles' rounds move it too). Failed rounds do not count."""
    previous, gained = start, []
    for r in rounds:
        if "held_out" not in r:
            continue
        value = r["held_out"][name]["value"]
        if r["cycle"] == name and r["round"] > since:
            gained.append(gains(value, previous, threshold))
        previous = value
    return len(gained) >= patience and not any(gained[-patience:])


WEAK_TEACHER = 0.5  # share of the prompt's gain on the base model below which a teacher is weak


def weak_teacher(prompted_now: float, reference: dict) -> float | None:
    """The share of the prompt's gain over the base model (held-out ``reference``: base and
    prompted) that the current model prompted with it keeps (``prompted_now``, on the dev
    split), when it is below ``WEAK_TEACHER``; None when the teacher is not weak or the prompt
    gains nothing on the base model."""
    gain = reference["prompted"]["value"] - reference["base"]["value"]
    if gain <= 0:
        return None
    share = (prompted_now - reference["base"]["value"]) / gain
    return share if share < WEAK_TEACHER else None


def objective(held_out: dict, references: dict) -> float:
    """The minimum over cycles of the held-out score relative to the prompted base model's (the
    raw score where that reference is not positive)."""
    return min(held_out[c]["value"] / references[c]["prompted"]["value"]
               if references[c]["prompted"]["value"] > 0 else held_out[c]["value"]
               for c in held_out)


INERT = ("log_to", "checkpoint_every", "snapshot_every")  # bake settings that change no result


# Settings added after runs were made with the engine: at these defaults they are left out of
# the identity, so those runs (and their pipelines' stages) still resume.
LATER_SETTINGS = {"teacher": "current", "rehearse": 0.0}
# The same for bake settings (with ``config.LATER_DEFAULTS``, those a resumed bake leaves out).
LATER_BAKE_SETTINGS = {"sample_precision": "fp32", **LATER_DEFAULTS}


def resume_settings(config: EngineConfig) -> dict:
    """The engine settings a resumed run must share (``max_rounds`` may grow: more rounds)."""
    return {k: v for k, v in dataclasses.asdict(config).items()
            if k != "max_rounds" and not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}


def outcome_settings(config: BakeConfig) -> dict:
    """The bake settings that change what a bake makes (not where it logs or checkpoints)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in INERT
            and not (k in LATER_BAKE_SETTINGS and v == LATER_BAKE_SETTINGS[k])}


# Evaluator settings that change how fast it scores, not what: left out of its identity.
SPEED_SETTINGS = ("batch_size",)
_OPAQUE = object()  # what _plain makes of a value that is not data (a function, a scorer, ...)


def evaluator_key(evaluator) -> str:
    """What identifies an evaluator for a resume: its name, its items or contexts, and its
    settings — a dataclass evaluator's other fields (``ToolUse``'s metric, token budget, call
    syntax and tool specs; a task's), or what an evaluator's ``settings()`` returns
    (``AdherenceEvaluator``: its persona and token budget) — as data: not its speed settings
    (``SPEED_SETTINGS``) or what is not data (a registry of functions). A run whose evaluator
    scored by another metric or budget is another run."""
    held = getattr(evaluator, "items", None) or getattr(evaluator, "contexts", None) or \
        getattr(evaluator, "questions", None)
    if dataclasses.is_dataclass(evaluator):
        settings = {f.name: getattr(evaluator, f.name) for f in dataclasses.fields(evaluator)
                    if f.name not in ("items", "name", *SPEED_SETTINGS)}
    else:
        settings = evaluator.settings() if hasattr(evaluator, "settings") else {}
    text = json.dumps(held, sort_keys=True, default=str) if held is not None else ""
    if settings:
        text += files.to_json(_plain(settings), sort_keys=True)
    return f"{getattr(evaluator, 'name', type(evaluator).__name__)}:" + \
        hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value):
    """``value`` as JSON data (a dataclass by its fields), or ``_OPAQUE``; the opaque parts of
    a dict or list are dropped."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {str(k): _plain(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _OPAQUE}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_plain, value) if v is not _OPAQUE]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return _OPAQUE


def _identity(cycles: list[Cycle], config: EngineConfig, bake_config: BakeConfig,
              fingerprint: str) -> tuple[str, dict]:
    """(what a resumed run must share: one hash, the parts' hashes: to say what changed)."""
    described = [{"name": c.name, "prompt": c.prompt, "dev": evaluator_key(c.dev),
                  "held_out": evaluator_key(c.held_out), "contexts": contexts_key(c.contexts),
                  "demonstrations": c.demonstrations, "bake": c.bake} for c in cycles]
    whole = {"cycles": described, "engine": resume_settings(config),
             "bake": outcome_settings(bake_config), "model": fingerprint}

    def sha(value) -> str:
        return hashlib.sha256(files.to_json(value, sort_keys=True).encode()).hexdigest()

    parts = {"model": sha(fingerprint), "engine settings": sha(whole["engine"]),
             "bake settings": sha(whole["bake"]),
             **{f"cycle {c['name']}": sha(c) for c in described}}
    return sha(whole), parts


def _changed(saved: dict, parts: dict) -> str:
    """What differs between a saved run and this call, as far as the run recorded it."""
    before = saved.get("parts")
    if not before:
        return "cycles, settings or model"
    names = [k for k in {**before, **parts} if before.get(k) != parts.get(k)]
    return ", ".join(names) or "the cycles' order"


def run_engine(cycles: list[Cycle], model=None, config: EngineConfig | None = None,
               bake_config: BakeConfig | None = None, *, out=None, overwrite: bool = False,
               replace_changed: bool = False, progress: bool = False,
               say: Callable[[str], None] | None = None) -> EngineRun:
    """Runs the engine over ``cycles`` (see the module docstring) on ``model`` (a directory or
    None for the default model).

    ``out``: where each round's state (``rounds/round-N``, loadable by ``load_baked``), the
    history (``engine.json``) and the kept state (``final/``) go; rerun with the same cycles
    and settings, it resumes after the last finished round (``overwrite`` starts afresh). A run
    in ``out`` made with other cycles, settings or model is refused, or with
    ``replace_changed`` removed and started afresh (a pipeline's engine stage does that).
    """
    config, bake_config = config or EngineConfig(), bake_config or BakeConfig()
    config.validate()
    bake_config.validate()
    if not cycles:
        raise ValueError("the engine needs at least one cycle")
    names = [c.name for c in cycles]
    if len(set(names)) != len(names):
        raise ValueError(f"cycle names repeat: {names}; give each cycle its own name")
    for c in cycles:  # a cycle's own bake settings, checked before any work
        try:
            dataclasses.replace(bake_config, **c.bake).validate()
        except ValueError as err:
            raise ValueError(f"cycle {c.name}: its bake settings: {err}") from err
    if config.rehearse:  # a cycle's contexts are rehearsed in later bakes: checked now
        for c in cycles:
            try:
                Rehearsal.checked((c.prompt, c.contexts, 1))
            except ValueError as err:
                raise ValueError(f"cycle {c.name}: {err}; or set rehearse = 0") from err
    say = say or log.info
    lm, tokenizer, model_dir = models.load(model)
    state = _State(lm, tokenizer, model_dir, progress, config.teacher)
    identity, parts = _identity(cycles, config, bake_config, models.fingerprint(model_dir))
    out = Path(out) if out is not None else None
    saved = _resume(out, identity, parts, overwrite, replace_changed, say)
    framing = bake_config.framing
    incumbents = {c.name: c.prompt for c in cycles}

    if saved is None:
        say("engine: measuring the base model on every cycle's held-out split, with and without "
            "its prompt")
        measuring = time.perf_counter()
        references = {c.name: {"base": state.score(c.held_out, None, framing).to_dict(),
                               "prompted": state.score(c.held_out, c.prompt, framing).to_dict()}
                      for c in cycles}
        saved = {"identity": identity, "parts": parts, "references": references, "rounds": [],
                 "done": [], "active": 0, "stopped": None,
                 "references_seconds": round(time.perf_counter() - measuring, 2)}
        _write(out, saved)
    else:
        say(f"engine: resuming after round {len(saved['rounds'])} from {out}")
        saved["parts"] = parts  # a run from before they were recorded gets them now
        incumbents = _incumbents_at(saved["rounds"], cycles, len(saved["rounds"]))
        last = _last_state(saved["rounds"])
        if last:
            state.layers, state.lm = LoraStack(load_baked(out / ROUNDS / f"round-{last}",
                                                          model=model_dir)), None
    saved["settings"] = dataclasses.asdict(config)  # this call's (max_rounds may have grown)
    references, rounds = saved["references"], saved["rounds"]
    # the rounds' scores beside the bakes' curves (TensorBoard only: a W&B run per bake)
    board = TrainingLog(dataclasses.replace(bake_config, log_to="tensorboard"), out) \
        if bake_config.log_to == "tensorboard" else None
    done, active, opened = set(saved["done"]), saved["active"], saved.get("opened", {})
    base_scores = {c: references[c]["base"] for c in references}

    while saved["stopped"] is None:
        if len(rounds) >= config.max_rounds:
            saved["stopped"] = "round limit"
            break
        # A cycle that keeps gaining keeps its turn, but not past the last rounds a cycle that
        # has had none needs: every cycle gets a round before the limit.
        unvisited = [k for k, c in enumerate(cycles)
                     if c.name not in done and all(r["cycle"] != c.name for r in rounds)]
        if unvisited and active not in unvisited and \
                config.max_rounds - len(rounds) <= len(unvisited):
            say(f"engine: {config.max_rounds - len(rounds)} rounds left and cycle "
                f"{cycles[unvisited[0]].name} has had none: its turn")
            active = unvisited[0]
        cycle = cycles[active]
        number = len(rounds) + 1
        say(f"engine round {number}: cycle {cycle.name}")
        record = {"round": number, "cycle": cycle.name}
        start, before = time.perf_counter(), state.deltas
        try:
            record.update(_round(state, cycle, incumbents[cycle.name], config, bake_config,
                                 number, say, _rehearsed(cycles, rounds, incumbents, cycle)))
            # a base-model teacher, as the current model is before the first bake, is the
            # reference itself
            teacher = weak_teacher(record["candidates"][0]["dev"]["value"],
                                   references[cycle.name]) \
                if config.teacher == "current" and before else None
            if teacher is not None:
                record["weak_teacher"] = teacher
                say(f"engine: the current model, prompted with cycle {cycle.name}'s prompt, "
                    f"gets {100 * teacher:.0f}% of the gain over the base model that the base "
                    f"model prompted with it gets: this round's teacher is weak (an earlier "
                    f"bake may have taken its system prompt's place)")
            measuring = time.perf_counter()
            record["held_out"] = {c.name: state.score(c.held_out, None, framing).to_dict()
                                  for c in cycles}
            record["phases"]["held-out"] = round(time.perf_counter() - measuring, 2)
            record["objective"] = objective(record["held_out"], references)
            incumbents[cycle.name] = record["winner"]["prompt"]
        except Exception as err:  # noqa: BLE001 -- a failing evaluator or bake is recorded
            record["failed"] = f"{type(err).__name__}: {err}"
            say(f"engine round {number} failed: {record['failed']}")
            state.rollback(before)  # what the round baked is not kept
        record["seconds"] = round(time.perf_counter() - start, 2)
        rounds.append(record)
        if "failed" not in record:
            record["deltas"] = len(state.layers.deltas)
            _save_state(out, state, number)
            _survival_flags(record, rounds, cycles, base_scores, config, done, opened)
            if board is not None:
                board.scalars(number, {"engine/objective": record["objective"], **{
                    f"engine/held_out/{c}": s["value"] for c, s in record["held_out"].items()}})
            say(f"engine round {number}: " + ", ".join(
                f"{c} {s['value']:.3f}" for c, s in record["held_out"].items())
                + f"; objective {record['objective']:.3f}")
        elif config.on_error == "stop":
            saved["stopped"] = "error"
        if stalled(rounds, cycle.name, base_scores[cycle.name]["value"],
                   opened.get(cycle.name, 0), config.threshold, config.patience):
            done.add(cycle.name)
            record["plateau"] = True
            say(f"engine: cycle {cycle.name} has plateaued")
        waiting = [k for k in range(len(cycles)) if cycles[k].name not in done]
        if not waiting and saved["stopped"] is None:
            saved["stopped"] = "every cycle plateaued"
        elif waiting and (cycle.name in done or "failed" in record):
            # the next cycle waiting: after a plateau, or a failure that may repeat
            active = min(waiting, key=lambda k: (k - active - 1) % len(cycles))
        saved.update(done=sorted(done), active=active, opened=opened)
        _write(out, saved)

    if board is not None:
        board.close()
    best = _best(rounds, references)
    kept = _kept(state, out, rounds, best, model_dir)
    survival = _survival(rounds, cycles, best)
    result = EngineRun(rounds, references, best, saved["stopped"], survival, kept,
                       saved.get("references_seconds", 0.0)
                       + sum(r.get("seconds", 0.0) for r in rounds))
    if kept is not None:
        kept.manifest = {**kept.manifest, "kind": "engine", "engine": {
            "best_round": best, "stopped": saved["stopped"],
            "cycles": {c: {"prompt": p} for c, p in _incumbents_at(rounds, cycles, best).items()}}}
        if out is not None:
            files.replace_dir(out / FINAL, lambda tmp: _save(kept, tmp))
            kept.path = out / FINAL
    saved["result"] = result.to_dict()
    _write(out, saved)
    return result


def _rehearsed(cycles: list[Cycle], rounds: list[dict], incumbents: dict, cycle: Cycle) -> list:
    """(name, incumbent prompt, contexts) of every other cycle with a finished round: what a
    bake of ``cycle`` rehearses (``EngineConfig.rehearse``)."""
    baked = {r["cycle"] for r in rounds if "failed" not in r}
    return [(c.name, incumbents[c.name], c.contexts) for c in cycles
            if c.name != cycle.name and c.name in baked]


def _round(state: _State, cycle: Cycle, incumbent, config: EngineConfig,
           bake_config: BakeConfig, number: int, say, earlier=()) -> dict:
    framing = bake_config.framing
    clock = Clock()  # the round's phases, for the engine's wall-time split
    rng = random.Random(config.seed * 100_003 + number)  # a resumed round edits as it would have
    candidates = [("incumbent", incumbent)] + edits(incumbent, cycle.demonstrations,
                                                     config.edits, rng)
    with clock("scoring"):
        first = state.score(cycle.dev, incumbent, framing, teacher=True)
    if config.proposals:
        with clock("proposing"):
            candidates += proposals(_proposer(state, config), state.tokenizer, incumbent,
                                    config.proposals, failures=failures_of(first, cycle.dev),
                                    seed=config.seed + number,
                                    max_new_tokens=config.proposal_tokens)
    candidates = unique(candidates)
    with clock("scoring"):
        scores = [first] + [state.score(cycle.dev, p, framing, teacher=True)
                            for _, p in candidates[1:]]
    winner, comparison = choose(scores)
    say(f"  {len(candidates)} candidates; winner: {candidates[winner][0]} (dev "
        f"{scores[winner].value:.3f}, incumbent {scores[0].value:.3f})")
    round_config = dataclasses.replace(bake_config, **cycle.bake, seed=bake_config.seed + number,
                                       merge=False)
    count = math.ceil(config.rehearse * round_config.train_contexts)
    rehearse = [Rehearsal(p, c, count) for _, p, c in earlier] if count else []
    with clock("baking"):
        kl = [state.bake(candidates[winner][1], cycle.contexts, round_config, rehearse)]
        for extra in range(config.pursuit_rounds):
            kl.append(state.bake(candidates[winner][1], cycle.contexts, dataclasses.replace(
                round_config, seed=round_config.seed + 1000 * (extra + 1)), rehearse))
    return {"candidates": [{"source": s, "prompt": p, "dev": sc.to_dict()}
                           for (s, p), sc in zip(candidates, scores)],
            "winner": {"index": winner, "source": candidates[winner][0],
                       "prompt": candidates[winner][1], **comparison},
            "bake_kl": kl, "phases": clock.seconds(),
            **({"rehearsed": {name: count for name, _, _ in earlier}} if rehearse else {})}


def _proposer(state: _State, config: EngineConfig):
    """The model that writes rewrites: the current one (adapter on), or the named one."""
    if config.proposer is None:
        return state.model
    if state.proposer is None:
        state.proposer = models.load(config.proposer)
    proposer, tokenizer, _ = state.proposer
    if tokenizer.get_vocab() != state.tokenizer.get_vocab():
        raise ValueError(f"proposer model {config.proposer} has another tokenizer than the "
                         f"model being baked; use one of the same family")
    return proposer


def _survival_flags(record: dict, rounds: list[dict], cycles: list[Cycle], base_scores: dict,
                    config: EngineConfig, done: set, opened: dict) -> None:
    """Flags every cycle whose held-out score fell below ``survive`` of its best so far (after
    its own rounds); with ``rerun_fallen``, a plateaued one that falls now (it was not flagged
    in the round before) runs again, its plateau history starting afresh."""
    previous = next((r for r in reversed(rounds[:-1]) if "held_out" in r), {})
    fallen = []
    for c in cycles:
        own = [r["held_out"][c.name]["value"] for r in rounds
               if r["cycle"] == c.name and "held_out" in r]
        best = max(own, default=base_scores[c.name]["value"])
        now = record["held_out"][c.name]["value"]
        if own and best > 0 and now < config.survive * best:
            fallen.append(c.name)
            if config.rerun_fallen and c.name in done and \
                    c.name not in previous.get("fallen", []):
                done.discard(c.name)
                opened[c.name] = record["round"]
    record["fallen"] = fallen


def _incumbents_at(rounds: list[dict], cycles: list[Cycle], upto: int) -> dict:
    """Each cycle's prompt after round ``upto``: the winners of its measured rounds."""
    prompts = {c.name: c.prompt for c in cycles}
    for r in rounds:
        if r["round"] <= upto and "failed" not in r:
            prompts[r["cycle"]] = r["winner"]["prompt"]
    return prompts


def _best(rounds: list[dict], references: dict) -> int:
    start = objective({c: references[c]["base"] for c in references}, references)
    best, value = 0, start
    for r in rounds:
        if "objective" in r and r["objective"] > value:
            best, value = r["round"], r["objective"]
    return best


def _survival(rounds: list[dict], cycles: list[Cycle], best: int) -> dict:
    measured = [r for r in rounds if "held_out" in r]
    kept = next((r for r in measured if r["round"] == best), None)
    out = {}
    for c in cycles:
        own = [r for r in measured if r["cycle"] == c.name]
        out[c.name] = {
            "after_own_round": own[-1]["held_out"][c.name]["value"] if own else None,
            "best": max((r["held_out"][c.name]["value"] for r in own), default=None),
            "final": measured[-1]["held_out"][c.name]["value"] if measured else None,
            "kept": kept["held_out"][c.name]["value"] if kept else None,
            "flagged": any(c.name in r.get("fallen", []) for r in measured)}
    return out


def _last_state(rounds: list[dict]) -> int:
    return max((r["round"] for r in rounds if "held_out" in r), default=0)


def _kept(state: _State, out, rounds: list[dict], best: int, model_dir: Path) -> Baked | None:
    """The state after round ``best``: read back from ``out``, or (in memory) the deltas
    stacked up to that round's."""
    if best == 0:
        return None
    if out is not None:
        return load_baked(out / ROUNDS / f"round-{best}", model=model_dir)
    return state.layers.upto(rounds[best - 1]["deltas"] - 1)


def _save(baked: Baked, tmp: Path) -> None:
    tmp.rmdir()  # Baked.save makes the directory
    baked.save(tmp)


def _save_state(out, state: _State, number: int) -> None:
    if out is None:
        return
    current = state.layers.current
    snapshot = Baked(current.model, current.tokenizer, current.framing,
                     {**current.manifest, "kind": "engine-round", "round": number},
                     None, current.held_out)
    files.replace_dir(out / ROUNDS / f"round-{number}", lambda tmp: _save(snapshot, tmp))


def _resume(out: Path | None, identity: str, parts: dict, overwrite: bool,
            replace_changed: bool, say) -> dict | None:
    if out is None:
        return None
    history = out / HISTORY
    if out.exists() and overwrite:
        clear(out)
    if not history.is_file():
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise ValueError(f"{out} exists and holds no engine run: choose a new directory, "
                             f"or overwrite=True to use it anyway")
        return None
    saved = json.loads(history.read_text(encoding="utf-8"))
    if saved.get("identity") != identity and replace_changed:
        say(f"engine: the run in {out} was made with other {_changed(saved, parts)}: starting "
            f"afresh")
        clear(out)
        return None
    if saved.get("identity") != identity:
        raise ValueError(f"{out} holds an engine run made with other {_changed(saved, parts)}: "
                         f"choose another directory, or start afresh (overwrite=True)")
    if saved.get("stopped") in ("error", "round limit"):
        saved["stopped"] = None  # a rerun goes on: after an error, or up to a new max_rounds
    saved.pop("result", None)  # an earlier call's; written again when this one ends
    return saved


def clear(out: Path) -> None:
    """Removes an engine run from ``out`` (its history, rounds, kept state and logs)."""
    for name in (HISTORY, ROUNDS, FINAL, "tensorboard"):
        files.remove(Path(out) / name)


def _write(out: Path | None, saved: dict) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        files.write_text(out / HISTORY, files.to_json(saved, indent=2))
