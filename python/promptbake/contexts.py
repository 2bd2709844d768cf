"""Contexts x: the user turns a prompt is baked under (Eq. 3 samples y given u and x).

A context is a list of chat messages without the system turn, ending with a user message. The
built-in set has two kinds: ``general`` (``data/contexts.txt``: open questions and requests, the
kind of message a chat assistant gets) and ``short`` (``data/contexts_short.txt``: short
task-like ones: sums, facts, pick-one questions, classification, format instructions, small code
requests). A bake only learns the prompted model's behaviour on the kinds of input it sees: baked
on general questions alone, a persona is over-applied to short questions (``python bench/ --only
coverage``). None of them is an item of the shipped task suite or a scripted drift turn (tested).
The set is split by a hash of each context into a train part and a held-out part that share
nothing; held-out contexts only measure the bake. A user file is JSON lines (a string,
``{"user": ...}``, or ``{"messages": [...]}`` for a multi-turn history) or plain text with one
message per line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from importlib import resources
from pathlib import Path

Context = list[dict[str, str]]

BUILTIN = "builtin"
UNCONDITIONAL = "none"
PROBE_NAME = "probe"
_ROLES = ("user", "assistant")


class ContextError(ValueError):
    """A contexts file cannot be used; the message names the file, the line and the fix."""


def as_context(context: Context | str) -> Context:
    """A context's chat messages: a text is one user message; a list of ``{"role",
    "content"}`` messages is copied."""
    if isinstance(context, str):
        return [{"role": "user", "content": context}]
    return list(context)


def split(contexts: list[Context], part: str, held_out_fraction: float = 0.2) -> list[Context]:
    """The ``train`` or ``held_out`` part of ``contexts``, chosen by a hash of each context, so the
    two parts never share a context and the split does not depend on order. With two or more
    contexts neither part is empty (the context with the lowest hash is held out if none was)."""
    if part not in ("train", "held_out"):
        raise ValueError(f"part={part!r}: choose 'train' or 'held_out'")

    def score(context: Context) -> float:
        key = json.dumps(context, sort_keys=True, ensure_ascii=False).encode()
        return int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF

    scores = [score(c) for c in contexts]
    held = [s < held_out_fraction for s in scores]
    if len(contexts) >= 2 and not any(held):
        held[scores.index(min(scores))] = True
    if len(contexts) >= 2 and all(held):
        held[scores.index(max(scores))] = False
    return [c for c, h in zip(contexts, held) if h == (part == "held_out")]


KINDS = {"general": "data/contexts.txt", "short": "data/contexts_short.txt"}


def builtin(part: str = "train", kinds: tuple[str, ...] = tuple(KINDS)) -> list[Context]:
    """The shipped contexts of ``kinds``: ``train`` (about 360 of both kinds) or ``held_out``
    (about 90). The kinds are interleaved in proportion, so the first held-out contexts (what a
    bake measures on) hold both."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds={kinds!r}: choose one or more of {', '.join(KINDS)}, each once")
    keyed = []
    for kind in kinds:
        text = resources.files("promptbake").joinpath(KINDS[kind]).read_text("utf-8")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        keyed += [((i + 0.5) / len(lines), line) for i, line in enumerate(lines)]
    keyed.sort(key=lambda pair: pair[0])  # stable: equal positions keep the kinds' order
    return split([[{"role": "user", "content": line}] for _, line in keyed], part)


PROBE = "data/contexts_probe.jsonl"


def probe(count: int | None = None) -> list[Context]:
    """The off-distribution probe set: 48 contexts of eight kinds that the shipped training
    contexts do not hold (``probe_kinds``: other languages, multi-turn follow-ups, long
    constrained instructions, text to transform, role-play, structured input, code to debug,
    requests that pull against the prompt), interleaved so that the first ``count`` hold every
    kind. A bake measures MC-KL on it besides its held-out contexts; it is never trained on."""
    lines = _probe_lines()
    return [_parse_json_line(f"{PROBE}, line {i}", line)
            for i, line in enumerate(lines[:count], 1)]


