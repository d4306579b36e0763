"""What the model is fed: each stream's values over its own spread, outliers held back.

The model is fed a stream's values over that spread (``InputScale.model_inputs``), so a
stream that comes to vary more than the training data did (a busier regime, a noisier
machine of a fleet) stops surprising the model at every step. ``learn`` moves the spread.

A value far from what the model predicted is fed no further out than where the per-step
check's tail starts for the stream (``within_tail``; TAIL_FROM of its error spreads, further
for a stream whose learnt tail is heavier, ``surprise.tail_bound``, so a routine jump is
followed as it comes): a one-sample outlier does not drag the model's level and state after
it, so the next sample is judged against what the stream was doing, not against the
outlier. A spike of several samples then shows in every one of them, not in its first and
its return.
Two in a row beyond the tail on one side are the process moving, and the model follows the
second as it is; so does a level shift or a mode change, one sample late. This is the
robust filter's cleaning of the observations (Masreliez 1975; Gelper, Fried and Croux 2010,
for exponential smoothing), with the per-step check's own bound and scale. What is scored is
always the value itself.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np

from detector.scoring.stats import (
    F64,
    ROBUST_CLIP,
    ColumnSpec,
    Mask,
    ewma_alpha,
    learn_mean_square,
)

# A stream's spread stays above a tenth of training's: a sensor parked at its training centre
# for months would otherwise make its next small move an enormous one to the model.
INPUT_VAR_FLOOR: Final = 1e-2


def learn_input_var(var: F64, z: np.ndarray, alpha: float, clip: float = ROBUST_CLIP) -> None:
    """One step of each stream's input spread, in place: an exponential mean square of its
    (training-normalised) values, each clipped at ``clip`` times the spread so far and
    rescaled by huber_consistency(clip), never below INPUT_VAR_FLOOR. Rows with a
    non-finite value do not move.

    >>> v = np.ones((1, 2)); learn_input_var(v, np.array([[0.0, 10.0]]), 0.5, 1.5)
    >>> [round(float(a), 4) for a in v[0]]
    [0.5, 1.9452]
    """
    z64 = np.asarray(z, np.float64)
    ok = np.isfinite(z64)
    if ok.all():
        learn_mean_square(var, z64 * z64, alpha, INPUT_VAR_FLOOR, clip)
    else:  # a step of 0 where the value is not finite
        sq, step = np.where(ok, z64 * z64, 0.0), np.where(ok, alpha, 0.0)
        learn_mean_square(var, sq, step, INPUT_VAR_FLOOR, clip)


class InputScale:
    """Column ``input_var`` [F]: the stream's mean square in training units (1 at start).
    ``window`` 0 turns the part off (the model sees training units only)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._alpha = ewma_alpha(window) if window else math.nan

    @staticmethod
    def columns(f: int) -> dict[str, ColumnSpec]:
        return {"input_var": ((f,), np.float32, 1.0)}  # a spread: float32 is ample

    def model_inputs(self, cols: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
        """``z`` (values normalised by the training statistics) over the stream's spread."""
        if not self.window:
            return z
        out: np.ndarray = z / np.sqrt(cols["input_var"])
        return out

    def learn(self, cols: dict[str, np.ndarray], z_train: np.ndarray) -> None:
        if self.window:
            learn_input_var(cols["input_var"], z_train, self._alpha)


def within_tail(
    z: np.ndarray, mean: np.ndarray, log_var: np.ndarray, error: np.ndarray,
    last: np.ndarray, bound: np.ndarray, rows: Mask,
) -> np.ndarray:  # fmt: skip
    """What the model is fed of ``z`` [B, F] (model units) on ``rows``: each value no further
    from the prediction (``mean``, ``log_var``) than ``bound`` of the model's spreads (the
    stream's tail's start, ``Scorer.model_feed``), unless the last standardised error
    (``last``) was beyond it on the same side too. ``error``: this step's standardised
    errors (``surprise.standardised_errors``). ``z`` itself where nothing is held back.

    >>> z, zero, three = np.array([[9.0, 9.0, -9.0, 1.0]]), np.zeros((1, 4)), np.full((1, 4), 3.0)
    >>> last = np.array([[0.0, 5.0, 5.0, 0.0]])
    >>> within_tail(z, zero, zero, z, last, three, np.ones(1, np.bool_)).tolist()
    [[3.0, 9.0, -3.0, 1.0]]
    """
    high, low = error > bound, error < -bound
    beyond = (high & ~(last > bound)) | (low & ~(last < -bound))
    beyond &= rows[:, None]
    if not beyond.any():  # the usual step
        return z
    reach = bound * np.exp(0.5 * log_var)
    held = np.where(high, mean + reach, mean - reach)
    out: np.ndarray = np.where(beyond, held, z)
    return out
