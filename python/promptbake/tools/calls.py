"""Tool calls: what a call is, how it is written in each syntax, and the one parser that reads
calls back from a model's answer and says what went wrong.

Two syntaxes (``SYNTAXES``):

* ``compact``: ``NAME(arguments)`` alone at the start of a line, as in ``CALC(17 * 23)`` or
  ``CONVERT(5, km, mi)``. Arguments are positional in the order the schema declares them, or
  ``name=value``; a value is a number, ``true`` / ``false`` / ``null``, a JSON string, list or
  object, or else bare text (``km``, ``United Kingdom``, ``2024-03-01``). A tool whose only
  parameter is a string takes everything between the parentheses as that string, so
  ``CALC(2 * (3 + 4))`` needs no quotes. Small models follow this form far more readily than JSON
  (see ``promptbake.tools.rendering``). Text after the closing parenthesis on the same line (a model
  inventing the result: ``CALC(17 * 23) = 391``) is not part of the call. Any line that starts
  with a name and an opening parenthesis is read as a call attempt, so ``print(x)`` on a line of
  its own is a call of an unknown tool.
* ``json``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, anywhere in the answer
  (the Hermes / Qwen convention; a missing closing tag at the end of the answer is tolerated).

Several calls in one answer are parallel calls. Failure classes of a call attempt: ``no_call``
(nothing call-shaped), ``malformed`` (call-shaped but unreadable), ``unknown_tool``, and the
argument problems of ``promptbake.tools.schema`` (``missing_argument``, ``extra_argument``,
``mistyped_argument``, ``out_of_range``).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Iterable

from promptbake.tools import schema

COMPACT = "compact"
JSON = "json"
SYNTAXES = (COMPACT, JSON)

NO_CALL = "no_call"
MALFORMED = "malformed"
UNKNOWN_TOOL = "unknown_tool"
FAILURES = (NO_CALL, MALFORMED, UNKNOWN_TOOL, schema.MISSING, schema.EXTRA, schema.MISTYPED,
            schema.OUT_OF_RANGE)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_COMPACT_START = re.compile(r"^[ \t`]*(" + NAME.pattern + r")\(", re.MULTILINE)
_JSON_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_KEYWORD = re.compile(r"\s*(" + NAME.pattern + r")\s*=(?!=)\s*(.*)\Z", re.DOTALL)
_INTEGER = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)\Z")
_BARE = re.compile(r"[^\s,()\"'=\[\]{}]([^,()\"'=\[\]{}]*[^\s,()\"'=\[\]{}])?\Z")
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False,
             "None": None}


@dataclasses.dataclass(frozen=True)
class Call:
    """A call of a tool by name with JSON arguments."""

    name: str
    arguments: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "arguments": dict(self.arguments)}

    @classmethod
    def from_dict(cls, data: dict) -> Call:
        return cls(data["name"], dict(data.get("arguments", {})))


@dataclasses.dataclass
class Attempt:
    """One call-shaped piece of an answer: the call read from it (None if unreadable), what is
    wrong with it (a failure class and a sentence, None if it is a valid call of a known tool),
    and where it ends in the answer."""

    raw: str
    call: Call | None
    failure: str | None
    message: str
    end: int


@dataclasses.dataclass
class Parsed:
    """Everything call-shaped in an answer, in order."""

    text: str
    attempts: list[Attempt]

    @property
    def called(self) -> bool:
        """Whether the answer tries to call a tool at all (the over-calling count)."""
        return bool(self.attempts)

    @property
    def calls(self) -> list[Call]:
        """The calls that could be read, valid or not."""
        return [a.call for a in self.attempts if a.call is not None]

    @property
    def failure(self) -> str | None:
        """``no_call``, the first attempt's failure class, or None when every call is valid."""
        if not self.attempts:
            return NO_CALL
        return next((a.failure for a in self.attempts if a.failure), None)

    @property
    def message(self) -> str:
        if not self.attempts:
            return "the answer makes no tool call"
        return next((a.message for a in self.attempts if a.failure), "")

    @property
    def end(self) -> int:
        """Where the last call ends: ``text[:end]`` is the assistant turn that gets a result."""
        return max((a.end for a in self.attempts), default=len(self.text))


def format_call(call: Call, syntax: str = COMPACT, parameters: dict | None = None) -> str:
    """``call`` written in ``syntax``. The compact form writes arguments positionally in the
    order of ``parameters`` (the tool's schema) while it can, then as ``name=value``."""
    _check_syntax(syntax)
    if syntax == JSON:
        body = json.dumps(call.to_dict(), ensure_ascii=False).replace("</", "<\\/")
        return f"<tool_call>{body}</tool_call>"
    order = list((parameters or {}).get("properties", {}))
    if _single_string(parameters) and list(call.arguments) == order:
        text = call.arguments[order[0]]
        if isinstance(text, str) and _balanced(text) and "\n" not in text and text.strip():
            return f"{call.name}({text})"
    pieces, positional = [], True
    for i, (name, value) in enumerate(call.arguments.items()):
        positional = positional and i < len(order) and order[i] == name
        pieces.append(_compact_value(value) if positional else f"{name}={_compact_value(value)}")
    return f"{call.name}({', '.join(pieces)})"


