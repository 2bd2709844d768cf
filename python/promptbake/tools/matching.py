"""Is a call right? Scored as the Berkeley Function Calling Leaderboard's AST checker scores it.

An expected call names the tool and, for each argument, its allowed values; ``""`` among them
means the argument may be left out. A call matches when, in this order (BFCL's):

1. its tool is the expected one;
2. every argument the tool's schema requires is there;
3. every argument it gives is declared by the schema *and* listed in the expected call (an
   optional argument the expected call does not mention is unexpected);
4. every argument has its declared type, Python's way: an ``int`` is accepted for a
   ``number`` and compared as a float, a ``float`` is never an ``integer``, ``True`` is never a
   number;
5. every value is among the allowed ones: strings after BFCL's standardisation (lower case,
   without spaces and the characters ``, . / - _ * ^``, single quotes as double quotes), so
   "New York" matches "new york"; except that where the allowed string holds a digit (an
   arithmetic expression, a date) only case and spaces are ignored, because there those
   characters carry the meaning: BFCL's rule would make "17 * 23", "17 - 23" and "17, 23"
   the same call; lists element by element; numbers by value (``5 == 5.0``);
6. every expected argument it leaves out may be left out (``""`` is among its values).

Several expected calls (parallel calls) match when there are as many calls and some pairing
matches every one, in any order (BFCL's ``parallel_function_checker_no_order``, searched in
full rather than greedily). An item that expects no call matches only when there is none
(BFCL's irrelevance category).
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from promptbake.tools import schema
from promptbake.tools.calls import Call

WRONG_TOOL = "wrong_tool"
WRONG_VALUE = "wrong_value"
WRONG_COUNT = "wrong_count"
OVER_CALL = "over_call"
FAILURES = (WRONG_TOOL, schema.MISSING, schema.EXTRA, schema.MISTYPED, WRONG_VALUE, WRONG_COUNT,
            OVER_CALL)
_IGNORED = re.compile(r"[ ,./\-_*^]")
_DIGIT = re.compile(r"\d")
_MAX_SEARCH = 7  # calls beyond which parallel calls are paired greedily


@dataclasses.dataclass(frozen=True)
class Match:
    """Whether calls match the expected ones; if not, the failure class and why."""

    valid: bool
    failure: str | None = None
    message: str = ""


def standardize(text: str) -> str:
    """BFCL's form for comparing strings: lower case, no spaces or ``,./-_*^``, ' as "."""
    return _IGNORED.sub("", text).lower().replace("'", '"')


def _comparable(text: str, numeric: bool) -> str:
    """``text`` as compared with an allowed value: BFCL's form, or for a value holding digits,
    only without spaces and case (see the module docstring)."""
    if numeric:
        return re.sub(r"\s+", "", text).lower().replace("'", '"')
    return standardize(text)


def match(calls: list[Call], expected: list[dict], specs) -> Match:
    """Whether ``calls`` are the ``expected`` ones (see the module docstring); ``specs``: the
    tools on offer (ToolSpecs, or anything with ``name`` and ``parameters``)."""
    tools = {s.name: s.parameters for s in specs}
    if not expected:
        if calls:
            return Match(False, OVER_CALL, f"expected no tool call, got {len(calls)}")
        return Match(True)
    if len(calls) != len(expected):
        return Match(False, WRONG_COUNT, f"expected {len(expected)} call(s), got {len(calls)}")
    if len(calls) == 1:
        return match_call(calls[0], expected[0], tools.get(expected[0]["name"]))
    results = [[match_call(c, e, tools.get(e["name"])) for c in calls] for e in expected]
    if len(calls) <= _MAX_SEARCH:
        for order in itertools.permutations(range(len(calls))):
            if all(results[i][j].valid for i, j in enumerate(order)):
                return Match(True)
    else:
        unused = set(range(len(calls)))
        for row in results:
            found = next((j for j in sorted(unused) if row[j].valid), None)
            if found is None:
                break
            unused.discard(found)
        else:
            return Match(True)
    for i, row in enumerate(results):  # the first expected call that no call matches
        if not any(m.valid for m in row):
            named = [m for c, m in zip(calls, row) if c.name == expected[i]["name"]]
            first = (named or row)[0]
            return Match(False, first.failure, f"expected call {i + 1}: {first.message}")
    return Match(False, WRONG_VALUE, "no pairing of the calls matches every expected call")


def match_call(call: Call, expected: dict, parameters: dict | None) -> Match:
    """Whether one call matches one expected call; ``parameters``: the expected tool's schema."""
    if call.name != expected["name"]:
        return Match(False, WRONG_TOOL, f"called {call.name!r}, expected {expected['name']!r}")
    parameters = parameters or {}
    properties = parameters.get("properties", {})
    allowed = expected["arguments"]
    for name in parameters.get("required", []):
        if name not in call.arguments:
            return Match(False, schema.MISSING, f"missing required argument {name!r}")
    for name, value in call.arguments.items():
        if name not in properties or name not in allowed:
            return Match(False, schema.EXTRA, f"unexpected argument {name!r}")
        types = schema.types_of(properties[name])
        if not any(schema.is_type(value, t) for t in types):
            return Match(False, schema.MISTYPED, f"argument {name!r} must be of type "
                         f"{' or '.join(types)}, got {type(value).__name__} {value!r}")
        if not _allowed(value, allowed[name]):
            values = [v for v in allowed[name] if v != ""]
            return Match(False, WRONG_VALUE, f"argument {name!r} is {value!r}, expected one of "
                         f"{values}")
    for name, values in allowed.items():
        if name not in call.arguments and "" not in values:
            return Match(False, schema.MISSING, f"argument {name!r} is left out; expected one "
                         f"of {values}")
    return Match(True)


def _allowed(value, allowed: list) -> bool:
    if isinstance(value, str):
        return any(_comparable(value, _DIGIT.search(a) is not None) ==
                   _comparable(a, _DIGIT.search(a) is not None)
                   for a in allowed if isinstance(a, str))
    if isinstance(value, list):
        return any(isinstance(a, list) and _same_list(value, a) for a in allowed)
    if isinstance(value, dict):
        return any(isinstance(a, dict) and _same_dict(value, a) for a in allowed)
    return any(schema.same_value(value, a) for a in allowed if a != "")


def _same_list(value: list, allowed: list) -> bool:
    return len(value) == len(allowed) and all(
        _allowed(v, [a]) for v, a in zip(value, allowed))


def _same_dict(value: dict, allowed: dict) -> bool:
    """A dict argument: every key among the allowed ones with an allowed value (each allowed
    key maps to a list of values), and every allowed key given unless it may be left out."""
    for key, item in value.items():
        if key not in allowed or not _allowed(item, allowed[key]):
            return False
    return all(key in value or "" in values for key, values in allowed.items())
