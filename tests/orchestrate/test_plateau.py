"""The plateau rules: where a loop of rounds stops, which round it keeps, and whether a stop
meets pursuit's target."""

import pytest

from promptbake.orchestrate import plateau as rules


@pytest.mark.parametrize("metrics, patience, expected", [
    ([1.0, 2.0], 1, False),  # still improving
    ([1.0, 2.0, 2.01], 1, True),  # +0.5% < 2%
    ([1.0, 2.0, 1.5], 1, True),  # worse than the best: no improvement
    ([1.0, 2.0, 2.01], 2, False),  # one flat round is not enough with patience 2
    ([1.0, 2.0, 2.01, 2.02], 2, True),
    ([1.0, 2.0, 2.01, 3.0], 2, False),
    ([-0.5, -0.2], 1, False),  # negative metrics (-KL): improving
    ([-0.5, -0.499], 1, True),
])
def test_plateau_rule(metrics, patience, expected):
    assert rules.plateaued(metrics, 0.02, patience) is expected


@pytest.mark.parametrize("metrics, patience, expected", [
    ([0.317, 0.283, 0.225, 0.167], 1, (1, 0, "plateau")),  # stops at the first flat round
    ([0.317, 0.283, 0.225, 0.167], 3, (3, 0, "plateau")),  # three flat rounds: the last one
    ([0.317, 0.283, 0.225, 0.167], 4, (3, 0, "round limit")),
    ([1.0, 2.0, 3.0], 1, (2, 2, "round limit")),  # improving to the end: keeps the last
    ([1.0, 2.0, 1.0, 5.0], 2, (3, 3, "round limit")),  # a rise after a dip resets patience
    ([1.0, 2.0, 2.01, 1.5], 2, (3, 2, "plateau")),  # keeps the best, 2.01, not the last
    ([1.0], 1, (0, 0, "round limit")),
])
def test_stopping_replays_the_rule_on_a_curve(metrics, patience, expected):
    assert rules.stopping(metrics, 0.02, patience) == expected
    _, _, why = expected
    if why == "plateau":  # more rounds after the stop change nothing: the rule reads up to it
        assert rules.stopping(metrics + [9.0, 9.5], 0.02, patience) == expected
    with pytest.raises(ValueError, match="no rounds"):
        rules.stopping([], 0.02, patience)


def test_plateau_round():
    assert rules.plateau_round([1.0, 2.0, 2.01, 1.9], 0.02) == 1  # +0.5% after round 1
    assert rules.plateau_round([1.0, 2.0, 3.0], 0.02) == 2
    assert rules.plateau_round([1.0, 0.5], 0.02) == 0
    assert rules.plateau_round([1.0, 1.0, 5.0], 0.02) == 2  # a late rise moves the plateau


@pytest.mark.parametrize("metrics, stopped_at, expected", [
    ([0.325, 0.325, 0.283, 0.183], 1, True),  # plateau at 0, stopped 1 round after it
    ([0.325, 0.325, 0.283, 0.183], 3, False),  # ran 3 rounds past its plateau, no gain
    ([0.3, 0.3, 0.5], 1, False),  # stopped before the improvement at round 2
    ([0.3, 0.3, 0.5], 2, True),  # improved on round 0
    ([0.3, 0.303, 0.5], 1, False),  # +1% is under the threshold: not an improvement
    ([0.3], 0, True),
])
def test_meets_target_judges_the_stop_on_every_round(metrics, stopped_at, expected):
    assert rules.meets_target(metrics, stopped_at, 0.02) is expected
    with pytest.raises(ValueError, match="not a round"):
        rules.meets_target(metrics, len(metrics), 0.02)
