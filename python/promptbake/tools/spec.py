"""ToolSpec: a tool as the model is told about it and as it is tested.

A spec has a ``name`` (an identifier: letters, digits, underscores), a ``description``, its
``parameters`` as a JSON Schema (the subset of ``promptbake.tools.schema``), ``examples`` (a
user message, the calls it should make, each call's result and the final answer; they become
the demonstrations of ``promptbake.tools.rendering``; an example with no calls shows a question
to answer without the tool) and ``tests``, its held-out test items.

A test item (the same format in a spec and in the shipped ``.jsonl`` files)::

    {"id": "calc-017", "prompt": "What is 17 * 23?",
     "expected": [{"name": "CALC", "arguments": {"expression": ["17 * 23", "23 * 17"]}}],
     "checks": [{"type": "mentions_number", "value": 391}]}

``expected`` lists the calls of a right answer, each argument with its allowed values (the
Berkeley Function Calling Leaderboard's "possible answers": ``""`` among them means the
argument may be left out); an empty list marks an item to answer without any tool. ``checks``
judge the final answer: ``mentions_number`` (some number in the answer equals ``value``: an
answer after a tool call often restates the arguments after the result, so the last number is
not the answer's) or any check of ``promptbake.tasks.checks``. Other fields (``category``, ...)
are kept in the per-item results.

A spec file is JSON: one spec, a list of them, or ``{"tools": [...]}``; ``tests`` may name a
``.jsonl`` file, relative to the spec file, instead of listing the items (``save_specs`` writes
them inline). Loading checks everything and names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from promptbake import files
from promptbake.tasks import checks
from promptbake.tools import schema
from promptbake.tools.calls import NAME, Call


class SpecError(ValueError):
    """A tool spec or a test item cannot be used; the message names the field and the fix."""


MENTIONS_NUMBER = "mentions_number"


@dataclasses.dataclass
class Example:
    """A demonstration: the user's message, the calls it makes, their results, the answer."""

    user: str
    calls: list[Call]
    results: list[str]
    answer: str

    def to_dict(self) -> dict:
        return {"user": self.user, "calls": [c.to_dict() for c in self.calls],
                "results": list(self.results), "answer": self.answer}

    @classmethod
    def from_dict(cls, data, where: str) -> Example:
        if not isinstance(data, dict):
            raise SpecError(f"{where}: an example is an object with user, calls, results, answer")
        for key in ("user", "answer"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise SpecError(f"{where}.{key}: missing or empty; an example needs the user's "
                                f"message and the final answer")
        calls, results = data.get("calls", []), data.get("results", [])
        if not isinstance(calls, list) or not isinstance(results, list):
            raise SpecError(f"{where}: 'calls' and 'results' must be lists")
        if len(calls) != len(results) or not all(isinstance(r, str) for r in results):
            raise SpecError(f"{where}.results: one result text per call ({len(calls)} calls, "
                            f"{len(results)} results)")
        parsed = []
        for i, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("name"), str) or \
                    not isinstance(call.get("arguments", {}), dict):
                raise SpecError(f"{where}.calls[{i}]: a call is {{\"name\": ..., \"arguments\": "
                                f"{{...}}}}, got {call!r}")
            parsed.append(Call.from_dict(call))
        return cls(data["user"], parsed, list(results), data["answer"])


