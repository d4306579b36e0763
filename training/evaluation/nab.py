"""NAB scoring (Lavin & Ahmad 2015) in numpy: the application profiles, the scaled sigmoid
reward by position in a window, one file at one threshold (the definition), and the corpus
score at the threshold optimised over every file (an exact sweep of the breakpoints),
normalised between the null and the perfect detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

Event = tuple[int, int]  # first and last row of a labelled event, inclusive


@dataclass(frozen=True)
class Profile:
    """Weights of an application profile (published table): each a cost or reward magnitude."""

    name: str
    a_tp: float
    a_fp: float
    a_fn: float
    a_tn: float = 1.0  # in the table, unused by the score


PROFILES: Final = {
    p.name: p
    for p in (
        Profile("standard", a_tp=1.0, a_fp=0.11, a_fn=1.0),
        Profile("reward_low_FP_rate", a_tp=1.0, a_fp=0.22, a_fn=1.0),
        Profile("reward_low_FN_rate", a_tp=1.0, a_fp=0.11, a_fn=2.0),
    )
}
SIGMOID_CUTOFF: Final = 3.0  # beyond 3 window widths sigma is within 1e-6 of -1: taken as -1
NAB_PROBATION_FRACTION: Final = 0.15
NAB_PROBATION_MAX_ROWS: Final = 750


def scaled_sigmoid(y: float | np.ndarray) -> np.ndarray:
    """NAB's reward by relative position ``y``: 2 / (1 + e^(5y)) - 1, and -1 past the cutoff.

    y = -1 is a window's first row, y ~ 0 its last; y > 0 lies after the window.

    >>> [round(float(v), 4) for v in scaled_sigmoid(np.array([-1.0, 0.0, 0.5, 4.0]))]
    [0.9866, 0.0, -0.8483, -1.0]
    """
    y = np.asarray(y, dtype=np.float64)
    out: np.ndarray = 2.0 / (1.0 + np.exp(np.minimum(5.0 * y, 50.0))) - 1.0
    return np.where(y > SIGMOID_CUTOFF, -1.0, out)


def nab_probation_rows(rows: int) -> int:
    """NAB's probationary period, whose detections are not scored: min(floor(0.15 n), 750).

    >>> nab_probation_rows(4032), nab_probation_rows(1000)
    (604, 150)
    """
    return min(math.floor(NAB_PROBATION_FRACTION * rows), NAB_PROBATION_MAX_ROWS)


def window_position(row: int, event: Event) -> float:
    """Relative position of ``row`` w.r.t. the right end of ``event`` (width w rows).

    Inside: -(last - row + 1) / w, from -1 at the first row to -1/w at the last;
    after it: (row - last) / w.

    >>> window_position(10, (10, 19)), window_position(19, (10, 19)), window_position(24, (10, 19))
    (-1.0, -0.1, 0.5)
    """
    first, last = event
    width = last - first + 1
    return (row - last) / width if row > last else -(last - row + 1) / width


def _no_nan(score: np.ndarray) -> np.ndarray:
    """A float copy of ``score`` in which a row never scored (NaN) can never be a detection."""
    s = np.array(score, dtype=np.float64)
    s[np.isnan(s)] = -np.inf
    return s


@dataclass(frozen=True)
class NabCounts:
    """One threshold's outcome on one file or a corpus."""

    raw: float
    tp: int  # windows detected (their first detection is scored)
    fp: int  # detections outside every window
    fn: int  # windows without a detection


def nab_file_score(
    score: np.ndarray,
    events: tuple[Event, ...],
    threshold: float,
    profile: Profile,
    probation_rows: int = 0,
) -> NabCounts:
    """Score one file at one threshold, row by row (the definition; the sweep must agree).

    Detections are rows with ``score >= threshold`` from row ``probation_rows`` on. In
    each window only the first counts: A_TP * sigma(y). A window with none costs A_FN.
    A detection outside windows costs A_FP * -sigma(y) w.r.t. the last window before it,
    or A_FP when no window came before.

    >>> nab_file_score(np.array([0, 0, 1, 1, 0, 0, 0, 0.0]), ((2, 3),), 0.5, PROFILES["standard"])
    NabCounts(raw=0.9866142981514305, tp=1, fp=0, fn=0)
    """
    hits = np.flatnonzero(_no_nan(score) >= threshold)
    hits = hits[hits >= probation_rows]
    raw, tp, fn = 0.0, 0, 0
    inside = np.zeros(len(score), np.bool_)
    for event in events:
        inside[event[0] : event[1] + 1] = True
        found = hits[(hits >= event[0]) & (hits <= event[1])]
        if len(found):
            raw += profile.a_tp * float(scaled_sigmoid(window_position(int(found[0]), event)))
            tp += 1
        else:
            raw -= profile.a_fn
            fn += 1
    outside = hits[~inside[hits]]
    ends = np.array([last for _, last in events], dtype=np.int64)
    for row in outside:
        before = int(np.searchsorted(ends, row)) - 1  # the last window ending before row
        unit = (
            float(scaled_sigmoid(window_position(int(row), events[before])))
            if before >= 0
            else -1.0
        )
        raw += profile.a_fp * unit
    return NabCounts(raw, tp, len(outside), fn)