def probe_kinds() -> list[str]:
    """The kinds of the probe set, in order."""
    return list(dict.fromkeys(json.loads(line)["kind"] for line in _probe_lines()))


def _probe_lines() -> list[str]:
    text = resources.files("promptbake").joinpath(PROBE).read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def builtin_messages(kinds: tuple[str, ...] = tuple(KINDS)) -> list[str]:
    """Every shipped user message of ``kinds``, training part first, then the held-out part."""
    return [c[0]["content"] for part in ("train", "held_out") for c in builtin(part, kinds)]


def load(path: str | Path) -> list[Context]:
    """Contexts from a ``.jsonl`` file or a text file with one user message per line."""
    path = Path(path)
    if not path.is_file():
        raise ContextError(f"contexts file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ContextError(f"{path} is not UTF-8 text (line {line}): save it as UTF-8") from err
    jsonl = path.suffix == ".jsonl"
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        found.append(_parse_json_line(f"{path}, line {number}", line) if jsonl
                     else [{"role": "user", "content": line.strip()}])
    if not found:
        raise ContextError(f"{path} has no contexts: give one user message per line, or JSON "
                           f"lines such as {{\"user\": \"...\"}}")
    return found


def _parse_json_line(where: str, line: str) -> Context:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise ContextError(f"{where}: not valid JSON ({err.msg})") from err
    if isinstance(item, str):
        item = {"user": item}
    if not isinstance(item, dict):
        raise ContextError(f"{where}: expected a string or an object with 'user' or 'messages'")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise ContextError(f"{where}: 'messages' must be a non-empty list")
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in _ROLES
                    and isinstance(m.get("content"), str)):
                raise ContextError(f"{where}: every message needs a role ('user' or 'assistant'; "
                                   f"the system turn is the baked prompt) and string content")
        if messages[-1]["role"] != "user":
            raise ContextError(f"{where}: the last message must be the user's turn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(item.get("user"), str) and item["user"].strip():
        return [{"role": "user", "content": item["user"]}]
    raise ContextError(f"{where}: expected a string or an object with 'user' or 'messages'")


def resolve(spec: str | Path | list | None, part: str = "train") -> list[Context]:
    """Contexts for ``part`` (``train`` or ``held_out``) of a bake.

    ``None`` or ``"builtin"``: the shipped set. ``"none"``: one empty context (unconditional
    baking; ``for_bake`` repeats it). A file or a list (strings or message lists): its hash split
    when it has at least 10 contexts, otherwise all of it for training and the built-in held-out
    set for measuring.
    """
    if spec is None or spec == BUILTIN:
        return builtin(part)
    if spec == UNCONDITIONAL:
        return [[]]
    every = _every_of(spec)
    if len(every) < 10:
        return every if part == "train" else builtin("held_out")
    return split(every, part)


def for_bake(spec, part: str, count: int, seed: int = 0) -> list[Context]:
    """The ``count`` contexts a bake uses: training contexts drawn at random with ``seed`` (all of
    them if there are fewer), or the first held-out ones. Unconditional baking (``"none"``) gives
    ``count`` empty contexts, each sampled on its own; ``Pools`` draw by their weights."""
    if isinstance(spec, Pools):
        return spec.draw(part, count, seed)
    if spec == UNCONDITIONAL:
        return [[] for _ in range(count)]
    found = resolve(spec, part)
    if part == "held_out" or len(found) <= count:
        return found[:count]
    import torch

    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed))
    return [found[int(i)] for i in order[:count]]


