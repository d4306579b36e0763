"""detector.scoring.stats: tails, averages and the Huber factor against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.scoring import (
    ewma_alpha,
    gaussian_tail,
    huber_consistency,
    short_average,
)
from detector.scoring.stats import student_tail


def test_gaussian_tail_against_erfc_over_a_grid() -> None:
    grid = np.linspace(-8.0, 8.0, 3201)
    got = gaussian_tail(grid)
    for z, q in zip(grid.tolist(), got.tolist(), strict=True):
        exact = 0.5 * math.erfc(z / math.sqrt(2.0))
        assert abs(q - exact) <= 1e-6 * exact, (z, q, exact)


@pytest.mark.parametrize("z", [-8.0, -3.0, -0.5, 0.0, 0.5, 3.0, 5.0, 8.0])
def test_gaussian_tail_named_points(z: float) -> None:
    exact = 0.5 * math.erfc(z / math.sqrt(2.0))
    assert float(gaussian_tail(np.array([z]))[0]) == pytest.approx(exact, rel=1e-6)


def test_gaussian_tail_far_tails_stay_in_range_and_monotone() -> None:
    z = np.linspace(-40.0, 40.0, 2001)
    q = gaussian_tail(z)
    assert np.all((q >= 0.0) & (q <= 1.0))
    assert np.all(np.diff(q) <= 0.0)
    assert float(q[0]) == 1.0
    assert float(gaussian_tail(np.array([12.0]))[0]) > 0.0  # no underflow yet at 12 sigma


def test_gaussian_tail_is_symmetric() -> None:
    z = np.linspace(0.1, 6.0, 60)
    np.testing.assert_allclose(gaussian_tail(-z), 1.0 - gaussian_tail(z), rtol=1e-12)
    # At 0 both sides come from the same fitted value: symmetric to the fit's accuracy.
    assert float(gaussian_tail(np.array([0.0]))[0]) == pytest.approx(0.5, rel=1e-7)


@pytest.mark.parametrize(
    ("t", "dof", "tail"),  # Student t tables: the 2.5 % and 0.05 % points
    [(2.228, 10, 0.025), (2.086, 20, 0.025), (4.587, 10, 0.0005), (3.850, 20, 0.0005)],
)
def test_student_tail_named_points(t: float, dof: float, tail: float) -> None:
    assert float(student_tail(np.array([t]), dof)[0]) == pytest.approx(tail, rel=0.03)
    assert float(student_tail(np.array([-t]), dof)[0]) == pytest.approx(1.0 - tail, rel=1e-3)


def test_student_tail_is_heavier_with_fewer_degrees_and_gaussian_with_many() -> None:
    t = np.full(4, 5.0)
    tails = student_tail(t, np.array([3.0, 10.0, 100.0, np.inf]))
    assert np.all(np.diff(tails) < 0)
    assert float(tails[3]) == float(gaussian_tail(np.array([5.0]))[0])


def test_ewma_alpha() -> None:
    assert ewma_alpha(1) == 1.0
    assert ewma_alpha(3) == 0.5
    assert ewma_alpha(9) == pytest.approx(0.2)


@pytest.mark.parametrize("window", [1, 2, 5, 30])
def test_short_average_matches_a_hand_loop(window: int) -> None:
    rng = np.random.default_rng(window)
    raw = rng.normal(3.0, 2.0, size=50)
    alpha = 2.0 / (window + 1.0)
    expected = [raw[0]]
    for i, value in enumerate(raw[1:], start=2):  # a plain mean of the first values
        step = max(alpha, 1.0 / i)
        expected.append(expected[-1] * (1.0 - step) + step * value)
    np.testing.assert_allclose(short_average(raw, window), expected, rtol=1e-12)


def test_huber_consistency_matches_a_numerical_integral() -> None:
    u = np.linspace(-12.0, 12.0, 240_001)
    density = np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    for clip in (0.5, 1.5, 3.0):
        integral = float(np.sum(np.minimum(u * u, clip * clip) * density) * (u[1] - u[0]))
        assert huber_consistency(clip) == pytest.approx(integral, abs=1e-6)
