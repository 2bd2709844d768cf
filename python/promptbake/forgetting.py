"""Cross-task forgetting: does a bake break what the model could do before?

Every task is scored on the base model and on the baked one (no prompt on either side), on the
same items, so each change is paired item by item and tested for significance. A gate passes
when no task degrades by more than a relative threshold; the default, 3.4%, is the largest drop
reported for the original method. Several bakes give a heatmap of bake prompts x tasks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from promptbake import formatting, plotting, tasks as tasks_mod
from promptbake.stats import paired_test
from promptbake.modeling import BAKED, BASE
from promptbake.reprompt import RepromptMatrix, item_scores, reprompt_matrix, score

MAX_RELATIVE_DROP = 0.034
RULES = ("significant", "strict")


@dataclasses.dataclass
class TaskChange:
    """One task on base and baked: the change, and whether it is a significant degradation."""

    task: str
    base: object  # Score
    baked: object  # Score
    absolute: float  # baked - base
    relative: float | None  # (baked - base) / base; None when base scores 0
    p_value: float  # two-sided, paired: exact McNemar for 0/1 items, else sign-flip test
    test: str
    failed: bool  # the gate's verdict for this task

    def to_dict(self) -> dict:
        return {"task": self.task, "base": self.base.to_dict(), "baked": self.baked.to_dict(),
                "absolute": self.absolute, "relative": self.relative, "p_value": self.p_value,
                "test": self.test, "failed": self.failed}


@dataclasses.dataclass
class Forgetting:
    """Per-task changes and the gate: passes when no task failed."""

    changes: dict  # task -> TaskChange
    max_relative_drop: float
    rule: str
    significance: float

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.changes.values())

    @property
    def worst(self) -> TaskChange | None:
        """The task with the largest relative drop (None without tasks)."""
        ranked = [c for c in self.changes.values() if c.relative is not None]
        return min(ranked, key=lambda c: c.relative, default=None)

    def describe_rule(self) -> str:
        if self.rule == "strict":
            return f"no task's score drops by more than {100 * self.max_relative_drop:.1f}% relative"
        return (f"no task's score drops by more than {100 * self.max_relative_drop:.1f}% "
                f"relative with a paired test significant at p < {self.significance:g}")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "rule": self.describe_rule(),
                "max_relative_drop": self.max_relative_drop, "significance": self.significance,
                "tasks": {name: c.to_dict() for name, c in self.changes.items()}}

    def table(self) -> str:
        lines = ["| task | base | baked | change | relative | p | gate |",
                 "|---|---:|---:|---:|---:|---:|---|"]
        for c in self.changes.values():
            rel = "—" if c.relative is None else f"{100 * c.relative:+.1f}%"
            base, baked = (formatting.pm(s.value, s.se) for s in (c.base, c.baked))
            lines.append(f"| {c.task} | {base} | {baked} | {c.absolute:+.3f} | {rel} | "
                         f"{c.p_value:.3g} | {'FAIL' if c.failed else 'pass'} |")
        return "\n".join(lines)


def forgetting(base, baked, tasks: Iterable | None = None, *, limit: int | None = None,
               max_relative_drop: float = MAX_RELATIVE_DROP, rule: str = "significant",
               significance: float = 0.05) -> Forgetting:
    """Scores every task on the base model and the baked one, without the prompt.

    Args:
        base: None for the baked model with its adapter disabled (the same weights), or a
            (model, tokenizer) pair.
        baked: a ``Baked`` model, scored at its strength.
        tasks: task names or evaluators (default: every task shipped in ``promptbake.tasks``).
        limit: items per task (default: all).
        rule: ``significant`` fails a task whose relative drop exceeds ``max_relative_drop`` and
            whose paired test is significant at ``significance``; ``strict`` fails any relative
            drop beyond the threshold (with 100-item tasks, one item is often more than 3.4%).
    """
    _check_gate(max_relative_drop, rule)
    before, after = {}, {}
    framing = baked.framing.student
    for evaluator in _evaluators(tasks, limit):
        if base is None:
            found = score(baked, evaluator, BASE)
        else:
            found = evaluator(base[0], base[1], None, framing=framing)
        before[found.task] = found
        after[found.task] = score(baked, evaluator, BAKED.at(baked.strength))
    return compare(before, after, max_relative_drop=max_relative_drop, rule=rule,
                   significance=significance)


def compare(before: dict, after: dict, *, max_relative_drop: float = MAX_RELATIVE_DROP,
            rule: str = "significant", significance: float = 0.05) -> Forgetting:
    """The gate on scores already measured: ``before`` and ``after`` map task -> Score, on the
    same items (e.g. the base and baked cells of re-prompt matrices)."""
    _check_gate(max_relative_drop, rule)
    if not before or set(before) != set(after):
        raise ValueError(f"compare needs the same tasks on both sides, got {sorted(before)} and "
                         f"{sorted(after)}")
    changes = {task: _change(before[task], after[task], max_relative_drop, rule, significance)
               for task in before}
    return Forgetting(changes, max_relative_drop, rule, significance)


def beyond_prompt(base: dict, prompted: dict, baked: dict, **gate) -> tuple[Forgetting, list]:
    """Forgetting done by baking, beyond the prompt's own effect: (the gate of ``baked`` against
    ``prompted``, the tasks that fail it *and* the gate against ``base``). A prompt can itself
    lower a task (a persona changes how multiple choice is answered) and a faithful bake
    reproduces that; a bake can also recover only part of a prompt's gain. Neither is damage;
    a task worse than both the base model and the prompted one is. ``gate``: ``compare``'s
    options, for both comparisons."""
    against_prompt = compare(prompted, baked, **gate)
    against_base = compare(base, baked, **gate)
    damaged = [task for task, change in against_prompt.changes.items()
               if change.failed and against_base.changes[task].failed]
    return against_prompt, damaged


@dataclasses.dataclass
class SuiteCheck:
    """A bake's task suite: every task's re-prompt matrix, the forgetting gate against the base
    model (``gate``) and against the prompted one (``beyond``), and the tasks that fail both
    (``damaged``: forgetting done by baking, ``beyond_prompt``)."""

    matrices: dict  # task -> RepromptMatrix
    gate: Forgetting
    beyond: Forgetting
    damaged: list

    @classmethod
    def from_matrices(cls, matrices: dict, **gate) -> SuiteCheck:
        """The gates of re-prompt matrices already measured; ``gate``: ``compare``'s options."""
        def cells(name: str) -> dict:
            return {task: m.cells[name] for task, m in matrices.items()}

        return cls.from_cells(cells("base"), cells("prompted"), cells("baked"),
                              matrices=matrices, **gate)

    @classmethod
    def from_cells(cls, base: dict, prompted: dict, baked: dict, *, matrices: dict | None = None,
                   **gate) -> SuiteCheck:
        """The gates of scores already measured: task -> Score for the base, prompted and baked
        models, on the same items."""
        against_base = compare(base, baked, **gate)
        beyond, damaged = beyond_prompt(base, prompted, baked, **gate)
        return cls(dict(matrices or {}), against_base, beyond, damaged)

    @property
    def passed(self) -> bool:
        """Both gates: nothing dropped against base, nothing damaged beyond the prompt."""
        return self.gate.passed and not self.damaged

    def to_dict(self) -> dict:
        return {"reprompt": {n: m.to_dict() for n, m in self.matrices.items()},
                "forgetting": self.gate.to_dict(),
                "forgetting_vs_prompted": {**self.beyond.to_dict(), "damaged": self.damaged,
                                           "passed": not self.damaged}}


