"""The tools that ship with promptbake, their held-out test items and the contexts to bake on.

Five tools (``data/tools/tools.json``): ``CALC`` (``tools.calculator``), ``CONVERT``
(``tools.units``), ``DAYS_BETWEEN`` and ``WEEKDAY`` (``tools.dates``), ``LOOKUP``
(``tools.lookup``, a table of countries). Each spec's test items are in
``data/tools/tests/<NAME>.jsonl``; ``data/tools/no_tool.jsonl`` holds questions to answer
without a tool; ``data/tools/train.jsonl`` holds user messages to bake on, which share nothing
with either (tested with ``promptbake.contexts.near_duplicates``). Every file is generated, the
expected values computed by the tools themselves, by ``data/tools/generate.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from promptbake import contexts
from promptbake.tools import calculator, dates, lookup, units
from promptbake.tools.registry import Registry
from promptbake.tools.spec import ToolSpec, load_specs, parse_items

FUNCTIONS: dict[str, Callable] = {
    "CALC": calculator.calculate,
    "CONVERT": units.convert,
    "DAYS_BETWEEN": dates.days_between,
    "WEEKDAY": dates.weekday,
    "LOOKUP": lookup.lookup,
}


def _data(name: str):
    return resources.files("promptbake").joinpath(f"data/tools/{name}")


def specs() -> list[ToolSpec]:
    """The shipped tool specs, with their test items."""
    with resources.as_file(_data("tools.json")) as path:
        return load_specs(Path(path))


def registry(**options) -> Registry:
    """A registry of the shipped tools (``options``: Registry's timeout, max_chars,
    isolation); register your own tools on it too."""
    found = Registry(**options)
    for spec in specs():
        found.register(spec, FUNCTIONS[spec.name])
    return found


def no_tool_items() -> list[dict]:
    """Held-out questions that no shipped tool helps with (over-calling is measured on them)."""
    return parse_items(_data("no_tool.jsonl").read_text("utf-8"), "promptbake/data/tools/"
                                                                  "no_tool.jsonl")


def test_items(tools: list[ToolSpec] | None = None, no_tool: bool = True) -> list[dict]:
    """The test items of ``tools`` (default: the shipped ones) and, with ``no_tool``, the
    shipped no-tool items, interleaved kind by kind so that the first items hold every kind."""
    groups = [spec.tests for spec in (specs() if tools is None else tools) if spec.tests]
    if no_tool:
        groups.append(no_tool_items())
    return interleave(groups)


def interleave(groups: list[list]) -> list:
    """The groups' items taken in turn, each group spread evenly over the whole list."""
    keyed = [((i + 0.5) / len(group), g, item) for g, group in enumerate(groups)
             for i, item in enumerate(group)]
    return [item for *_, item in sorted(keyed, key=lambda k: (k[0], k[1]))]


def train_rows() -> list[dict]:
    """The training questions as written: ``{"user": message, "tool": the tool it needs, or
    None}``."""
    text = _data("train.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def train_contexts() -> list[contexts.Context]:
    """User messages to bake the shipped tools on (tool questions and questions to answer
    without a tool), as contexts for ``promptbake.bake``."""
    with resources.as_file(_data("train.jsonl")) as path:
        return contexts.load(Path(path))
