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


# --- errors that are not white: the innovations ---
#
# A network that follows its last input a little too far makes errors e_t = n_t - G n_(t-1)
# (n white): their lag-one autocorrelation is -G / (1 + G^2).
G = 0.8


def ma1_errors(steps: int, seed: int) -> np.ndarray:
    n = np.random.default_rng(seed).standard_normal((steps + 1, 2))
    return (n[1:] - G * n[:-1]) / math.sqrt(1.0 + G * G)  # unit variance, like calibrated errors


def lag_one(x: np.ndarray) -> float:
    x = x - x.mean()
    return float((x[1:] * x[:-1]).mean() / x.var())


def test_error_lag_measures_the_errors_lag_one_autocorrelation() -> None:
    from detector.scoring.surprise import MAX_ERROR_LAG, error_lag

    e = ma1_errors(40_000, seed=1)
    expected = -G / (1.0 + G * G)
    # pooled over streams; a missing error (NaN) breaks the pairs on either side of it
    halves = [e[:20_000].copy(), e[20_000:]]
    halves[0][100] = np.nan
    for got in error_lag(halves):
        assert got == pytest.approx(expected, abs=0.02)
    assert error_lag([np.random.default_rng(2).standard_normal((20_000, 1))])[0] == pytest.approx(
        0.0, abs=0.02
    )
    steady = np.ones((100, 1))  # a bound keeps 1 / sqrt(1 - rho^2) finite
    assert error_lag([steady]) == [MAX_ERROR_LAG]


def test_the_innovations_are_as_wide_as_the_errors_and_nearly_white() -> None:
    from detector.scoring.surprise import error_lag, whiten

    e = ma1_errors(40_000, seed=3)
    lag = np.asarray(error_lag([e]))
    w = whiten(e[1:], e[:-1], lag)
    for f in range(2):
        assert w[:, f].var() == pytest.approx(e[:, f].var(), rel=0.03)
        # what an AR(1) filter leaves of an MA(1): rho^3 / (1 - rho^2), about -0.15
        assert abs(lag_one(w[:, f])) < 0.2 < abs(lag_one(e[:, f]))


def test_the_surprise_weighs_each_error_less_what_the_last_one_foretold() -> None:
    from detector.scoring.surprise import Surprise

    lag = [-0.5, 0.0]
    part = Surprise("student_t", lag)
    specs = part.columns(2).items()
    cols = {k: np.full((1, *shape), fill, dtype) for k, (shape, dtype, fill) in specs}
    zero, yes, no = np.zeros((1, 2)), np.ones(1, bool), np.zeros(1, bool)
    # the first prediction has no last error: taken as it is
    first = part.score(cols, np.array([[2.0, 2.0]]), zero, zero, yes)
    np.testing.assert_allclose(first.innovations, [[2.0, 2.0]])
    np.testing.assert_allclose(cols["error_last"], [[2.0, 2.0]])
    # a spike after an error of 2: half of it foretold the other way, at the same spread
    spike = part.score(cols, np.array([[6.0, 6.0]]), zero, zero, yes)
    np.testing.assert_allclose(spike.innovations, [[(6.0 + 1.0) / math.sqrt(0.75), 6.0]])
    # the errors, their raw score and the error kept stay as they are
    np.testing.assert_allclose(spike.std_errors, [[6.0, 6.0]])
    assert float(spike.raw[0]) == pytest.approx(2 * _t_part(6.0))
    np.testing.assert_allclose(cols["error_last"], [[6.0, 6.0]])
    # a step without a prediction forgets the last error
    gone = part.score(cols, np.array([[1.0, 1.0]]), zero, zero, no)
    assert np.isnan(gone.innovations).all() and np.isnan(cols["error_last"]).all()
    # a model file without the lag (or with none) takes the errors as they come
    plain = Surprise("student_t", None)
    assert plain.lag is None and Surprise("student_t", [0.0, 0.0]).lag is None
    out = plain.score(cols, np.array([[6.0, 6.0]]), zero, zero, yes)
    np.testing.assert_allclose(out.innovations, [[6.0, 6.0]])


def _t_part(e: float) -> float:
    from detector.scoring import STUDENT_T_DOF

    return 0.5 * (STUDENT_T_DOF + 1.0) * math.log1p(e * e / STUDENT_T_DOF)


# --- the pair: two errors in a row ---


def test_a_pair_of_errors_is_as_wide_as_one() -> None:
    """(e_t + e_(t-1)) / sqrt(2 (1 + rho)) has unit spread for errors of unit spread and
    lag-one autocorrelation rho, whatever rho's sign."""
    from detector.scoring.surprise import error_lag, error_pairs

    for e in (ma1_errors(40_000, seed=5), np.random.default_rng(6).standard_normal((40_000, 2))):
        pairs = error_pairs(e[1:], e[:-1], np.asarray(error_lag([e])))
        for f in range(2):
            assert pairs[:, f].var() == pytest.approx(1.0, rel=0.03)


def test_the_surprise_pairs_each_error_with_the_last() -> None:
    from detector.scoring.surprise import Surprise

    for lag, rho in (([-0.5, 0.0], np.array([-0.5, 0.0])), (None, np.zeros(2))):
        part = Surprise("student_t", lag)
        specs = part.columns(2).items()
        cols = {k: np.full((1, *shape), fill, dtype) for k, (shape, dtype, fill) in specs}
        zero, yes, no = np.zeros((1, 2)), np.ones(1, bool), np.zeros(1, bool)
        first = part.score(cols, np.array([[2.0, 2.0]]), zero, zero, yes)
        assert np.isnan(first.pairs).all()  # no last error to pair with
        second = part.score(cols, np.array([[4.0, -1.0]]), zero, zero, yes)
        expected = np.array([6.0, 1.0]) / np.sqrt(2.0 * (1.0 + rho))
        np.testing.assert_allclose(second.pairs[0], expected)
        part.score(cols, np.array([[1.0, 1.0]]), zero, zero, no)  # no prediction: forgotten
        after = part.score(cols, np.array([[4.0, 4.0]]), zero, zero, yes)
        assert np.isnan(after.pairs).all()