@dataclasses.dataclass
class ToolSpec:
    """A tool: name, description, JSON Schema parameters, demonstrations and test items."""

    name: str
    description: str
    parameters: dict
    examples: list[Example] = dataclasses.field(default_factory=list)
    tests: list[dict] = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self):
        where = f"tool {self.name!r}"
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise SpecError(f"tool name {self.name!r}: use letters, digits and underscores "
                            f"(starting with a letter or underscore, at most 64 characters)")
        if not isinstance(self.description, str) or not self.description.strip():
            raise SpecError(f"{where}: description is missing or empty; say what the tool does")
        try:
            schema.check_schema(self.parameters, f"{where}: parameters")
        except schema.SchemaError as err:
            raise SpecError(str(err)) from err
        for i, example in enumerate(self.examples):
            for j, call in enumerate(example.calls):
                if call.name != self.name:
                    continue  # another tool's call: checked against the set (check_set)
                problems = schema.check_arguments(self.parameters, call.arguments)
                if problems:
                    raise SpecError(f"{where}: examples[{i}].calls[{j}]: {problems[0].message}")
        ids = [item.get("id") for item in self.tests if isinstance(item, dict)]
        for i, item in enumerate(self.tests):
            check_item(item, f"{where}: tests[{i}]")
        if len(set(map(str, ids))) != len(ids):
            raise SpecError(f"{where}: tests repeat item ids; make them unique")

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "parameters": self.parameters, "examples": [e.to_dict() for e in self.examples],
                "tests": list(self.tests)}

    @classmethod
    def from_dict(cls, data, where: str = "tool", base: Path | None = None) -> ToolSpec:
        """A spec from its JSON form; ``base`` is the folder a ``tests`` file name is read
        relative to."""
        if not isinstance(data, dict):
            raise SpecError(f"{where}: a tool spec is a JSON object, got {type(data).__name__}")
        if "name" not in data:
            raise SpecError(f"{where}: missing 'name'; every tool needs a name to be called by")
        where = f"tool {data['name']!r}"
        unknown = sorted(set(data) - {"name", "description", "parameters", "examples", "tests"})
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; a spec has name, "
                            f"description, parameters, examples, tests")
        for key in ("description", "parameters"):
            if key not in data:
                raise SpecError(f"{where}: missing {key!r}")
        examples = data.get("examples", [])
        if not isinstance(examples, list):
            raise SpecError(f"{where}.examples: must be a list")
        tests = data.get("tests", [])
        if isinstance(tests, str):
            tests = read_items(Path(base or ".") / tests)
        if not isinstance(tests, list):
            raise SpecError(f"{where}.tests: a list of test items or the name of a .jsonl file")
        return cls(data["name"], data["description"], data["parameters"],
                   [Example.from_dict(e, f"{where}: examples[{i}]")
                    for i, e in enumerate(examples)], tests)


def check_set(specs: list[ToolSpec]) -> list[ToolSpec]:
    """Refuses a set with two tools of one name, or examples and test items that call a tool
    the set lacks or give it arguments it refuses; returns the set."""
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"duplicate tool names {twice}: each tool of a set needs its own name")
    by_name = {s.name: s for s in specs}
    for spec in specs:
        for i, example in enumerate(spec.examples):
            for j, call in enumerate(example.calls):
                where = f"tool {spec.name!r}: examples[{i}].calls[{j}]"
                if call.name not in by_name:
                    raise SpecError(f"{where}: calls {call.name!r}, which is not in the set "
                                    f"({', '.join(names)})")
                problems = schema.check_arguments(by_name[call.name].parameters, call.arguments)
                if problems:
                    raise SpecError(f"{where}: {problems[0].message}")
        for i, item in enumerate(spec.tests):
            check_expected(item, by_name, f"tool {spec.name!r}: tests[{i}]")
    return specs


def check_item(item, where: str) -> None:
    """Refuses a malformed test item (see the module docstring for the format)."""
    if not isinstance(item, dict):
        raise SpecError(f"{where}: a test item is a JSON object")
    if not isinstance(item.get("id"), (str, int)) or isinstance(item.get("id"), bool):
        raise SpecError(f"{where}: every item needs an 'id' (a string or integer)")
    where = f"{where} ({item['id']!r})"
    if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise SpecError(f"{where}: every item needs a non-empty 'prompt' (the user message)")
    expected = item.get("expected")
    if not isinstance(expected, list):
        raise SpecError(f"{where}: 'expected' must be a list of calls (empty: answer without "
                        f"a tool)")
    for i, call in enumerate(expected):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or \
                not isinstance(call.get("arguments"), dict):
            raise SpecError(f"{where}: expected[{i}] must be {{\"name\": ..., \"arguments\": "
                            f"{{parameter: [allowed values]}}}}")
        for param, allowed in call["arguments"].items():
            if not isinstance(allowed, list) or not allowed:
                raise SpecError(f"{where}: expected[{i}].arguments.{param} must be a non-empty "
                                f"list of allowed values, got {allowed!r}")
    item_checks = item.get("checks", [])
    if not isinstance(item_checks, list):
        raise SpecError(f"{where}: 'checks' must be a list of checks of the final answer")
    for kind in item_checks:
        if isinstance(kind, dict) and kind.get("type") == MENTIONS_NUMBER:
            if not schema.is_type(kind.get("value"), "number"):
                raise SpecError(f"{where}: a {MENTIONS_NUMBER!r} check needs a number 'value'")
            continue
        try:
            checks.validate(kind, where)
        except ValueError as err:
            raise SpecError(str(err)) from err


