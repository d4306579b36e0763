"""Alerts: the per-stream state machine that turns a likelihood into raised and cleared.

A stream past its warm-up raises when its likelihood reaches ``threshold``, holds while the
anomaly lasts, and clears after ``clear_steps`` steps in a row with a calm likelihood (the
scorer's: its average's) below ``clear_threshold``. A step at which the likelihood is at
``threshold`` is not calm, whatever the average says: a signal that would raise says the
anomaly goes on (a stuck run or a departure, which raise once, hold nothing after their
raise). So two raises are at least ``clear_steps`` + 1 steps apart. Raised and cleared
alternate, and each raise starts a new episode number. Each feature's part of the raw score
is averaged like the alert's average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from detector.scoring.stats import F64, ColumnSpec, Mask, advance_average, ewma_alpha

ARMED: Final = np.iinfo(np.int16).max  # a raise_once column's initial value: armed


def raise_once(run: np.ndarray, tail: F64, level: float, calm: float, needed: int,
               ok: Mask) -> F64:  # fmt: skip
    """A signal whose departure lasts (a stuck run, a sensor off the others) raises once: the
    first step its ``tail`` falls below ``level`` may raise, later ones may not until the
    departure has ended as an alert clears, with the tail above ``calm`` for ``needed``
    samples in a row. So a machine left in a new state after an incident does not raise
    again and again, nor each time its tail touches calm on the way. ``run`` [B] (an int16
    column per signal, initially ARMED) counts the calm samples since the last raise; the
    signal may raise once it reaches ``needed``. It is updated on the rows in ``ok``.
    Returns the tail the alert may use (held above ``level`` where it may not raise).

    >>> run, ok = np.full(1, ARMED, np.int16), np.ones(1, np.bool_)
    >>> [float(raise_once(run, np.array([t]), 1e-8, 0.01, 2, ok)[0]) > 1e-8
    ...  for t in (0.5, 1e-9, 1e-9, 0.5, 1e-9, 0.5, 0.5, 1e-9)]
    [True, False, True, True, True, True, True, False]
    """
    armed = run >= needed
    if armed.all():  # the usual step: a raise disarms, nothing else changes
        if ok.all():
            run[tail < level] = 0
        else:
            run[ok & (tail < level)] = 0
        return tail
    out: F64 = np.where(armed, tail, np.maximum(tail, 2.0 * level))
    counted = np.where(tail > calm, run + 1, 0)  # a disarmed signal counts its calm run
    after = np.where(armed, np.where(tail < level, 0, run), counted)
    run[ok] = after[ok]
    return out


@dataclass
class AlertSteps:
    raised: Mask
    cleared: Mask
    updated: Mask  # periodic "still active" events
    active: Mask  # after this step
    episode: npt.NDArray[np.int64]
    contributions: F64  # [B, F] each feature's part of the alert's average (NaN: none yet)


class Alerts:
    """Columns: whether an alert is active, its calm steps, the episode count, the steps
    since the raise, and each feature's averaged part of the score."""

    def __init__(
        self,
        threshold: float,
        clear_threshold: float,
        clear_steps: int,
        update_every_steps: int,
        parts_window: int,
    ) -> None:
        self.threshold = threshold
        self.clear_threshold = clear_threshold
        self.clear_steps = clear_steps
        self.update_every_steps = update_every_steps
        self._alpha_parts = ewma_alpha(parts_window)

    @staticmethod
    def columns(f: int) -> dict[str, ColumnSpec]:
        return {
            "active": ((), np.bool_, 0),
            "below": ((), np.int32, 0),
            "episodes": ((), np.int64, 0),
            "active_steps": ((), np.int64, 0),
            "alert_parts": ((f,), np.float32, math.nan),  # which sensors: float32 is ample
        }

    gap_reset = ("alert_parts",)

    def step(
        self,
        cols: dict[str, np.ndarray],
        likelihood: F64,
        calm_likelihood: F64,
        parts: F64,
        ok: Mask,
        eligible: Mask,
        count: np.ndarray,
    ) -> AlertSteps:
        """One step: ``likelihood`` raises (and holds), ``calm_likelihood`` (that of the
        signals that last) clears; ``count``: the values already in each stream's averages
        (the parts are averaged like them)."""
        advance_average(cols["alert_parts"], parts, ok, self._alpha_parts, count)
        contributions: F64 = cols["alert_parts"].astype(np.float64)
        if not ok.all():
            contributions[~ok] = np.nan
        active, below = cols["active"], cols["below"]
        above = eligible & (likelihood >= self.threshold)
        raised = above & ~active
        calm = active & ok & (calm_likelihood < self.clear_threshold) & ~above
        below[:] = np.where(calm, below + 1, np.where(active, 0, below))
        cleared = active & (below >= self.clear_steps)
        any_raised = bool(raised.any())
        if any_raised:
            cols["episodes"][raised] += 1
        steps_on = cols["active_steps"]
        steps_on[active & ok] += 1
        updated = np.zeros_like(raised)
        if self.update_every_steps:
            updated = active & ~cleared & ok & (steps_on % self.update_every_steps == 0)
        if any_raised or cleared.any():
            active[:] = (active | raised) & ~cleared
            changed = raised | cleared
            below[changed] = 0
            steps_on[changed] = 0
        return AlertSteps(raised, cleared, updated, active.copy(), cols["episodes"].copy(),
                          contributions)  # fmt: skip
