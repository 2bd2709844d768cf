"""The re-prompt matrix and half-baking curves of an evaluator (Prompt Baking, Sec. 4-5).

A baked model can be prompted again: the 2 x 2 matrix of variants base / prompted (base + u) /
baked / baked + prompt shows whether the bake reproduces the prompt's effect (baked close to
prompted) and whether prompting the baked model pushes further (baked + prompt beyond). Strength
sweeps score the baked model with the LoRA delta scaled by a strength, or at each half-baked
snapshot.

An evaluator is any callable ``evaluator(model, tokenizer, system, framing=...) -> Score`` (see
``promptbake.tasks``); every cell is scored on the same items, so differences between cells are
paired item by item.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

from promptbake import formatting, mc_kl, modeling, plotting
from promptbake.artifact import snapshot_steps
from promptbake.modeling import BAKED, BASE, VARIANTS, Variant
from promptbake.stats import SIGNIFICANCE, paired_test
from promptbake.tasks import Score

CELLS = tuple(VARIANTS)  # base, prompted, baked, baked+prompt
# What earlier promptbake versions called two of the cells, in the matrices they saved
LEGACY_CELLS = {"base+u": "prompted", "baked+u": "baked+prompt"}


def saved_cell(cells: dict, name: str):
    """Cell ``name`` of a saved matrix's cells, also when an earlier version saved it under its
    old name (``LEGACY_CELLS``)."""
    if name in cells:
        return cells[name]
    old = {new: legacy for legacy, new in LEGACY_CELLS.items()}.get(name)
    if old is None or old not in cells:
        raise KeyError(f"no cell {name!r} in a matrix with cells {sorted(cells)}")
    return cells[old]


def score(baked, evaluator: Callable, variant: Variant, teacher: tuple | None = None):
    """``evaluator``'s score of ``baked`` as ``variant``: the LoRA delta on (at the variant's
    strength) or off, the prompt u in the system turn or not (the bake's student framing).
    ``teacher`` (``mc_kl.teacher_of``): for a bake that learned another model's prompted
    behaviour, the prompted variant is that model with u, the reference the bake was after."""
    if variant.prompted and not variant.baked:
        mc_kl.check_own_teacher(baked, teacher)
        if teacher is not None:
            with mc_kl.prompted_model(baked, teacher) as (lm, framing):
                return evaluator(lm, baked.tokenizer, baked.prompt, framing=framing.student)
    with variant.active(baked.model):
        return evaluator(baked.model, baked.tokenizer, baked.prompt if variant.prompted else None,
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


def prompt_effect(base, prompted) -> dict:
    """What the prompt does to a score, paired item by item: {"difference" (prompted - base),
    "se", "p", "test", "significant"} (``stats.paired_test`` at ``stats.SIGNIFICANCE``)."""
    b, p = item_scores(base), item_scores(prompted)
    pairs = [(b[i], p[i]) for i in b if i in p]
    if not pairs:
        raise ValueError("the two scores share no items: score them on the same task")
    diffs = [y - x for x, y in pairs]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    p_value, test = paired_test(pairs)
    return {"difference": mean, "se": se, "p": p_value, "test": test,
            "significant": p_value < SIGNIFICANCE}


@dataclasses.dataclass
class RepromptMatrix:
    """The four cells' scores, what the prompt does to the score (``effect``), and how much of
    it the bake recovers. The recovery is given only where the prompt's effect is significant:
    a ratio over an effect that may be zero says nothing (None then, with the effect shown)."""

    evaluator: str
    cells: dict  # variant name (CELLS) -> Score
    recovery: float | None  # (baked - base) / (prompted - base)
    recovery_se: float | None
    effect: dict | None = None  # prompt_effect(base, prompted)

    def to_dict(self, items: bool = False) -> dict:
        """JSON-able; with ``items`` each cell keeps its per-item results, which ``from_dict``
        needs."""
        return {"evaluator": self.evaluator,
                "cells": {name: s.to_dict(items=items) for name, s in self.cells.items()},
                "recovery": self.recovery, "recovery_se": self.recovery_se,
                "effect": self.effect}

    def describe_recovery(self) -> str:
        """One line: how much of the prompt's effect the bake recovers, or that there is no
        measurable effect to recover."""
        if self.recovery is not None:
            return (f"the bake recovers {formatting.pct(self.recovery, self.recovery_se, 0)} of "
                    f"the prompt's effect on {self.evaluator}")
        effect = self.effect or {}
        if not effect:
            return f"the prompt does not change the {self.evaluator} score"
        return (f"the prompt has no measurable effect on {self.evaluator} (prompted - base = "
                f"{formatting.pm(effect['difference'], effect['se'], '+.3f')}, p = "
                f"{effect['p']:.2g}), so there is nothing to recover")

    @classmethod
    def from_dict(cls, data: dict) -> RepromptMatrix:
        """The matrix ``to_dict(items=True)`` saved (by this or an earlier version)."""
        if any("items" not in cell for cell in data["cells"].values()):
            raise ValueError("this matrix was saved without its items: save it with "
                             "to_dict(items=True) to read it back")
        return cls(data["evaluator"], {LEGACY_CELLS.get(name, name): Score(**cell)
                                       for name, cell in data["cells"].items()},
                   data["recovery"], data["recovery_se"], data.get("effect"))

    def table(self) -> str:
        """Markdown: rows without / with u, columns base / baked."""
        def cell(name: str) -> str:
            return formatting.pm(self.cells[name].value, self.cells[name].se)

        lines = [f"| {self.evaluator} | base | baked |", "|---|---:|---:|",
                 f"| without u | {cell('base')} | {cell('baked')} |",
                 f"| with u | {cell('prompted')} | {cell('baked+prompt')} |"]
        return "\n".join(lines)


def reprompt_matrix(baked, evaluator: Callable, *, strength: float | None = None,
                    teacher: tuple | None = None) -> RepromptMatrix:
    """Scores the four variants base, prompted, baked and baked + prompt with ``evaluator`` (the
    2 x 2 re-prompt matrix).

    ``strength``: the baked cells' strength (default: the baked model's own). ``teacher``: a
    separate teacher the bake learned from (``mc_kl.teacher_of``), which the prompted cell is.
    """
    strength = baked.strength if strength is None else strength
    cells = {name: score(baked, evaluator, variant.at(strength), teacher)
             for name, variant in VARIANTS.items()}
    effect = prompt_effect(cells["base"], cells["prompted"])
    ratio, se = recovery(cells["base"], cells["prompted"], cells["baked"]) \
        if effect["significant"] else (None, None)
    return RepromptMatrix(_name(evaluator), cells, ratio, se, effect)


def strength_sweep(baked, evaluator: Callable, strengths: Iterable[float]) -> dict[float, object]:
    """``evaluator``'s score of the baked model without u at each strength (0 = base)."""
    return {float(a): score(baked, evaluator, BAKED.at(a)) for a in strengths}