def check_expected(item: dict, tools: dict, where: str) -> None:
    """Refuses an item whose expected calls name a tool not in ``tools`` ({name: ToolSpec}),
    or allow values the tool's schema refuses."""
    for i, call in enumerate(item["expected"]):
        spec = tools.get(call["name"])
        if spec is None:
            raise SpecError(f"{where} ({item['id']!r}): expected[{i}] calls {call['name']!r}, "
                            f"which is not among the tools ({', '.join(tools)})")
        properties = spec.parameters.get("properties", {})
        required = spec.parameters.get("required", [])
        for param, allowed in call["arguments"].items():
            if param not in properties:
                raise SpecError(f"{where} ({item['id']!r}): expected[{i}] has argument "
                                f"{param!r}, which {call['name']} does not declare")
            for value in allowed:
                if value == "":  # BFCL's marker: the argument may be left out
                    if param in required:
                        raise SpecError(f"{where} ({item['id']!r}): {param!r} is required, so "
                                        f"'' (may be left out) is not an allowed value")
                    continue
                problems = schema.check_value(properties[param], value, param)
                if problems:
                    raise SpecError(f"{where} ({item['id']!r}): expected[{i}]: "
                                    f"{problems[0].message}")
        missing = [r for r in required if r not in call["arguments"]]
        if missing:
            raise SpecError(f"{where} ({item['id']!r}): expected[{i}] leaves out the required "
                            f"argument(s) {missing}")


def read_items(path: Path) -> list[dict]:
    """Test items from a JSON-lines file, one object per line."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"test items file not found: {path}")
    return parse_items(path.read_text("utf-8"), str(path))


def parse_items(text: str, source: str) -> list[dict]:
    items = files.json_lines(text, source, SpecError)
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for number, item in zip(lines, items):
        check_item(item, f"{source}, line {number}")
    return items


def load_specs(path: str | Path) -> list[ToolSpec]:
    """The tool specs in a JSON file (one spec, a list, or ``{"tools": [...]}``), checked."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"tool spec file not found: {path}")
    try:
        data = json.loads(path.read_text("utf-8"))
    except ValueError as err:
        raise SpecError(f"{path}: not JSON ({err})") from err
    return specs_from(data, str(path), path.parent)


def specs_from(data, source: str = "tools", base: Path | None = None) -> list[ToolSpec]:
    """The checked tool specs of a parsed JSON document (see ``load_specs``)."""
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise SpecError(f"{source}: expected a tool spec, a non-empty list of them or "
                        f"{{\"tools\": [...]}}")
    try:
        return check_set([ToolSpec.from_dict(d, f"{source}: tools[{i}]", base)
                          for i, d in enumerate(data)])
    except SpecError as err:
        raise SpecError(f"{source}: {err}") from err


def save_specs(specs: list[ToolSpec], path: str | Path) -> None:
    """Writes ``specs`` as ``{"tools": [...]}`` (test items inline), atomically."""
    check_set(list(specs))
    text = json.dumps({"tools": [s.to_dict() for s in specs]}, indent=2, ensure_ascii=False)
    files.write_text(Path(path), text + "\n")
