"""detector.scoring.surprise: the raw scores and each feature's error against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.scoring import (
    gaussian_nll,
    standardised_errors,
)

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def test_gaussian_nll_matches_a_hand_computation() -> None:
    z = np.array([[1.0, -2.0, 0.3], [0.0, 0.0, 0.0]])
    mean = np.array([[0.5, 0.0, 0.3], [1.0, -1.0, 2.0]])
    log_var = np.array([[0.0, math.log(4.0), -1.0], [0.5, 0.0, math.log(0.25)]])
    expected = []
    for i in range(2):
        total = 0.0
        for j in range(3):
            var = math.exp(log_var[i, j])
            pdf = math.exp(-((z[i, j] - mean[i, j]) ** 2) / (2 * var)) / math.sqrt(
                2 * math.pi * var
            )
            total -= math.log(pdf)
        expected.append(total)
    out = gaussian_nll(z, mean, log_var)
    assert out.shape == (2,)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_gaussian_nll_first_row_by_formula() -> None:
    # 0.5*(log 2pi + 0 + 0.25) + 0.5*(log 2pi + log 4 + 1)
    expected = 2 * HALF_LOG_2PI + 0.125 + 0.5 * math.log(4.0) + 0.5
    got = gaussian_nll(np.array([[1.0, -2.0]]), np.array([[0.5, 0.0]]),
                       np.array([[0.0, math.log(4.0)]]))  # fmt: skip
    assert float(got[0]) == pytest.approx(expected, rel=1e-12)


def test_standardised_errors_are_signed_sigma_units() -> None:
    out = standardised_errors(
        np.array([[1.0, -2.0, 5.0]]),
        np.array([[0.5, 0.0, 5.0]]),
        np.array([[0.0, math.log(4.0), 3.0]]),
    )
    np.testing.assert_allclose(out, [[0.5, -1.0, 0.0]], rtol=1e-12, atol=0)


def test_student_t_score_is_near_the_gaussian_close_in_and_logarithmic_far_out() -> None:
    from detector.scoring import STUDENT_T_DOF, student_t_score

    def score(e: float) -> float:
        return float(student_t_score(np.array([[e]]), np.zeros((1, 1)), np.zeros((1, 1)))[0])

    nu = STUDENT_T_DOF
    assert score(0.0) == 0.0
    for e in (0.1, 0.5):  # within a fraction of a standard deviation: about e^2 / 2
        assert score(e) == pytest.approx(0.5 * e * e, rel=0.1)
    # far out, each tenfold error adds about (nu + 1) log 100 / 2, not a hundredfold score
    step = 0.5 * (nu + 1) * math.log(100.0)
    assert score(1000.0) - score(100.0) == pytest.approx(step, rel=0.01)
    assert score(100.0) < 0.01 * 0.5 * 100.0**2
    # it sums over features and uses the predicted scale: e = (z - mean) / sigma
    both = student_t_score(np.array([[2.0, 6.0]]), np.array([[0.0, 2.0]]),
                           np.log(np.array([[1.0, 4.0]])))  # fmt: skip
    assert float(both[0]) == pytest.approx(2 * score(2.0))
