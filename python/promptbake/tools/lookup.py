"""LOOKUP: a fact about a country from the table shipped in ``data/tools/countries.json``
(capital, currency, continent, international calling code).

Country names match without regard to case, accents, a leading "the" or surrounding spaces,
and through the table's aliases ("USA", "UK", ...).
"""

from __future__ import annotations

import functools
import json
import unicodedata
from importlib import resources

from promptbake.tools.registry import ToolError

FIELDS = ("capital", "currency", "continent", "calling_code")


@functools.cache
def table() -> dict[str, dict]:
    """{country: {field: value, ..., "aliases": [...]}} as shipped."""
    text = resources.files("promptbake").joinpath("data/tools/countries.json").read_text("utf-8")
    return json.loads(text)


@functools.cache
def _index() -> dict[str, str]:
    index = {}
    for country, row in table().items():
        for name in [country, *row.get("aliases", [])]:
            index[key(name)] = country
    return index


def key(name: str) -> str:
    """The form names are matched in: lower case, no accents, no leading "the"."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    text = " ".join(text.lower().replace(".", "").split())
    return text.removeprefix("the ")


def country_of(name: str) -> str:
    """The table's name for ``name``; ToolError if the table does not hold it."""
    found = _index().get(key(name)) if isinstance(name, str) else None
    if found is None:
        raise ToolError(f"no country named {name!r} in the table ({len(table())} countries, "
                        f"such as {', '.join(list(table())[:5])})")
    return found


def lookup(country: str, field: str = "capital") -> str:
    """``field`` of ``country``, e.g. ``Paris`` for ("France", "capital")."""
    if field not in FIELDS:
        raise ToolError(f"unknown field {field!r}; the fields are {', '.join(FIELDS)}")
    return table()[country_of(country)][field]
