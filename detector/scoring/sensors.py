"""What a one-step predictor cannot see: a stuck sensor, and a value beyond all seen.

A stuck sensor repeats its last reading, and a model that predicts the next step from
the last one finds nothing wrong with that. ``Stuck`` learns how often each sensor of a
stream repeats itself and returns how unlikely the current run of repeats is. ``Range``
flags a value beyond everything the stream showed before (HTM's spatial check).

Both keep scoring (``score``) apart from learning (``learn``), and work on the values
in training units, where equal readings stay equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from detector.scoring.alerts import ARMED
from detector.scoring.stats import (
    F64,
    ColumnSpec,
    Mask,
    row_any,
    row_min,
)


@dataclass(frozen=True)
class StuckStep:
    """What ``Stuck.score`` found at one step, for ``Stuck.learn``."""

    tail: F64  # [B] each stream's tail
    seen: Mask  # [B] rows compared with a last value
    ended: Mask | None  # [B, F] runs this step ended (None: no run was open)
    lengths: np.ndarray | None  # those runs' lengths


class Stuck:
    """Columns per feature: the last value, the current run of exact repeats, the log
    probability of that run, and the stream's (fading) counts of repeats and comparisons.

    The chance that a sensor repeats itself is unknown: a Beta(1, 1) prior updated by the
    stream's own counts, forgotten over ``long_window`` steps. A run of r repeats then has
    probability prod_{i<r} (a + i) / (a + b + i), the Beta-binomial chance that r steps
    in a row repeat. A continuous sensor that never repeated in a thousand steps is stuck
    after three or four repeats; a coarse one that often repeats needs a long run. The
    stream's tail is the smallest over its features, times their number (Bonferroni).

    Two different steps seen, then three repeats: 1/4, then 1/4 * 2/5, then * 3/6.

    >>> s = Stuck(1000)
    >>> cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in s.columns(1).items()}
    >>> ok = np.ones(1, np.bool_)
    >>> def step(v):
    ...     scored = s.score(cols, np.array([[v]]), ok)
    ...     s.learn(cols, scored)
    ...     return round(float(scored.tail[0]), 4)
    >>> [step(v) for v in [1, 2, 3, 3, 3, 3]]
    [1.0, 1.0, 1.0, 0.25, 0.1, 0.05]
    """

    def __init__(self, long_window: int) -> None:
        self.long_window = long_window

    @staticmethod
    def columns(f: int) -> dict[str, ColumnSpec]:
        # float32 where counts and log chances need no more; the last value stays exact
        return {
            "last_value": ((f,), np.float64, math.nan),
            "repeat_run": ((f,), np.float32, 0.0),
            "repeat_logp": ((f,), np.float32, 0.0),
            "repeats": ((f,), np.float32, 0.0),
            "compared": ((), np.float32, 0.0),
            "stuck_armed": ((), np.int16, ARMED),  # calm samples since the last raise
            # (alerts.raise_once)
        }

    gap_reset = ("last_value", "repeat_run", "repeat_logp", "stuck_armed")

    @staticmethod
    def tail(cols: dict[str, np.ndarray]) -> F64:
        """Each stream's tail: its least likely run, times its number of features."""
        logp = cols["repeat_logp"]
        if not logp.any():  # no run anywhere: every tail is 1, in the column's dtype
            ones: F64 = np.ones(len(logp), logp.dtype)
            return ones
        out: F64 = np.minimum(1.0, logp.shape[-1] * np.exp(row_min(logp)))
        return out

    def score(self, cols: dict[str, np.ndarray], z: np.ndarray, ok: Mask) -> StuckStep:
        """Score one step of the streams in ``ok``: extend each sensor's run of repeats by a
        repeat (its chance under the counts so far), end the runs a new value ends. Returns
        each stream's tail, and what ``learn`` takes from the step."""
        x = np.asarray(z, np.float64)
        last, run, logp = cols["last_value"], cols["repeat_run"], cols["repeat_logp"]
        seen = ok & ~np.isnan(last[:, 0])  # a row's values are set together
        same = seen[:, None] & (x == last)
        in_run = run > 0
        if same.any():
            # The counts from before the current run are the Beta posterior's; a repeat
            # extends the run by one more chance (a + r) / (a + b + r).
            at = np.nonzero(same)
            repeats = cols["repeats"][at]
            a = repeats + 1.0
            b = np.maximum(cols["compared"][at[0]] - repeats - run[at], 0.0) + 1.0
            logp[at] += np.log((a + run[at]) / (a + b + run[at]))
            run[same] += 1.0  # (a run that ended below is not among them)
        ended: Mask | None = None
        lengths = None
        if in_run.any():
            ended = in_run & ok[:, None] & ~same
            lengths = run[ended]  # (a copy: what learn adds to the counts)
            logp[ended] = 0.0
            run[ended] = 0.0
        if ok.all():
            last[...] = x
        else:
            last[ok] = x[ok]
        return StuckStep(self.tail(cols), seen, ended, lengths)

    def learn(self, cols: dict[str, np.ndarray], step: StuckStep) -> None:
        """Learn from a scored step: a run teaches the counts once it is over, and every
        comparison counts; the counts fade over long_window steps, so a sensor's habits may
        change."""
        repeats, compared, seen = cols["repeats"], cols["compared"], step.seen
        if step.ended is not None:
            repeats[step.ended] += step.lengths
        full = seen & (compared >= self.long_window)
        if full.any():
            repeats[full] *= 1.0 - 1.0 / self.long_window
        if seen.all():  # the usual step: whole columns, no copies
            np.minimum(compared + 1.0, self.long_window, out=compared)
        else:
            compared[seen] = np.minimum(compared[seen] + 1.0, self.long_window)


class Range:
    """Columns per feature: the smallest and largest value seen. A value beyond that range
    by more than ``tolerance`` of its width (any feature) is flagged; then the range takes
    it in. A negative tolerance turns the check off."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance

    @staticmethod
    def columns(f: int) -> dict[str, ColumnSpec]:
        return {"seen_min": ((f,), np.float64, math.inf), "seen_max": ((f,), np.float64, -math.inf)}

    gap_reset: tuple[str, ...] = ()

    def score(self, cols: dict[str, np.ndarray], z: np.ndarray, eligible: Mask) -> Mask:
        """Which of the ``eligible`` streams have a value beyond their range so far."""
        if self.tolerance < 0:
            return np.zeros(len(eligible), np.bool_)
        x = np.asarray(z, np.float64)
        lo, hi = cols["seen_min"], cols["seen_max"]
        with np.errstate(invalid="ignore"):  # inf - inf, 0 * inf before any value was seen
            width = hi - lo  # -inf or NaN until a value was seen, 0 after one: cannot flag
            margin = self.tolerance * width
            beyond = (width > 0) & ((x > hi + margin) | (x < lo - margin))
        out: Mask = eligible & row_any(beyond)
        return out

    def learn(self, cols: dict[str, np.ndarray], z: np.ndarray) -> None:
        """Widen each range to take in the values (NaN: none)."""
        if self.tolerance < 0:
            return
        x = np.asarray(z, np.float64)
        lo, hi = cols["seen_min"], cols["seen_max"]
        finite = np.isfinite(x)
        if finite.all():
            np.minimum(lo, x, out=lo)
            np.maximum(hi, x, out=hi)
        else:
            np.minimum(lo, np.where(finite, x, np.inf), out=lo)
            np.maximum(hi, np.where(finite, x, -np.inf), out=hi)
