"""How measured numbers are written, one way everywhere: "mean ± se", percentages, short labels.

A missing value prints as "?"; a missing standard error (fewer than two independent units to
estimate it from) is left out rather than guessed.
"""

from __future__ import annotations


def pm(value: float | None, se: float | None, spec: str = ".3f", *, scale: float = 1.0,
       unit: str = "") -> str:
    """``value ± se`` in ``spec`` (a format spec; a width in it applies to the value only),
    both multiplied by ``scale`` and followed by ``unit``."""
    if value is None:
        return "?"
    text = f"{scale * value:{spec}}{unit}"
    if se is None:
        return text
    return f"{text} ± {scale * se:{spec.lstrip('<>=^+- 0123456789')}}{unit}"


def pct(value: float | None, se: float | None = None, digits: int = 1) -> str:
    """A fraction as a percentage with its error: ``0.903, 0.01`` -> ``90.3% ± 1.0%``."""
    return pm(value, se, f".{digits}f", scale=100, unit="%")


def short(text: str, width: int = 40) -> str:
    """``text`` cut to ``width`` characters with an ellipsis (a prompt as a plot label)."""
    return text if len(text) <= width else text[:width - 1] + "…"
