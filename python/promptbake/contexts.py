"""Contexts x: the user turns a prompt is baked under (Eq. 3 samples y given u and x).

A context is a list of chat messages without the system turn, ending with a user message. The
built-in set (``data/contexts.txt``, 252 varied user messages) is split by a hash of each context
into a train part and a held-out part that share nothing; held-out contexts only measure the bake. A user file is JSON lines (a string, ``{"user": ...}``, or ``{"messages":
[...]}`` for a multi-turn history) or plain text with one message per line.
"""

from __future__ import annotations

import hashlib
import json
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


def builtin(part: str = "train") -> list[Context]:
    """The shipped contexts: ``train`` (about 200) or ``held_out`` (about 50)."""
    text = resources.files("promptbake").joinpath("data/contexts.txt").read_text("utf-8")
    every = [[{"role": "user", "content": line.strip()}] for line in text.splitlines()
             if line.strip()]
    return split(every, part)


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
