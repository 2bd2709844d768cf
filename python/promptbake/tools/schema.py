"""The JSON Schema subset a tool's parameters are written in, and argument checking against it.

The ``jsonschema`` package is not a dependency of promptbake (nor of anything it installs), so
this module checks the subset tool definitions use (OpenAI / BFCL function schemas):

* ``type``: ``object``, ``string``, ``integer``, ``number``, ``boolean``, ``array``, ``null``,
  or a list of them;
* objects: ``properties``, ``required``, ``additionalProperties`` (a boolean);
* values: ``enum``, ``minimum`` / ``maximum``, ``exclusiveMinimum`` / ``exclusiveMaximum``,
  ``minLength`` / ``maxLength``, ``pattern`` (the whole string must match), ``items`` (arrays),
  ``minItems`` / ``maxItems``;
* annotations, read and kept but not checked: ``description``, ``title``, ``default``,
  ``examples``, ``format``.

Any other keyword is refused when a spec is loaded rather than silently not checked.

Two rules differ from JSON Schema on purpose, to match how tool calls are scored (the Berkeley
Function Calling Leaderboard's AST checker) and executed:

* types are Python's: ``integer`` is an ``int`` (``3.0`` is not one, and ``True`` is never a
  number), ``number`` is an ``int`` or a finite ``float``;
* an argument the schema does not declare is refused unless ``additionalProperties`` is true
  (JSON Schema allows it by default): a tool function cannot take an argument it does not
  declare.
"""

from __future__ import annotations

import dataclasses
import math
import re

TYPES = ("object", "string", "integer", "number", "boolean", "array", "null")
_CHECKED = {"type", "properties", "required", "additionalProperties", "enum", "minimum",
            "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
            "pattern", "items", "minItems", "maxItems"}
_ANNOTATIONS = {"description", "title", "default", "examples", "format"}

# What is wrong with a call's arguments; also failure classes of a scored call (tools.calls).
MISSING = "missing_argument"
EXTRA = "extra_argument"
MISTYPED = "mistyped_argument"
OUT_OF_RANGE = "out_of_range"


class SchemaError(ValueError):
    """A parameters schema is not in the supported subset; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a call's arguments: its kind (``MISSING``, ``EXTRA``, ``MISTYPED``,
    ``OUT_OF_RANGE``), where (``"unit"``, ``"items[2]"``) and what, in words."""

    kind: str
    path: str
    message: str


def is_type(value, name: str) -> bool:
    """Whether ``value`` (a parsed JSON value) is of JSON Schema type ``name``, Python's way."""
    if name == "integer":
        return type(value) is int
    if name == "number":
        return type(value) is int or (type(value) is float and math.isfinite(value))
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    if name == "null":
        return value is None
    return False


def same_value(a, b) -> bool:
    """JSON equality: numbers by value (``1 == 1.0``), anything else by value and type (``True``
    is not ``1``)."""
    if is_type(a, "number") and is_type(b, "number"):
        return a == b
    return type(a) is type(b) and a == b


def types_of(schema: dict) -> list[str]:
    """The types a schema allows (every type if it names none)."""
    declared = schema.get("type")
    if declared is None:
        return list(TYPES)
    return [declared] if isinstance(declared, str) else list(declared)