def parse(text: str, specs: Iterable, syntax: str = COMPACT) -> Parsed:
    """The call attempts in a model's ``text`` in ``syntax``, each checked against ``specs``
    (the tools on offer: ToolSpecs, or anything with ``name`` and ``parameters``)."""
    _check_syntax(syntax)
    tools = {spec.name: spec.parameters for spec in specs}
    found = _parse_json(text) if syntax == JSON else _parse_compact(text, tools)
    attempts = []
    for raw, call, end, problem in found:
        if call is None:
            attempts.append(Attempt(raw, None, MALFORMED, problem, end))
        elif call.name not in tools:
            known = ", ".join(tools) or "none"
            attempts.append(Attempt(raw, call, UNKNOWN_TOOL,
                                    f"unknown tool {call.name!r} (the tools are: {known})", end))
        else:
            problems = schema.check_arguments(tools[call.name], call.arguments)
            first = problems[0] if problems else None
            attempts.append(Attempt(raw, call, first and first.kind,
                                    f"{call.name}: {first.message}" if first else "", end))
    return Parsed(text, attempts)


# -- json -------------------------------------------------------------------------------------

def _parse_json(text: str) -> list[tuple]:
    found = []
    for match in _JSON_CALL.finditer(text):
        body = match.group(1).strip()
        call, problem = None, ""
        try:
            data, used = json.JSONDecoder().raw_decode(body)
            if body[used:].strip():
                raise ValueError(f"text after the JSON object: {body[used:].strip()[:40]!r}")
            call = _from_json(data)
        except (ValueError, TypeError) as err:
            problem = f"unreadable call {body[:80]!r}: {err}"
        found.append((match.group(0), call, match.end(), problem))
    return found


def _from_json(data) -> Call:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise TypeError('a call is an object {"name": ..., "arguments": {...}}')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's wire format: the arguments as a JSON string
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise TypeError(f"'arguments' must be an object, got {arguments!r}")
    return Call(data["name"], arguments)


# -- compact ----------------------------------------------------------------------------------

def _parse_compact(text: str, tools: dict) -> list[tuple]:
    found = []
    for match in _COMPACT_START.finditer(text):
        name, start = match.group(1), match.end()
        close = _closing(text, start - 1)
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        if close is None or close > line_end:
            found.append((text[match.start(1):line_end], None, line_end,
                          f"{name}( is never closed on its line"))
            continue
        raw = text[match.start(1):close + 1]
        try:
            arguments = _compact_arguments(text[start:close], tools.get(name))
        except ValueError as err:
            found.append((raw, None, close + 1, f"unreadable arguments in {raw!r}: {err}"))
            continue
        found.append((raw, Call(name, arguments), close + 1, ""))
    return found


def _closing(text: str, open_at: int) -> int | None:
    """The index of the parenthesis that closes the one at ``open_at`` (quotes respected)."""
    depth, quote, i = 0, None, open_at
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'" and _opens_quote(text, i):
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        elif c == "\n":
            return None
        i += 1
    return None


def _opens_quote(text: str, i: int) -> bool:
    # An apostrophe inside a word ("Côte d'Ivoire", "don't") does not open a string.
    return text[i] == '"' or not (i > 0 and text[i - 1].isalnum())


def _compact_arguments(inner: str, parameters: dict | None) -> dict:
    names = list((parameters or {}).get("properties", {}))
    if _single_string(parameters):
        keyword = _KEYWORD.match(inner)
        value = keyword.group(2) if keyword and keyword.group(1) == names[0] else inner
        value = value.strip()
        if not value:
            return {}
        return {names[0]: _compact_value_of(value) if value[0] in "\"'" else value}
    arguments: dict = {}
    pieces = _split(inner)
    if pieces == [""]:
        return {}
    keywords = False
    for i, piece in enumerate(pieces):
        keyword = _KEYWORD.match(piece)
        if keyword:
            keywords = True
            name, value = keyword.group(1), _compact_value_of(keyword.group(2).strip())
        elif keywords:
            raise ValueError(f"positional argument {piece.strip()!r} after a name=value one")
        else:
            # a positional argument beyond the declared ones is named for the extra-argument check
            name = names[i] if i < len(names) else f"argument {i + 1}"
            value = _compact_value_of(piece.strip())
        if name in arguments:
            raise ValueError(f"argument {name!r} given twice")
        arguments[name] = value
    return arguments


def _split(inner: str) -> list[str]:
    """``inner`` cut at its top-level commas (not inside quotes or brackets)."""
    pieces, depth, quote, escaped, current = [], 0, None, False, []
    for i, c in enumerate(inner):
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
        elif c in "\"'" and _opens_quote(inner, i):
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(c)
    if quote or depth:
        raise ValueError("unbalanced quotes or brackets")
    pieces.append("".join(current))
    if len(pieces) > 1 and any(not p.strip() for p in pieces):
        raise ValueError("an empty argument between commas")
    return [p if len(pieces) > 1 else p.strip() for p in pieces]


def _compact_value_of(text: str):
    if not text:
        raise ValueError("an argument has no value")
    if text in _LITERALS:
        return _LITERALS[text]
    if _INTEGER.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if text[0] in "\"[{":
        try:
            return json.loads(text)
        except ValueError:
            pass
    if text[0] in "'\"[{":
        try:  # Python's quoting: 'km', ['a', 'b']
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            raise ValueError(f"{text!r} is not a readable value") from err
    return text


def _compact_value(value) -> str:
    if isinstance(value, str):
        if _BARE.match(value) and _compact_value_of(value) == value:
            return value
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)


def _single_string(parameters: dict | None) -> bool:
    properties = (parameters or {}).get("properties", {})
    return len(properties) == 1 and schema.types_of(next(iter(properties.values()))) == ["string"]


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += (c == "(") - (c == ")")
        if depth < 0:
            return False
    return depth == 0 and '"' not in text and "'" not in text


def _check_syntax(syntax: str) -> None:
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown call syntax {syntax!r}: choose one of {', '.join(SYNTAXES)}")
