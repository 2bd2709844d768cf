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
import re
from importlib import resources
from pathlib import Path

Context = list[dict[str, str]]

BUILTIN = "builtin"
UNCONDITIONAL = "none"
_ROLES = ("user", "assistant")


class ContextError(ValueError):
    """A contexts file cannot be used; the message names the file, the line and the fix."""


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
        found.append(_parse_json_line(path, number, line) if jsonl
                     else [{"role": "user", "content": line.strip()}])
    if not found:
        raise ContextError(f"{path} has no contexts: give one user message per line, or JSON "
                           f"lines such as {{\"user\": \"...\"}}")
    return found


def _parse_json_line(path: Path, number: int, line: str) -> Context:
    where = f"{path}, line {number}"
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
    ``count`` empty contexts, each sampled on its own."""
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
    return _every_of(spec)


def _every_of(spec) -> list[Context]:
    if isinstance(spec, list):
        if not spec:
            raise ContextError("the list of contexts is empty")
        return [[{"role": "user", "content": c}] if isinstance(c, str) else list(c) for c in spec]
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
