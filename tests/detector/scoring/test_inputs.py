"""detector.scoring.inputs: each stream's own input spread, learnt a bounded step at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.scoring import (
    ewma_alpha,
    huber_consistency,
    learn_input_var,
)


def test_the_input_spread_moves_a_bounded_step_and_skips_missing_values() -> None:
    var = np.array([[1.0, 4.0, 2.0]])
    # a spike of 100 spreads counts as 1.5 of them (clip), then over the consistency factor
    learn_input_var(var, np.array([[100.0, 0.0, math.nan]]), 0.1, 1.5)
    k = huber_consistency(1.5)
    assert var[0, 0] == pytest.approx(1.0 + 0.1 * (2.25 / k - 1.0))  # 1.189
    assert var[0, 1] == pytest.approx(4.0 * 0.9)  # a value at the centre: shrinks by alpha
    assert var[0, 2] == 2.0  # NaN: unchanged


def test_the_input_spread_settles_on_the_variance_of_gaussian_values() -> None:
    """Consistent: for N(0, s^2) values the clipped, rescaled mean square tends to s^2, for
    a stream that varies more (s = 3) or less (s = 0.5) than in training."""
    rng = np.random.default_rng(4)
    for s in (3.0, 0.5):
        var = np.ones((1, 1))
        for z in rng.normal(0.0, s, 30_000):
            learn_input_var(var, np.array([[z]]), ewma_alpha(2000), 1.5)
        assert var[0, 0] == pytest.approx(s * s, rel=0.1)
