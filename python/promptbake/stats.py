"""Paired tests of two scores on the same items: exact McNemar for right/wrong items, a seeded
sign-flip randomisation test otherwise. Used by the forgetting gate and by the re-prompt
matrix's question whether a prompt changes a score at all."""

from __future__ import annotations

import math
import random

SIGNIFICANCE = 0.05


def mcnemar(pairs: list[tuple[float, float]]) -> float:
    """Two-sided exact McNemar test of paired 0/1 outcomes: the discordant pairs are a fair coin
    under no change."""
    worse = sum(1 for x, y in pairs if x == 1 and y == 0)
    better = sum(1 for x, y in pairs if x == 0 and y == 1)
    n = worse + better
    if n == 0:
        return 1.0
    k = min(worse, better)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)



def sign_flip(differences: list[float], draws: int = 20000, seed: int = 0) -> float:
    """Two-sided paired randomisation test: how often random sign flips of the differences give
    a mean at least as far from zero (seeded, so the same data give the same p)."""
    observed = abs(sum(differences))
    if observed == 0:
        return 1.0
    rng = random.Random(seed)
    hits = sum(1 for _ in range(draws)
               if abs(sum(d if rng.random() < 0.5 else -d for d in differences)) >= observed - 1e-12)
    return (hits + 1) / (draws + 1)



def paired_test(pairs: list[tuple[float, float]]) -> tuple[float, str]:
    """(two-sided p, the test's name) for paired scores (before, after) of the same items."""
    if all(x in (0.0, 1.0) and y in (0.0, 1.0) for x, y in pairs):
        return mcnemar(pairs), "exact McNemar"
    return sign_flip([y - x for x, y in pairs]), "paired sign-flip"


def paired_difference(before: dict, after: dict) -> tuple[float, float | None, int]:
    """(mean of after - before, its standard error, n) over the keys both dicts score (per-item
    scores of two models on the same items); the error is None for fewer than two items."""
    diffs = [after[k] - before[k] for k in before if k in after]
    n = len(diffs)
    mean = sum(diffs) / n if n else float("nan")
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n >= 2 else None
    return mean, se, n
