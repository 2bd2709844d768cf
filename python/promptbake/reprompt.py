"""The re-prompt matrix and half-baking curves of an evaluator (Prompt Baking, Sec. 4-5).

A baked model can be prompted again: the 2 x 2 matrix base / base + u / baked / baked + u shows
whether the bake reproduces the prompt's effect (baked close to base + u) and whether prompting
the baked model pushes further (baked + u beyond). Strength sweeps score the model with the LoRA
delta scaled by alpha, or at each half-baked snapshot.

An evaluator is any callable ``evaluator(model, tokenizer, system, framing=...) -> Score`` (see
``promptbake.tasks``); every cell is scored on the same items, so differences between cells are
paired item by item.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

from promptbake import _lm
from promptbake.tasks import Score

CELLS = ("base", "base+u", "baked", "baked+u")


def score(baked, evaluator: Callable, *, adapter: bool, prompted: bool,
          strength: float | None = None):
    """``evaluator``'s score of one cell: the LoRA delta on (at ``strength``, default the baked
    model's own) or off, the prompt u in the system turn or not (the bake's student framing)."""
    alpha = baked.strength if strength is None else strength
    with _lm.adapter(baked.model, enabled=adapter, strength=alpha):
        return evaluator(baked.model, baked.tokenizer, baked.prompt if prompted else None,
                         framing=baked.framing.student)


def item_scores(result) -> dict:
    """{item id: score} of a Score's items."""
    return {item["id"]: float(item["score"]) for item in result.items}


def recovery(base, prompted, baked) -> tuple[float | None, float | None]:
    """The share of the prompt's effect the bake reproduces, (baked - base) / (prompted - base),
    on paired items, with a delta-method standard error. None when the prompt has no effect to
    recover (a zero denominator)."""
    b, p, k = item_scores(base), item_scores(prompted), item_scores(baked)
    ids = [i for i in b if i in p and i in k]
    if not ids:
        raise ValueError("the three scores share no items: score them on the same task")
    gain = [p[i] - b[i] for i in ids]
    baked_gain = [k[i] - b[i] for i in ids]
    n = len(ids)
    mean_gain = sum(gain) / n
    if mean_gain == 0:
        return None, None
    ratio = sum(baked_gain) / n / mean_gain
    if n < 2:
        return ratio, None
    residuals = [g2 - ratio * g1 for g1, g2 in zip(gain, baked_gain)]
    spread = math.sqrt(sum(r * r for r in residuals) / (n - 1))
    return ratio, spread / (math.sqrt(n) * abs(mean_gain))


@dataclasses.dataclass
class RepromptMatrix:
    """The four cells' scores, and how much of the prompt's effect the bake recovers."""

    evaluator: str
    cells: dict  # name in CELLS -> Score
    recovery: float | None  # (baked - base) / (base+u - base)
    recovery_se: float | None

    def to_dict(self, items: bool = False) -> dict:
        """JSON-able; with ``items`` each cell keeps its per-item results, which ``from_dict``
        needs."""
        return {"evaluator": self.evaluator,
                "cells": {name: s.to_dict(items=items) for name, s in self.cells.items()},
                "recovery": self.recovery, "recovery_se": self.recovery_se}

    @classmethod
    def from_dict(cls, data: dict) -> RepromptMatrix:
        """The matrix ``to_dict(items=True)`` saved."""
        if any("items" not in cell for cell in data["cells"].values()):
            raise ValueError("this matrix was saved without its items: save it with "
                             "to_dict(items=True) to read it back")
        return cls(data["evaluator"], {name: Score(**cell) for name, cell in data["cells"].items()},
                   data["recovery"], data["recovery_se"])

    def table(self) -> str:
        """Markdown: rows without / with u, columns base / baked."""
        def cell(name: str) -> str:
            s = self.cells[name]
            return f"{s.value:.3f}" + ("" if s.se is None else f" ± {s.se:.3f}")

        lines = [f"| {self.evaluator} | base | baked |", "|---|---:|---:|",
                 f"| without u | {cell('base')} | {cell('baked')} |",
                 f"| with u | {cell('base+u')} | {cell('baked+u')} |"]
        return "\n".join(lines)


def reprompt_matrix(baked, evaluator: Callable, *, strength: float | None = None) -> RepromptMatrix:
    """Scores base, base + u, baked and baked + u with ``evaluator`` (the 2 x 2 re-prompt matrix).

    ``strength``: the baked cells' alpha (default: the baked model's own).
    """
    cells = {}
    for name in CELLS:
        cells[name] = score(baked, evaluator, adapter=name.startswith("baked"),
                            prompted=name.endswith("+u"), strength=strength)
    ratio, se = recovery(cells["base"], cells["base+u"], cells["baked"])
    return RepromptMatrix(_name(evaluator), cells, ratio, se)


def strength_sweep(baked, evaluator: Callable, strengths: Iterable[float]) -> dict[float, object]:
    """``evaluator``'s score of the baked model without u at each strength alpha (0 = base)."""
    return {float(a): score(baked, evaluator, adapter=True, prompted=False, strength=float(a))
            for a in strengths}


def snapshot_sweep(baked, evaluator: Callable, *, ends: bool = True) -> dict[int, object]:
    """``evaluator``'s score at every half-baked snapshot (``--snapshot-every``) and at the end
    (the half-baking curve against optimizer steps). Step 0 is the base model; ``ends=False``
    leaves out step 0 and the last step, for a caller that has scored the base and the baked
    model already (a re-prompt matrix)."""
    if baked.path is None:
        raise ValueError("this bake has no directory, so no snapshots: bake with out=DIR and "
                         "snapshot_every=N")
    snapshots = _lm.snapshot_steps(baked.path)
    if not snapshots:
        raise ValueError(f"{baked.path} has no snapshots: bake with --snapshot-every N")
    points = {0: score(baked, evaluator, adapter=False, prompted=False)} if ends else {}
    for step, directory in snapshots:
        with _lm.adapter_weights(baked.model, directory):
            points[step] = score(baked, evaluator, adapter=True, prompted=False, strength=1.0)
    if ends:
        points[last_step(baked)] = score(baked, evaluator, adapter=True, prompted=False,
                                         strength=1.0)
    return points


def last_step(baked) -> int:
    """The optimizer step the finished bake stands at (the x of its point on a snapshot curve)."""
    steps = len(baked.manifest.get("train_kl_per_token", []))
    if not steps:
        raise ValueError(f"{baked.path}: its manifest records no training steps "
                         "(train_kl_per_token); it was not written by a finished bake")
    return steps


def plot_sweep(points: dict, path, *, xlabel: str, ylabel: str, title: str,
               references: dict | None = None) -> None:
    """Score against strength or step, with standard errors and horizontal reference lines
    (e.g. ``{"base": Score, "base + u": Score}``); written to a temporary name first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from promptbake import _files

    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, [points[x].value for x in xs], yerr=[points[x].se or 0 for x in xs],
                marker="o", capsize=3, label="baked, no prompt")
    for (label, ref), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(ref.value, color="grey", ls=style, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    _files.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _name(evaluator) -> str:
    return getattr(evaluator, "name", None) or getattr(evaluator, "__name__", "evaluator")