def check_suite(baked, evaluators: Iterable, *, say: Callable[[str], None] | None = None,
                teacher: tuple | None = None, **gate) -> SuiteCheck:
    """The re-prompt matrix of every evaluator on ``baked`` and both forgetting gates: what
    ``promptbake evaluate``, ``promptbake report`` and the evaluate benchmark run. ``say`` hears
    of each task before it is scored. ``teacher``: the separate model a bake learned from
    (``mc_kl.teacher_of``): the prompted cells, and the second gate's reference, are it with u."""
    evaluators = list(evaluators)
    for evaluator in evaluators:  # a task that cannot run here fails now, not after the others
        getattr(evaluator, "check_ready", lambda: None)()
    matrices: dict[str, RepromptMatrix] = {}
    for evaluator in evaluators:
        name = getattr(evaluator, "name", "evaluator")
        if say is not None:
            say(f"task {name}: base, base + u, baked, baked + u")
        matrix = reprompt_matrix(baked, evaluator, teacher=teacher)
        matrices[matrix.evaluator] = matrix
    return SuiteCheck.from_matrices(matrices, **gate)


def _check_gate(max_relative_drop: float, rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: choose one of {', '.join(RULES)}")
    if not 0 <= max_relative_drop < 1:
        raise ValueError(f"max_relative_drop={max_relative_drop} must be a fraction in [0, 1)")


def _evaluators(tasks, limit: int | None) -> list[Callable]:
    chosen = list(tasks_mod.TASKS) if tasks is None else list(tasks)
    return [tasks_mod.load_task(t, limit=limit) if isinstance(t, str) else t for t in chosen]


def _change(before, after, max_drop: float, rule: str, significance: float) -> TaskChange:
    a, b = item_scores(before), item_scores(after)
    pairs = [(a[i], b[i]) for i in a if i in b]
    if not pairs:
        raise ValueError(f"task {before.task}: base and baked were scored on different items")
    n = len(pairs)
    mean_a, mean_b = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
    absolute = mean_b - mean_a
    relative = absolute / mean_a if mean_a else None
    p, test = paired_test(pairs)
    drop = -relative if relative is not None else -absolute
    failed = drop > max_drop and (rule == "strict" or p < significance)
    return TaskChange(before.task, before, after, absolute, relative, p, test, failed)


def plot_heatmap(results: dict, path, *,
                 title: str = "Relative change per task after baking") -> None:
    """Bake prompts (rows) x tasks (columns), coloured by relative change in %, significant
    changes starred. ``results``: {label of the bake: Forgetting}."""
    import numpy as np

    labels = list(results)
    tasks = sorted({t for r in results.values() for t in r.changes})
    grid = np.full((len(labels), len(tasks)), np.nan)
    for i, label in enumerate(labels):
        for j, task in enumerate(tasks):
            change = results[label].changes.get(task)
            if change is not None and change.relative is not None:
                grid[i, j] = 100 * change.relative
    bound = max(5.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 5.0)
    size = (1.3 * len(tasks) + 2.5, 0.6 * len(labels) + 1.8)
    with plotting.figure(path, figsize=size) as (fig, axes):
        ax = axes[0][0]
        image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), [formatting.short(label) for label in labels])
        for i, label in enumerate(labels):
            for j, task in enumerate(tasks):
                change = results[label].changes.get(task)
                if change is not None and np.isfinite(grid[i, j]):
                    mark = "*" if change.p_value < results[label].significance else ""
                    ax.text(j, i, f"{grid[i, j]:+.1f}{mark}", ha="center", va="center",
                            fontsize=8)
        fig.colorbar(image, ax=ax, label="relative change, % (* significant)")
        ax.set_title(title)