def _nab_sweep_terms(
    score: np.ndarray, events: tuple[Event, ...], probation_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints of one file's score as a function of the threshold.

    The score at threshold t is -A_FN * windows plus the sum of every term whose value is
    >= t, a term being (A_FP, A_TP, A_FN) . units. Outside windows each scored row is a
    term (its FP unit). In a window the first detection is the first row whose prefix
    maximum reaches t, so each new prefix maximum (a record) is a term carrying the change
    of reward when the threshold drops to it; the highest record also undoes the FN.
    Returns values [K] and units [K, 5] = (fp, tp, fn, tp count, fp count).
    """
    s = _no_nan(score)
    s[:probation_rows] = -np.inf
    inside = np.zeros(len(s), np.bool_)
    values: list[np.ndarray] = []
    units: list[np.ndarray] = []
    for event in events:
        first, last = event
        inside[first : last + 1] = True
        seg = s[first : last + 1]
        best = np.maximum.accumulate(seg)
        previous = np.concatenate(([-np.inf], best[:-1]))
        records = np.flatnonzero(seg > previous)
        if not len(records):
            continue
        reward = scaled_sigmoid(-(last - first - records + 1) / (last - first + 1))
        delta = reward - np.append(reward[1:], 0.0)  # a record replaces the later one's reward
        u = np.zeros((len(records), 5))
        u[:, 1] = delta
        u[-1, 2] = 1.0  # the window is detected from the highest record down
        u[-1, 3] = 1.0
        values.append(seg[records])
        units.append(u)
    rows = np.flatnonzero(~inside & (s > -np.inf))
    if len(rows):
        ends = np.array([last for _, last in events], dtype=np.int64)
        widths = ends - np.array([first for first, _ in events], dtype=np.int64) + 1
        before = np.searchsorted(ends, rows) - 1  # the last window ending before each row
        fp = np.full(len(rows), -1.0)
        after = before >= 0
        b = before[after]
        fp[after] = scaled_sigmoid((rows[after] - ends[b]) / widths[b])  # window_position
        u = np.zeros((len(rows), 5))
        u[:, 0] = fp
        u[:, 4] = 1.0
        values.append(s[rows])
        units.append(u)
    if not values:
        return np.zeros(0), np.zeros((0, 5))
    return np.concatenate(values), np.concatenate(units)


@dataclass(frozen=True)
class NabResult:
    """A profile's corpus score at its optimised threshold."""

    profile: str
    threshold: float  # detections are rows with anomaly_score >= threshold (inf: none)
    raw: float
    null: float  # the detector that flags nothing
    perfect: float
    normalised: float  # 100 (raw - null) / (perfect - null); NaN without windows
    tp: int
    fp: int
    fn: int


def nab_corpus(
    files: list[tuple[np.ndarray, tuple[Event, ...], int]],
    profile: Profile,
    perfect: str = "windows",
) -> NabResult:
    """Optimise one threshold for ``profile`` over (score, events, probation_rows) files.

    Every distinct score value is tried (exactly, by one sort of the breakpoints), plus
    "no detection"; the highest threshold among equal best raw scores wins. ``perfect``:
    "windows" counts A_TP per window as NAB's published normalisation (and the dataset
    README) do; "first_row" is a detector flagging each window's first row, A_TP * sigma(-1).
    """
    if perfect not in ("windows", "first_row"):
        raise ValueError(f"perfect must be 'windows' or 'first_row', not {perfect!r}")
    n_windows = sum(len(events) for _, events, _ in files)
    terms = [_nab_sweep_terms(s, e, p) for s, e, p in files]
    values = np.concatenate([v for v, _ in terms]) if terms else np.zeros(0)
    units = np.concatenate([u for _, u in terms]) if terms else np.zeros((0, 5))
    weights = np.array([profile.a_fp, profile.a_tp, profile.a_fn])
    order = np.argsort(-values, kind="stable")
    values, units = values[order], units[order]
    null = -profile.a_fn * n_windows
    running = null + np.cumsum(units[:, :3] @ weights)
    counts = np.cumsum(units[:, 3:], axis=0)
    # The score at threshold t includes every term >= t: the last of each run of equal values.
    last = (
        np.flatnonzero(np.append(values[1:] != values[:-1], True))
        if len(values)
        else np.zeros(0, np.int64)
    )
    raws = np.concatenate(([null], running[last]))
    pick = int(np.argmax(raws))  # the first maximum: the highest threshold
    raw, threshold, tp, fp = null, math.inf, 0, 0
    if pick:
        i = last[pick - 1]
        raw, threshold = float(running[i]), float(values[i])
        tp, fp = int(counts[i, 0]), int(counts[i, 1])
    top = profile.a_tp * (1.0 if perfect == "windows" else float(scaled_sigmoid(-1.0)))
    best = top * n_windows
    normalised = 100.0 * (raw - null) / (best - null) if n_windows else math.nan
    return NabResult(profile.name, threshold, raw, null, best, normalised, tp, fp, n_windows - tp)