def check_schema(schema, where: str = "parameters", top: bool = True) -> None:
    """Refuses a schema outside the supported subset; ``where`` names it in the message
    (``"tool 'CALC': parameters"``)."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: a schema must be a JSON object, got {schema!r}")
    unknown = sorted(set(schema) - _CHECKED - _ANNOTATIONS)
    if unknown:
        raise SchemaError(f"{where}: unsupported keyword(s) {', '.join(unknown)}; the supported "
                          f"ones are {', '.join(sorted(_CHECKED | _ANNOTATIONS))}")
    declared = schema.get("type")
    names = [declared] if isinstance(declared, str) else declared
    if declared is not None and (not isinstance(names, list) or not names
                                 or any(n not in TYPES for n in names)):
        raise SchemaError(f"{where}.type: {declared!r} is not a JSON Schema type ({', '.join(TYPES)}"
                          f", or a list of them)")
    if top and declared != "object":
        raise SchemaError(f"{where}.type: a tool's parameters must be {{\"type\": \"object\", "
                          f"\"properties\": {{...}}}}, got type {declared!r}")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise SchemaError(f"{where}.properties: must be an object mapping names to schemas")
    for name, sub in properties.items():
        check_schema(sub, f"{where}.properties.{name}", top=False)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError(f"{where}.required: must be a list of property names, got {required!r}")
    undeclared = [r for r in required if r not in properties]
    if undeclared:
        raise SchemaError(f"{where}.required: {undeclared} are not in properties "
                          f"({', '.join(properties) or 'none'})")
    if not isinstance(schema.get("additionalProperties", False), bool):
        raise SchemaError(f"{where}.additionalProperties: only true or false is supported")
    if "enum" in schema:
        enum = schema["enum"]
        if not isinstance(enum, list) or not enum:
            raise SchemaError(f"{where}.enum: must be a non-empty list of allowed values")
        wrong = [v for v in enum if not any(is_type(v, t) for t in types_of(schema))]
        if wrong:
            raise SchemaError(f"{where}.enum: {wrong} are not of type {declared!r}")
    for low, high in (("minimum", "maximum"), ("exclusiveMinimum", "exclusiveMaximum"),
                      ("minLength", "maxLength"), ("minItems", "maxItems")):
        for key in (low, high):
            if key in schema and not is_type(schema[key], "number"):
                raise SchemaError(f"{where}.{key}: must be a number, got {schema[key]!r}")
        if low in schema and high in schema and schema[low] > schema[high]:
            raise SchemaError(f"{where}: {low} {schema[low]} is above {high} {schema[high]}")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except (re.error, TypeError) as err:
            raise SchemaError(f"{where}.pattern: {schema['pattern']!r} is not a regular "
                              f"expression ({err})") from err
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items", top=False)


def check_arguments(schema: dict, arguments) -> list[Problem]:
    """Everything wrong with ``arguments`` (a dict) against a tool's parameters ``schema``, in
    the order found; empty when the call is valid."""
    if not isinstance(arguments, dict):
        return [Problem(MISTYPED, "", f"arguments must be an object, got {arguments!r}")]
    return check_value(schema, arguments)


def check_value(schema: dict, value, path: str = "") -> list[Problem]:
    """Everything wrong with one ``value`` against its ``schema``; ``path`` names it."""
    label = path or "arguments"
    allowed = types_of(schema)
    if not any(is_type(value, t) for t in allowed):
        return [Problem(MISTYPED, path, f"{label} must be of type {' or '.join(allowed)}, got "
                        f"{type(value).__name__} {value!r}")]
    problems = []
    if "enum" in schema and not any(same_value(value, v) for v in schema["enum"]):
        problems.append(Problem(OUT_OF_RANGE, path, f"{label} must be one of "
                                f"{', '.join(map(str, schema['enum']))}, got {value!r}"))
    if is_type(value, "number"):
        for key, fails, words in (("minimum", lambda v, b: v < b, "at least"),
                                  ("maximum", lambda v, b: v > b, "at most"),
                                  ("exclusiveMinimum", lambda v, b: v <= b, "above"),
                                  ("exclusiveMaximum", lambda v, b: v >= b, "below")):
            if key in schema and fails(value, schema[key]):
                problems.append(Problem(OUT_OF_RANGE, path,
                                        f"{label} must be {words} {schema[key]}, got {value!r}"))
    for kind, low, high, unit in ((str, "minLength", "maxLength", "characters"),
                                  (list, "minItems", "maxItems", "items")):
        if not isinstance(value, kind):
            continue
        for key, fails, words in ((low, lambda n, b: n < b, "at least"),
                                  (high, lambda n, b: n > b, "at most")):
            if key in schema and fails(len(value), schema[key]):
                problems.append(Problem(OUT_OF_RANGE, path, f"{label} must have {words} "
                                        f"{schema[key]} {unit}, got {_shown(value, words)}"))
    if isinstance(value, str) and "pattern" in schema and \
            not re.fullmatch(schema["pattern"], value):
        problems.append(Problem(OUT_OF_RANGE, path, f"{label} must match "
                                f"{schema['pattern']!r}, got {value!r}"))
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += check_value(schema["items"], item, f"{path}[{i}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                problems.append(Problem(MISSING, _join(path, name),
                                        f"missing required argument {_join(path, name)!r}"))
        for name, item in value.items():
            if name in properties:
                problems += check_value(properties[name], item, _join(path, name))
            elif not schema.get("additionalProperties", False):
                known = ", ".join(properties) or "none"
                problems.append(Problem(EXTRA, _join(path, name),
                                        f"unexpected argument {_join(path, name)!r} (the "
                                        f"arguments are: {known})"))
    return problems


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _shown(value, words: str):
    """What a length problem shows: a short string too short as itself, else its length."""
    return repr(value) if isinstance(value, str) and words == "at least" else len(value)
