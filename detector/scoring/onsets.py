"""Onset marking: ``anomaly_score`` shows where an anomaly starts, not every step of it.

A step whose tail falls below ONSET_RED (one in a million) is an onset; the step after a
red one, and the ``hold_steps`` after an onset, show no more than ONSET_YELLOW (HTM's
likelihood filter), so one incident reads as one onset. A flagged value beyond the
stream's range (``Range``) is an onset too, shown at SPATIAL_TAIL. Alerts do not use it.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from detector.scoring.stats import F64, ColumnSpec, Mask

ONSET_RED: Final = 1e-6
ONSET_YELLOW: Final = 1e-3
SPATIAL_TAIL: Final = 1e-8  # what a value beyond anything seen shows (anomaly_score 0.5)


class Onsets:
    """Columns: the previous step's tail and the steps since the last onset shown."""

    def __init__(self, hold_steps: int) -> None:
        self.hold_steps = hold_steps

    @staticmethod
    def columns(f: int) -> dict[str, ColumnSpec]:
        return {"prev_tail": ((), np.float64, 1.0), "since_red": ((), np.int64, 2**40)}

    gap_reset: tuple[str, ...] = ()

    def step(self, cols: dict[str, np.ndarray], tail: F64, beyond: Mask, ok: Mask) -> F64:
        """The tail ``anomaly_score`` shows for this step; marks the onsets it shows."""
        prev, since = cols["prev_tail"], cols["since_red"]
        held = (prev <= ONSET_RED) | (since < self.hold_steps)
        shown = np.where(held, np.maximum(tail, ONSET_YELLOW), tail)
        free = ~held
        if beyond.any():
            shown = np.where(beyond & free, np.minimum(shown, SPATIAL_TAIL), shown)
        onset = ok & (shown <= ONSET_RED) & free
        if ok.all():  # the usual step: whole columns, no masks
            since += 1
            since[onset] = 0
            prev[...] = tail
        else:
            since[ok] += 1
            since[onset] = 0
            prev[ok] = tail[ok]
        out: F64 = shown
        return out