def snapshot_sweep(baked, evaluator: Callable, *, ends: bool = True) -> dict[int, object]:
    """``evaluator``'s score at every half-baked snapshot (``--snapshot-every``) and at the end
    (the half-baking curve against optimizer steps). Step 0 is the base model; ``ends=False``
    leaves out step 0 and the last step, for a caller that has scored the base and the baked
    model already (a re-prompt matrix)."""
    if baked.path is None:
        raise ValueError("this bake has no directory, so no snapshots: bake with out=DIR and "
                         "snapshot_every=N")
    snapshots = snapshot_steps(baked.path)
    if not snapshots:
        raise ValueError(f"{baked.path} has no snapshots: bake with --snapshot-every N")
    points = {0: score(baked, evaluator, BASE)} if ends else {}
    for step, directory in snapshots:
        with modeling.adapter_weights(baked.model, directory):
            points[step] = score(baked, evaluator, BAKED)
    if ends:
        points[last_step(baked)] = score(baked, evaluator, BAKED)
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
    xs = sorted(points)
    with plotting.figure(path) as (_, axes):
        ax = axes[0][0]
        ax.errorbar(xs, [points[x].value for x in xs], yerr=[points[x].se or 0 for x in xs],
                    marker="o", capsize=3, label="baked, no prompt")
        for (label, ref), style in zip((references or {}).items(), ("--", ":", "-.")):
            ax.axhline(ref.value, color="grey", ls=style, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()


def _name(evaluator) -> str:
    return getattr(evaluator, "name", None) or getattr(evaluator, "__name__", "evaluator")