def for_measuring(spec, count: int) -> list[Context]:
    """Contexts to measure a bake on, as ``promptbake kl --contexts`` names them: ``"builtin"``
    is every built-in held-out context, a file or a list is all of it, ``"none"`` is ``count``
    empty contexts."""
    if spec is None or spec == BUILTIN:
        return builtin("held_out")
    if spec == UNCONDITIONAL:
        return [[] for _ in range(count)]
    if spec == PROBE_NAME:
        return probe()
    return _every_of(spec)


# -- pools -------------------------------------------------------------------------------------

GENERATED_POOLS = ("generated-domain", "generated-general")
SHIPPED_POOLS = {BUILTIN: tuple(KINDS), **{kind: (kind,) for kind in KINDS}}


def is_pools(spec) -> bool:
    """Whether ``spec`` names pools (``NAME=WEIGHT,...``, a dict or ``Pools``), not a file."""
    if isinstance(spec, (Pools, dict)):
        return True
    return isinstance(spec, str) and "=" in spec and not Path(spec).is_file()


class Pools:
    """Training contexts drawn from named pools with weights.

    A pool is ``general``, ``short`` or ``builtin`` (shipped), ``generated-domain[:N]`` or
    ``generated-general[:N]`` (messages the model writes, ``promptbake.generated``; ``bake``
    fills them in with ``fill``), or a contexts file. Of ``count`` contexts, pool i gives
    ``count x w_i / sum(w)`` (largest remainder), drawn at random from its training part; the
    held-out contexts are shared the same way among the pools that have a held-out part (a file
    of fewer than 10 contexts is all training). A pool with fewer contexts than its share gives
    all it has and the others make up the rest; ``mix()`` records what each pool gave.
    """

    def __init__(self, spec: str | dict):
        if isinstance(spec, str):
            pairs = [item.rpartition("=") for item in spec.split(",") if item.strip()]
            bad = [f"{n}{e}{w}" for n, e, w in pairs if not (n.strip() and e)]
            if bad or not pairs:
                raise ContextError(f"context pools {spec!r}: write NAME=WEIGHT pairs separated by "
                                   f"commas, e.g. general=2,short=1,generated-domain=1")
            weights = {}
            for name, _, weight in pairs:
                if name.strip() in weights:
                    raise ContextError(f"context pool {name.strip()!r} is named twice")
                try:
                    weights[name.strip()] = float(weight)
                except ValueError:
                    raise ContextError(f"context pool {name.strip()!r}: weight {weight!r} is not "
                                       f"a number") from None
        else:
            weights = {str(k): v for k, v in spec.items()}
        for name, weight in weights.items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ContextError(f"context pool {name!r} has weight {weight!r}: weights are "
                                   f"finite numbers >= 0")
        if not weights or sum(weights.values()) <= 0:
            raise ContextError("the context pools' weights sum to 0: give at least one pool a "
                               "positive weight")
        self.weights = {name: float(w) for name, w in weights.items() if w > 0}
        self.members: dict[str, list[Context]] = {}
        self.drawn: dict[str, dict[str, int]] = {}
        for name in self.weights:
            self._check_name(name)

    @staticmethod
    def _check_name(name: str) -> None:
        if name in SHIPPED_POOLS or generated_pool(name) or Path(name).is_file():
            return
        if name in (PROBE_NAME, UNCONDITIONAL):
            raise ContextError(f"{name!r} cannot be a training pool: "
                               + ("the probe set measures off-distribution KL, training on it "
                                  "would hide what it measures" if name == PROBE_NAME else
                                  "unconditional baking takes no other contexts"))
        raise ContextError(f"unknown context pool {name!r}: use {', '.join(SHIPPED_POOLS)}, "
                           f"generated-domain[:N], generated-general[:N], or a contexts file "
                           f"that exists")

    def __str__(self) -> str:
        return ",".join(f"{name}={w:g}" for name, w in self.weights.items())

    def fill(self, name: str, found: list[Context]) -> None:
        """The contexts of a generated pool."""
        if not found:
            raise ContextError(f"context pool {name!r} is empty: its generation gave nothing")
        self.members[name] = list(found)

    def generated(self) -> dict[str, int | None]:
        """Generated pools still to fill: name -> the N asked for (None: enough for its share)."""
        return {name: generated_pool(name)[1] for name in self.weights
                if generated_pool(name) and name not in self.members}

    def part(self, name: str, part: str) -> list[Context]:
        """Pool ``name``'s ``train`` or ``held_out`` part (empty: it has no held-out part)."""
        if name in SHIPPED_POOLS:
            return builtin(part, SHIPPED_POOLS[name])
        if generated_pool(name):
            if name not in self.members:
                raise ContextError(f"context pool {name!r} was not generated: bake() fills it")
            every = self.members[name]
        else:
            every = load(name)
        if len(every) < 10:
            return every if part == "train" else []
        return split(every, part)

    def draw(self, part: str, count: int, seed: int = 0) -> list[Context]:
        import torch

        found = {name: self.part(name, part) for name in self.weights}
        empty = [name for name, cs in found.items() if part == "train" and not cs]
        if empty:
            raise ContextError(f"context pool {empty[0]!r} has no training contexts")
        weights = {n: w for n, w in self.weights.items() if found[n]}
        if not weights:
            raise ContextError("no context pool has held-out contexts: add a shipped pool or a "
                               "file of at least 10 contexts")
        shares = _shares(count, weights, {n: len(found[n]) for n in weights})
        out, self.drawn[part] = [], {}
        for name, share in shares.items():
            pool = found[name]
            if part == "train" and len(pool) > share:
                order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
                pool = [pool[int(i)] for i in order[:share]]
            out += pool[:share]
            self.drawn[part][name] = share
        return out

    def mix(self) -> dict:
        """For the manifest: each pool's weight and what it gave to each part."""
        return {name: {"weight": w, **{part: counts.get(name, 0)
                                       for part, counts in self.drawn.items()}}
                for name, w in self.weights.items()}


