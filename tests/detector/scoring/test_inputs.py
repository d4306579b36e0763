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


# --- what the model is fed: an outlier held back ---


def _fed(z: list[float], last: list[float], rows: bool = True, var: float = 1.0) -> np.ndarray:
    from detector.scoring.inputs import within_tail
    from detector.scoring.surprise import standardised_errors

    f = len(z)
    zeros = np.zeros((1, f))
    bound = zeros + 3.0 * math.sqrt(var)  # where the tail starts, in the model's spreads
    mean, log_var = zeros + 1.0, zeros + math.log(4.0)
    error = standardised_errors(np.array([z]), mean, log_var)
    return within_tail(np.array([z]), mean, log_var, error, np.array([last]), bound,
                       np.array([rows]))[0]  # fmt: skip


def test_a_value_beyond_the_tail_is_fed_at_its_start() -> None:
    # predicted 1 with spread 2: the tail starts 3 spreads (6) out, at 7 and -5
    assert _fed([20.0, -20.0, 6.9, -4.9], [0.0] * 4).tolist() == [7.0, -5.0, 6.9, -4.9]
    # in units of the stream's own error scale: twice the model's spread reaches 13
    assert _fed([20.0], [0.0], var=4.0).tolist() == [13.0]


def test_two_beyond_the_tail_on_one_side_are_the_process_moving() -> None:
    # the last error was 4 spreads out: a second one on its side is fed as it is, one on
    # the other side (a noise burst, a sensor that jitters) is still held back
    assert _fed([20.0, -20.0], [4.0, 4.0]).tolist() == [20.0, -5.0]
    assert _fed([20.0, -20.0], [-4.0, -4.0]).tolist() == [7.0, -20.0]
    # a last error within the tail, or none (NaN), holds the value back
    assert _fed([20.0, 20.0], [2.9, math.nan]).tolist() == [7.0, 7.0]


def test_rows_not_asked_for_and_missing_values_are_fed_as_they_are() -> None:
    from detector.scoring.inputs import within_tail

    assert _fed([20.0], [0.0], rows=False).tolist() == [20.0]
    assert math.isnan(_fed([math.nan], [0.0])[0])
    z = np.array([[1.5, 2.0]])  # nothing held back: the very array, no copy
    zeros = np.zeros((1, 2))
    assert within_tail(z, zeros, zeros, z, zeros, zeros + 3.0, np.ones(1, bool)) is z
