"""Exact checkers for generated answers.

A generation item carries a list of checks, ``{"type": ..., ...}``; the item scores 1 only if
every check passes (IFEval's strict prompt-level accuracy). Types:

* ``number`` ``{"value": 1081}``: the last number in the answer equals ``value`` (thousands
  separators and a trailing ``.0`` are accepted).
* ``starts_with`` / ``ends_with`` ``{"value": "Yes"}``: the answer, without surrounding
  whitespace, starts / ends with ``value`` (case-insensitive).
* ``contains`` / ``excludes`` ``{"value": "banana"}``: ``value`` occurs / does not occur
  (case-insensitive).
* ``language`` ``{"value": "fr"}``: the stopword detector below names that language.
* ``uppercase`` / ``lowercase``: every letter is upper / lower case (and there is one).
* ``word_count`` ``{"min": 10, "max": 40}``: whitespace-separated words within the bounds
  (either bound may be left out).
* ``json`` ``{"keys": ["name"]}``: the answer (inside a fenced block if it has one) parses as
  JSON; with ``keys``, it is an object holding them.
* ``python`` ``{"entry_point": "f", "tests": "assert f(1) == 2"}``: the answer's code block runs
  in a sandbox (``promptbake.tasks.sandbox``) followed by the tests.
"""

from __future__ import annotations

import json
import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

# Frequent function words of each language, chosen to overlap little between languages (words
# shared by two of them, such as "de" or "la", count for both). A text is in the language whose
# words make up the largest share of it; see ``detect_language``.
STOPWORDS = {
    "en": "the and is are was were of to in that it for with as on this be have has not but you "
          "they we he she his her from at by or an which would there their what will can about",
    "fr": "le la les des du de et est un une que qui dans pour pas sur au aux ce cette il elle "
          "ils nous vous je sont avec mais ou leur plus son sa ses très être fait comme tout",
    "es": "el la los las de del y es un una que en por para con no se su sus al lo como más "
          "pero muy está son ser fue este esta también hay tiene yo nosotros ellos",
    "de": "der die das und ist ein eine nicht zu mit sich des dem den auf für von im ich sie "
          "es wir auch wird sind war als aber noch nach bei oder wie sehr",
    "it": "il lo la gli le di che è e un una per non con del della sono si nel da al come più "
          "ma anche questo questa molto ha essere suo sua io noi",
    "pt": "o a os as de do da dos das e é um uma que em no na para com não se por mais como "
          "mas muito ser está são tem eu nós ele ela também",
}
_STOPSETS = {lang: set(words.split()) for lang, words in STOPWORDS.items()}
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``1,081`` reads as 1081), or None."""
    found = NUMBER.findall(text)
    while found:
        token = found.pop().rstrip(",")
        try:
            return float(token.replace(",", ""))
        except ValueError:
            continue
    return None


def detect_language(text: str, minimum: int = 3) -> str | None:
    """The language (a key of ``STOPWORDS``) whose stopwords are most frequent in ``text``.

    None when fewer than ``minimum`` stopwords of any language occur, or on a tie. Honest
    limits: it only knows these six languages, and a short or mixed text can be misread.
    """
    words = [w.lower() for w in _WORD.findall(text)]
    words = [w.split("'")[-1] for w in words]  # l'eau -> eau, it's -> s (no language's stopword)
    counts = {lang: sum(w in stop for w in words) for lang, stop in _STOPSETS.items()}
    best = max(counts.values())
    if best < minimum or list(counts.values()).count(best) > 1:
        return None
    return max(counts, key=counts.get)


def _letters(text: str) -> list[str]:
    return [c for c in text if c.isalpha()]


def _json_body(text: str) -> str:
    fenced = re.search(r"```(?:json)?\s*\n?(.*?)```", text, re.DOTALL)
    return (fenced.group(1) if fenced else text).strip()


def check(kind: dict, answer: str) -> bool:
    """Whether ``answer`` passes one check (see the module docstring for the kinds)."""
    name = kind.get("type")
    value = kind.get("value")
    text = answer.strip()
    if name == "number":
        found = last_number(text)
        return found is not None and abs(found - float(value)) < 1e-9
    if name == "starts_with":
        return text.lower().startswith(str(value).lower())
    if name == "ends_with":
        return text.lower().endswith(str(value).lower())
    if name == "contains":
        return str(value).lower() in text.lower()
    if name == "excludes":
        return str(value).lower() not in text.lower()
    if name == "language":
        return detect_language(text) == value
    if name == "uppercase":
        letters = _letters(text)
        return bool(letters) and all(c.isupper() for c in letters if c.lower() != c.upper())
    if name == "lowercase":
        letters = _letters(text)
        return bool(letters) and all(c.islower() for c in letters if c.lower() != c.upper())
    if name == "word_count":
        count = len(text.split())
        return kind.get("min", 0) <= count <= kind.get("max", float("inf"))
    if name == "json":
        try:
            parsed = json.loads(_json_body(text))
        except ValueError:
            return False
        keys = kind.get("keys")
        return not keys or (isinstance(parsed, dict) and all(k in parsed for k in keys))
    if name == "python":
        from promptbake.tasks import sandbox

        code = sandbox.extract_code(answer, kind.get("entry_point"))
        return code is not None and sandbox.run_python(
            code, kind["tests"], timeout=kind.get("timeout", sandbox.TIMEOUT)).passed
    raise ValueError(f"unknown check type {name!r}: use one of {', '.join(KINDS)}")


KINDS = ("number", "starts_with", "ends_with", "contains", "excludes", "language", "uppercase",
         "lowercase", "word_count", "json", "python")
_NEEDS_VALUE = {"number", "starts_with", "ends_with", "contains", "excludes", "language"}


def validate(kind: dict, where: str) -> None:
    """Refuses a malformed check, naming the item (``where``) and the fix."""
    if not isinstance(kind, dict) or kind.get("type") not in KINDS:
        raise ValueError(f"{where}: check {kind!r} needs a 'type' among {', '.join(KINDS)}")
    name = kind["type"]
    if name in _NEEDS_VALUE and "value" not in kind:
        raise ValueError(f"{where}: a {name!r} check needs a 'value'")
    if name == "number" and not isinstance(kind["value"], (int, float)):
        raise ValueError(f"{where}: a 'number' check's value must be a number, got "
                         f"{kind['value']!r}")
    if name == "language" and kind["value"] not in STOPWORDS:
        raise ValueError(f"{where}: language {kind['value']!r} is not detectable: use one of "
                         f"{', '.join(STOPWORDS)}")
    if name == "word_count" and "min" not in kind and "max" not in kind:
        raise ValueError(f"{where}: a 'word_count' check needs 'min', 'max' or both")
    if name == "python" and not isinstance(kind.get("tests"), str):
        raise ValueError(f"{where}: a 'python' check needs 'tests', Python code with asserts")
