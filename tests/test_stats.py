"""The paired tests behind the forgetting gate and the re-prompt matrix's recovery."""

import pytest

from promptbake.stats import mcnemar, paired_test, sign_flip


def test_mcnemar_by_hand():
    assert mcnemar([(1, 0)] * 5) == pytest.approx(2 / 32)
    assert mcnemar([(1, 0)] * 6 + [(1, 1)] * 50) == pytest.approx(2 / 64)
    assert mcnemar([(1, 0), (0, 1)]) == 1.0
    assert mcnemar([(1, 1), (0, 0)]) == 1.0  # no discordant pair: no evidence of change
    # 8 worse, 2 better: P(X <= 2 | n=10) = (1 + 10 + 45) / 1024, doubled
    assert mcnemar([(1, 0)] * 8 + [(0, 1)] * 2) == pytest.approx(2 * 56 / 1024)


def test_sign_flip_is_seeded_and_sensible():
    assert sign_flip([0.0, 0.0]) == 1.0
    strong = sign_flip([-0.5] * 12)
    assert strong < 0.001 and strong == sign_flip([-0.5] * 12)
    assert sign_flip([0.1, -0.1, 0.2, -0.2]) > 0.5


def test_paired_test_picks_the_test_by_the_items():
    assert paired_test([(1.0, 0.0)] * 5)[1] == "exact McNemar"
    p, test = paired_test([(0.2, 0.7)] * 12)
    assert test == "paired sign-flip" and p < 0.001
