"""When a loop of bakes stops: plateau rules over a per-round metric (higher is better).

A round "gains" when its metric beats a reference by more than a relative ``threshold`` of the
reference's magnitude. Pursuit (and any orchestration of rounds) stops on a plateau: ``patience``
rounds in a row that gain nothing on the best before them; it keeps the best round, not the
last.
"""

from __future__ import annotations

import math


def gains(value: float, reference: float, threshold: float) -> bool:
    """True when ``value`` beats ``reference`` by more than ``threshold`` of its magnitude."""
    return value - reference > threshold * max(abs(reference), 1e-12)



def plateaued(metrics: list[float], threshold: float, patience: int) -> bool:
    """True when each of the last ``patience`` rounds improved on the best before it by less than
    ``threshold`` (relative to its magnitude)."""
    if len(metrics) <= patience:
        return False
    for i in range(len(metrics) - patience, len(metrics)):
        if gains(metrics[i], max(metrics[:i]), threshold):
            return False
    return True



def stopping(metrics: list[float], threshold: float, patience: int) -> tuple[int, int, str]:
    """Where pursuit stops on rounds that scored ``metrics`` (round 0 first): a tuple of the last
    round it runs, the best round (the one it keeps) and why it stopped ("plateau" or "round
    limit")."""
    if not metrics:
        raise ValueError("no rounds: metrics must hold at least round 0's score")
    best = 0
    for n in range(1, len(metrics)):
        if metrics[n] > metrics[best]:
            best = n
        if plateaued(metrics[:n + 1], threshold, patience):
            return n, best, "plateau"
    return len(metrics) - 1, best, "round limit"



def plateau_round(metrics: list[float], threshold: float) -> int:
    """The first round after which no round improves on the best so far by ``threshold``
    (relative) or more: where the curve ``metrics`` (round 0 first) levels off."""
    if not metrics:
        raise ValueError("no rounds: metrics must hold at least round 0's score")
    for i in range(len(metrics)):
        best = max(metrics[:i + 1])
        if not any(gains(m, best, threshold) for m in metrics[i + 1:]):
            return i
    raise AssertionError("unreachable: the last round always qualifies")



def meets_target(metrics: list[float], stopped_at: int, threshold: float,
                 within: int = 2) -> bool:
    """The target for a pursuit that ran rounds 0..``stopped_at``: it improved on round 0 by more
    than ``threshold`` (relative), or it stopped no earlier than the plateau of ``metrics`` and at
    most ``within`` rounds after it. Pass every round measured, beyond the stop too when there
    are any, so that a stop before a later improvement fails."""
    if not 0 <= stopped_at < len(metrics):
        raise ValueError(f"stopped_at={stopped_at} is not a round of the {len(metrics)} measured")
    improved = gains(max(metrics[1:stopped_at + 1], default=-math.inf), metrics[0], threshold)
    plateau = plateau_round(metrics, threshold)
    return improved or plateau <= stopped_at <= plateau + within