def generated_pool(name: str) -> tuple[str, int | None] | None:
    """(pool, N) for ``generated-domain[:N]`` / ``generated-general[:N]``, else None."""
    pool, _, count = name.partition(":")
    if pool not in GENERATED_POOLS:
        return None
    if count and not (count.isdigit() and int(count) >= 1):
        raise ContextError(f"context pool {name!r}: N in {pool}:N is a whole number >= 1")
    return pool, int(count) if count else None


def _shares(count: int, weights: dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """Shares of ``count`` by weight, where a pool smaller than its share gives all it has and
    the others share the rest by their weights."""
    fixed: dict[str, int] = {}
    while True:
        free = {n: w for n, w in weights.items() if n not in fixed}
        shares = largest_remainder(count - sum(fixed.values()), free) if free else {}
        short = {n: sizes[n] for n, s in shares.items() if sizes[n] < s}
        if not short:
            return {n: fixed.get(n, shares.get(n, 0)) for n in weights}
        fixed.update(short)


def largest_remainder(count: int, weights: dict[str, float]) -> dict[str, int]:
    """``count`` split in proportion to ``weights``, whole numbers summing to ``count``."""
    total = sum(weights.values())
    exact = {k: count * w / total for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[:count - sum(out.values())]:
        out[k] += 1
    return out


def _every_of(spec) -> list[Context]:
    if isinstance(spec, list):
        if not spec:
            raise ContextError("the list of contexts is empty")
        return [as_context(c) for c in spec]
    return load(spec)


# -- overlap with evaluation items --------------------------------------------------------------

_STOP = frozenset("""a an the is are was were be been am do does did of to in on at for by with and
or but if then than so as it its this that these those what which who whom whose when where why how
can could would should will shall may might must i you he she we they me my your our their his her
them us there here about into from up down out over under again very just also any some no not
only own same too let please tell give write make get have has had one answer reply question
""".split())
# the contractions that the general rules below ("n't" -> " not", "'s" dropped) get wrong
_CONTRACTIONS = {"can't": "can not", "won't": "will not", "i've": "i have", "i'm": "i am"}
_OPERATORS = {"+": "+", "plus": "+", "add": "+", "sum": "+", "-": "-", "minus": "-",
              "subtract": "-", "difference": "-", "*": "*", "x": "*", "times": "*",
              "multiplied": "*", "multiply": "*", "product": "*", "/": "/", "divided": "/",
              "divide": "/", "quotient": "/"}
# a '-' touching a letter is a hyphen ("a 3-day trip"), not a minus
_TOKENS = re.compile(r"[a-z]+|[+*/]|(?<![a-z])-(?![a-z])")


def content_words(text: str) -> frozenset[str]:
    """The words of ``text`` that carry its subject: lower case, contractions and possessives
    expanded or dropped, no digits and no function words."""
    text = text.lower().replace("\u2019", "'")
    for short, long in _CONTRACTIONS.items():
        text = text.replace(short, long)
    text = re.sub(r"n't\b", " not", re.sub(r"'s\b", "", text))
    return frozenset(w for w in re.findall(r"[a-z]+", text) if w not in _STOP)


def arithmetic_key(text: str) -> tuple | None:
    """The sum a question asks for, whatever its wording, or None: 'What is 8 * 6?', 'Calculate 6
    times 8.' and 'Multiply 6 by 8.' all give ('*', 6, 8); 'What is 12 squared?' gives ('*', 12,
    12); 'Subtract 29 from 85.' and 'How many times does 6 go into 48?' give ('-', 85, 29) and
    ('/', 48, 6). Sums and products sort their operands; differences and quotients keep their
    order."""
    lower = text.lower()
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    if len(numbers) == 1 and re.search(r"\bsquared?\b", lower):
        return ("*", numbers[0], numbers[0])
    if len(numbers) != 2:
        return None
    a, b = numbers
    if re.search(r"\d\s+goe?s?\s+into\s+\d", lower):
        return ("/", b, a)
    if re.search(r"\b(subtract|take|takes|taking)\b.*\d.*\bfrom\b.*\d", lower):
        return ("-", b, a)
    found = {_OPERATORS[t] for t in _TOKENS.findall(lower) if t in _OPERATORS}
    if len(found) != 1:
        return None
    op = found.pop()
    return (op, a, b) if op in "-/" else (op, *sorted(numbers))


def near_duplicates(texts: list[str], others: list[str], threshold: float = 0.5,
                    min_shared: int = 2) -> list[tuple[str, str, float]]:
    """Pairs (text, other, similarity) that ask the same thing, for checking that training
    contexts are not evaluation items: the same sum (``arithmetic_key``), or content words (of
    the whole texts, or of quoted passages such as a review) that overlap by at least
    ``threshold`` (Jaccard) in at least ``min_shared`` words. Two texts that ask different sums
    are not duplicates, however alike their words."""
    if not 0 < threshold <= 1 or min_shared < 1:
        raise ValueError(f"threshold={threshold}, min_shared={min_shared}: the threshold is a "
                         "Jaccard similarity in (0, 1] and min_shared at least 1 word")
    def parts(text):
        found = [content_words(text)] + [content_words(q) for q in re.findall(r'"([^"]+)"', text)]
        return [w for w in found if len(w) >= min_shared]

    theirs = [(o, arithmetic_key(o), parts(o)) for o in others]
    pairs = []
    for text in texts:
        key, mine = arithmetic_key(text), parts(text)
        for other, other_key, other_parts in theirs:
            if key is not None and other_key is not None:
                best = float(key == other_key)
            else:
                best = max((len(a & b) / len(a | b) for a in mine for b in other_parts
                            if len(a & b) >= min_shared), default=0.0)
            if best >= threshold:
                pairs.append((text, other, best))
    return pairs
