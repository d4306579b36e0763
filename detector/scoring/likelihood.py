"""Likelihood: how far a stream's recent surprise lies in the tail of its own history.

Per stream, an exponential average of the raw score over ``window`` steps, and the
long-run mean and variance of that average (HTM's anomaly likelihood). The model's
calibration is the prior, counted as :func:`prior_steps` of the stream's own: the stream moves
from the calibration to its own statistics as its evidence grows.

``score`` advances the average and returns its tail against the statistics *before* this
step; ``learn`` moves the statistics, so the caller decides which steps teach them.
"""

from __future__ import annotations

import math

import numpy as np

from detector.scoring.calibration import Calibration
from detector.scoring.stats import (
    F64,
    Mask,
    advance_average,
    average_var_share,
    ewma_alpha,
    ewma_var_share,
    gaussian_tail,
    student_tail,
)


def prior_variance(calibration: Calibration, window: int) -> float:
    """The calibration's spread of its short average, moved to an average over ``window``
    steps (for independent scores an exponential average's variance is var * a / (2 - a)).

    >>> cal = Calibration(100, 1.0, 1.0, {}, 20, 1.0, 0.5, 0.9999)
    >>> round(prior_variance(cal, 20), 6), prior_variance(cal, 50) < prior_variance(cal, 20)
    (0.25, True)
    """
    share = ewma_var_share(window) / ewma_var_share(calibration.window)
    return float(calibration.window_std) ** 2 * share


def prior_steps(calibration: Calibration, long_window: int) -> float:
    """How many of a stream's own steps the calibration counts as: the steps whose mean pins
    a stream's level as closely as the calibration does, (std^2 - level_std^2) /
    level_std^2 (a level drawn from a population of spread level_std, steps of spread
    std). A calibration of one stream describes that stream: a full memory, ``long_window``.

    >>> fleet = Calibration(100, 2.0, 1.0, {}, 20, 2.0, 0.5, 0.9999, "student_t", 0.1)
    >>> one = Calibration(100, 2.0, 1.0, {}, 20, 2.0, 0.5, 0.9999, "student_t", 0.0)
    >>> round(prior_steps(fleet, 8000), 6), prior_steps(one, 8000)
    (99.0, 8000.0)
    """
    tau2 = float(calibration.level_std) ** 2
    within = float(calibration.std) ** 2 - tau2
    if tau2 <= 0.0 or within <= 0.0:
        return float(long_window)
    return float(min(max(within / tau2, 1.0), long_window))


class Likelihood:
    """Columns: the average and its long-run mean and variance, named by ``names``.

    The model's calibration is their prior, counted as ``prior_steps`` of the stream's own;
    each step moves them by 1 / evidence, up to ``long_window``.
    """

    def __init__(
        self,
        names: tuple[str, str, str],
        window: int,
        calibration: Calibration,
        long_window: int,
        prior_steps: float,
    ) -> None:
        self.names = names
        self.window = window
        self.long_window = long_window
        self.prior_mean = float(calibration.window_mean)
        self.prior_var = prior_variance(calibration, window)
        self.prior_steps = prior_steps
        self.level_var = float(calibration.level_std) ** 2
        # the level spread's degrees of freedom: its streams less one (unrecorded: many)
        streams = int(calibration.level_streams)
        self.level_dof = float(streams - 1) if streams > 1 else math.inf
        self._alpha = ewma_alpha(window)
        self._share = ewma_var_share(window)

    def score(
        self, cols: dict[str, np.ndarray], raw: F64, ok: Mask, count: np.ndarray
    ) -> tuple[F64, F64]:
        """The tail of this step's average, and its deviation from the long-run mean.
        ``count`` [B]: the values already in each average (the steps since it started); an
        average of fewer values than its window spreads more, and its tail says so."""
        avg, lm, lv = (cols[name] for name in self.names)
        advance_average(avg, raw, ok, self._alpha, count)
        fresh = ok & np.isnan(lm)
        if fresh.any():
            lm[fresh] = self.prior_mean
            lv[fresh] = self.prior_var
        delta: F64 = avg - lm
        young = average_var_share(self.window, count + 1) / self._share
        var = lv * young
        if self.level_var <= 0.0:
            return gaussian_tail(delta / np.sqrt(np.maximum(var, 1e-12))), delta
        # A new stream's own level is known as well as its evidence says: the calibration's
        # spread of levels, shrinking as the stream's steps add to the prior's. That spread
        # was measured on a few streams, so the level's part is a Student t of their number
        # less one; the sum's degrees of freedom are Welch-Satterthwaite's.
        level = self.level_var * self.prior_steps / (self.prior_steps + cols["n_scored"])
        total = np.maximum(var + level, 1e-12)
        dof = self.level_dof * (total / level) ** 2
        return student_tail(delta / np.sqrt(total), dof), delta

    def learn(self, cols: dict[str, np.ndarray], learn: Mask, delta: F64, n: np.ndarray) -> None:
        """Move the long-run mean and variance towards this step's average: the step size
        shrinks like 1 / evidence, so the prior fades as the stream's own steps add up."""
        _, lm, lv = (cols[name] for name in self.names)
        every = bool(learn.all())  # the usual step: whole columns, no copies
        rows = slice(None) if every else learn
        alpha = 1.0 / np.minimum(self.prior_steps + n[rows] + 1.0, float(self.long_window))
        d = delta[rows]
        if every:
            lm += alpha * d
            lv[...] = (1.0 - alpha) * (lv + alpha * d * d)
        else:
            lm[learn] += alpha * d
            lv[learn] = (1.0 - alpha) * (lv[learn] + alpha * d * d)
