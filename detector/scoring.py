"""Scoring core: pure numpy over a batch of streams, no I/O, no metrics.

One step of B streams: the raw score of x_t (Student-t or Gaussian surprise under
the prediction made at t-1), an anomaly score that adapts to each stream (its
long-run distribution of the short-term average raw score, through the Gaussian
tail, with the artifact's calibration as prior), the alert's likelihood in [0, 1]
from a longer average of the same score (``alert_window``), and the alert state
machine (warm-up, raise, hold, hysteresis clear, minimum interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from detector.artifact import Calibration

F64 = npt.NDArray[np.float64]
LOG_2PI: Final = math.log(2.0 * math.pi)


def gaussian_nll(z: np.ndarray, mean: np.ndarray, log_var: np.ndarray) -> F64:
    """Negative log-likelihood of each row of ``z`` under independent Gaussians.

    >>> float(gaussian_nll(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)))[0]) == LOG_2PI
    True
    """
    z64 = np.asarray(z, dtype=np.float64)
    lv = np.asarray(log_var, dtype=np.float64)
    err2 = (z64 - mean) ** 2 * np.exp(-lv)
    out: F64 = 0.5 * np.sum(LOG_2PI + lv + err2, axis=-1)
    return out


STUDENT_T_DOF: Final = 10.0  # degrees of freedom of the raw score's error model


def student_t_score(z: np.ndarray, mean: np.ndarray, log_var: np.ndarray) -> F64:
    """The raw score: sum over features of (nu + 1) / 2 * log(1 + e^2 / nu), e the
    standardised error and nu = STUDENT_T_DOF.

    It is the negative log-likelihood of the errors under a Student t of the model's
    location and scale, less the terms that do not depend on the error. Within a few
    standard deviations it is close to the Gaussian NLL (about e^2 / 2); far out it grows
    like log e^2, so one wild reading, or a level shift to hundreds of standard deviations,
    moves a stream's long-run statistics of the score a bounded amount instead of
    swamping them for thousands of steps.

    >>> round(float(student_t_score(np.ones((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)))[0]), 4)
    1.0484
    """
    out: F64 = np.sum(_student_t_parts(standardised_errors(z, mean, log_var)), axis=-1)
    return out


def _student_t_parts(e: np.ndarray) -> F64:
    nu = STUDENT_T_DOF
    out: F64 = 0.5 * (nu + 1.0) * np.log1p(e * e / nu)
    return out


def error_parts(std_errors: np.ndarray, raw_score: str) -> F64:
    """Each feature's part of the surprise in the raw score, [..., F]: the Student-t terms
    (they sum to the raw score), or e^2 / 2 for the Gaussian NLL (its terms less the constant
    and the predicted variance's, which say nothing about the observation). Both grow with
    |e|, so at one step the largest part is the largest error.

    >>> error_parts(np.array([[0.0, 2.0]]), "gaussian_nll").tolist()
    [[0.0, 2.0]]
    """
    e = np.asarray(std_errors, np.float64)
    if raw_score == "student_t":
        return _student_t_parts(e)
    out: F64 = 0.5 * e * e
    return out


def standardised_errors(z: np.ndarray, mean: np.ndarray, log_var: np.ndarray) -> F64:
    """Per-feature (z - mean) / sigma: which sensor is off, and in which direction."""
    out: F64 = (np.asarray(z, np.float64) - mean) * np.exp(-0.5 * np.asarray(log_var, np.float64))
    return out


LOG_SCORE_DECADES: Final = 16.0  # tail probabilities down to 1e-16 map onto [0, 1]


def log_score(tail: np.ndarray) -> F64:
    """Anomaly score in [0, 1] from the Gaussian tail probability: -log10(tail) / 16.

    The likelihood 1 - tail crowds against 1 (0.9999 and 0.99999999 print alike); its
    logarithm keeps the resolution a threshold search needs (HTM's log-likelihood idea).

    >>> log_score(np.array([1.0, 1e-4, 1e-16, 1e-30])).tolist()
    [0.0, 0.25, 1.0, 1.0]
    """
    with np.errstate(divide="ignore"):
        decades = -np.log10(np.asarray(tail, np.float64))
    out: F64 = np.clip(decades / LOG_SCORE_DECADES, 0.0, 1.0) + 0.0  # + 0.0: no -0.0
    return out


def ewma_alpha(window: int) -> float:
    """Smoothing factor of an exponential average whose centre of mass matches a window.

    >>> ewma_alpha(1)
    1.0
    """
    return 2.0 / (window + 1.0)


def ewma_var_share(window: int) -> float:
    """Variance of an exponential average of independent unit-variance values.

    >>> ewma_var_share(1)
    1.0
    """
    a = ewma_alpha(window)
    return a / (2.0 - a)


def short_average(raw: np.ndarray, window: int) -> F64:
    """The trailing exponential moving average the scorer keeps, over a whole series.

    >>> short_average(np.array([1.0, 1.0, 4.0]), 1).tolist()
    [1.0, 1.0, 4.0]
    """
    alpha = ewma_alpha(window)
    out = np.empty(len(raw), dtype=np.float64)
    acc = math.nan
    for i, value in enumerate(np.asarray(raw, dtype=np.float64)):
        acc = value if math.isnan(acc) else acc + alpha * (value - acc)
        out[i] = acc
    return out


def gaussian_tail(z: np.ndarray) -> F64:
    """Upper tail probability Q(z) = P(N(0,1) > z), accurate to ~1e-7 relative.

    Uses the Chebyshev-fitted complementary error function of Numerical Recipes
    (erfcc), which keeps relative precision far into the tail.

    >>> [round(float(v), 6) for v in gaussian_tail(np.array([0.0, 1.0, 3.0]))]
    [0.5, 0.158655, 0.00135]
    """
    x = np.asarray(z, dtype=np.float64) / math.sqrt(2.0)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = -a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))))  # fmt: skip
    erfc = t * np.exp(poly)
    erfc = np.where(x >= 0, erfc, 2.0 - erfc)
    out: F64 = 0.5 * erfc
    return out


def huber_consistency(clip: float) -> float:
    """E[min(x^2, clip^2)] for x ~ N(0, 1): where a mean square of unit Gaussian values,
    each clipped at ``clip``, settles. Dividing by it makes the clipped estimate consistent.

    >>> round(huber_consistency(1.5), 4), round(huber_consistency(40.0), 4)
    (0.7785, 1.0)
    """
    inside = math.erf(clip / math.sqrt(2.0))
    density = math.exp(-0.5 * clip * clip) / math.sqrt(2.0 * math.pi)
    return inside - 2.0 * clip * density + clip * clip * (1.0 - inside)


INPUT_VAR_FLOOR: Final = 1e-2  # a stream's input spread stays above a tenth of training's:
# a sensor parked at its training centre for months would otherwise make its next small move
# an enormous one to the model (on NAB the floor changes nothing; at 1, no shrinking: 59.9)


def learn_input_var(var: F64, z: np.ndarray, alpha: float, clip: float) -> None:
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
    target = np.minimum(np.where(ok, z64 * z64, 0.0), clip * clip * var) / huber_consistency(clip)
    var += np.where(ok, alpha * (target - var), 0.0)
    np.maximum(var, INPUT_VAR_FLOOR, out=var)


@dataclass(frozen=True)
class ScoringConfig:
    """How raw scores become likelihoods and alerts; one setting serves every stream."""

    warmup_steps: int = 30  # steps scored before a stream may alert
    short_window: int = 20  # steps in the short-term average of the raw score (anomaly_score)
    alert_window: int = 50  # steps in the average the alert rule watches (0: the short one).
    # An alert is for a condition that lasts, the score marks where one starts: on SKAB a
    # longer average held the false-alarm rate under 10 %, on NAB the short one scores higher
    long_window: int = 8000  # steps of memory of the long-run distribution
    prior_weight: float = 8000.0  # the calibration prior counts as this many steps
    threshold: float = 0.99999999  # likelihood at which an alert is raised (a tail of 1e-8;
    # with clear_steps 20, over five seeds SKAB 0.794 / 9.2 % -> 0.804 / 8.2 %, every seed's FAR
    # within 10 %: fewer, longer episodes)
    raise_k: int = 1  # raise when at least k of the last n eligible steps are above threshold
    raise_n: int = 1
    clear_threshold: float = 0.99  # likelihood below which an active alert may clear
    clear_steps: int = 20  # consecutive steps below clear_threshold to clear: an anomaly
    # that lasts keeps one alert through its calmer stretches
    min_interval_steps: int = 20  # steps between one raise and the next on a stream
    top_k: int = 3  # features named in an alert
    update_every_steps: int = 0  # while active, an "update" event every this many steps (0: off)
    learn_from_anomalies: bool = True  # False: steps at or above clear_threshold do not
    # move the long-run statistics (what "normal" looks like is learnt from normal steps)
    freeze_during_alert_steps: int = 0  # while an alert is active, the long-run statistics
    # stop learning for up to this many steps (0: never), so a long anomaly keeps alerting
    onset_only: bool = True  # after a step beyond ONSET_RED, cap the next score at ONSET_YELLOW:
    # the score marks where an anomaly starts, not every step of it (HTM's likelihood filter)
    onset_hold_steps: int = 100  # with onset_only: also cap the scores of this many steps
    # after an onset, so one incident shows as one onset, not a burst of them
    input_scale_window: int = 16000  # steps of memory of each stream's own input spread (0:
    # off). The model sees its inputs rescaled by it, so a stream whose values come to vary
    # more than in training (a busier regime) stops surprising the model at every step. Over
    # three seeds: NAB 58.5 -> 60.8 (fewer false onsets), SKAB F1 0.816 -> 0.811, FAR 9.4 -> 8.1 %
    input_scale_clip: float = 1.5  # a step moves the spread by at most clip^2 of it (a Huber
    # scale: a lasting anomaly widens it slowly, a spike barely)
    spatial_tolerance: float = 0.01  # a value beyond the stream's range so far by more than
    # this share of the range shows as an onset in anomaly_score (HTM's spatial check; HTM
    # uses 5 %, 1 % scored higher on NAB over three training seeds); negative: off. Alerts
    # do not use it.
    routine_period_s: float = 86400.0  # with onset_only: an onset one period (a day) after
    # an earlier onset of the stream, within routine_tolerance_s, is shown like a held step:
    # a job that runs at the same time every day is the stream's routine, not a new anomaly.
    # 0: off. Alerts do not use it. NAB over five seeds 60.6 -> 63.4 (seed 0: false onsets
    # 113 -> 85)
    routine_tolerance_s: float = 3600.0

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 < self.clear_threshold <= self.threshold < 1.0:
            problems.append("need 0 < clear_threshold <= threshold < 1")
        for name in ("short_window", "long_window", "clear_steps", "top_k", "raise_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not self.raise_k <= self.raise_n <= 62:
            problems.append("need raise_k <= raise_n <= 62")
        for name in ("warmup_steps", "min_interval_steps", "update_every_steps",
                     "onset_hold_steps", "freeze_during_alert_steps",
                     "alert_window", "input_scale_window"):  # fmt: skip
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if not (self.input_scale_clip > 0 and math.isfinite(self.input_scale_clip)):
            problems.append("input_scale_clip must be positive")
        if self.prior_weight < 0:
            problems.append("prior_weight must not be negative")
        if not (self.routine_period_s >= 0 and math.isfinite(self.routine_period_s)):
            problems.append("routine_period_s must be a finite number, at least 0")
        if not (self.routine_tolerance_s >= 0 and math.isfinite(self.routine_tolerance_s)):
            problems.append("routine_tolerance_s must be a finite number, at least 0")
        return problems


# Per-stream scorer columns: name -> (dtype, initial value). The state table owns them.
SCORER_COLUMNS: Final[dict[str, tuple[type, float]]] = {
    "n_scored": (np.int64, 0),  # steps scored in the stream's life (long-run memory)
    "warm": (np.int64, 0),  # steps scored since the stream (re)started: the warm-up
    "short_avg": (np.float64, math.nan),
    "long_mean": (np.float64, math.nan),
    "long_var": (np.float64, math.nan),
    "alert_avg": (np.float64, math.nan),  # the alert rule's average (alert_window) and its
    "alert_mean": (np.float64, math.nan),  # long-run mean and variance
    "alert_var": (np.float64, math.nan),
    "active": (np.bool_, 0),
    "below": (np.int32, 0),
    "last_raise": (np.int64, -(2**62)),
    "episodes": (np.int64, 0),
    "above_bits": (np.int64, 0),  # bit i: the step i steps ago was above threshold
    "active_steps": (np.int64, 0),  # steps since the current alert was raised
    "prev_tail": (np.float64, 1.0),  # the previous step's tail probability (onset_only)
    "since_red": (np.int64, 2**40),  # steps since the last onset shown (onset_hold_steps)
}

# Per-stream scorer columns with a trailing axis of their own: name -> (shape, dtype, initial).
ONSET_MEMORY: Final = 4  # onsets a stream remembers for the routine check (routine_period_s)
SCORER_RECENT_COLUMNS: Final[dict[str, tuple[tuple[int], type, float]]] = {
    "onset_ts": ((ONSET_MEMORY,), np.float64, math.nan),  # times of the last onsets, newest
    # first; an onset that the routine check showed as held is remembered too
}

# Per-stream, per-feature scorer columns ([streams, features]): name -> (dtype, initial).
SCORER_FEATURE_COLUMNS: Final[dict[str, tuple[type, float]]] = {
    "seen_min": (np.float64, math.inf),  # the smallest (normalised) value seen (spatial check)
    "seen_max": (np.float64, -math.inf),
    "input_var": (np.float64, 1.0),  # the stream's input spread, squared, in training units
    "alert_parts": (np.float64, math.nan),  # each feature's part (error_parts) averaged like
    # the alert's average: what an alert names as the features that raised it
}


ColumnSpec = tuple[tuple[int, ...], type, float]  # trailing shape, dtype, initial value


def scorer_column_specs(f: int) -> dict[str, ColumnSpec]:
    """Every per-stream scorer column for streams of ``f`` features: name -> (trailing
    shape, dtype, initial value).

    >>> scorer_column_specs(3)["seen_min"][0], scorer_column_specs(3)["onset_ts"][0]
    ((3,), (4,))
    """
    specs: dict[str, ColumnSpec] = {
        name: ((), dtype, fill) for name, (dtype, fill) in SCORER_COLUMNS.items()
    }
    for name, (dtype, fill) in SCORER_FEATURE_COLUMNS.items():
        specs[name] = ((f,), dtype, fill)
    specs.update(SCORER_RECENT_COLUMNS)
    return specs


def scorer_columns(b: int, f: int) -> dict[str, np.ndarray]:
    """Fresh scorer columns for ``b`` streams of ``f`` features, as the state table makes them.

    >>> scorer_columns(2, 3)["seen_min"].shape
    (2, 3)
    """
    return {
        name: np.full((b, *shape), fill, dtype)
        for name, (shape, dtype, fill) in scorer_column_specs(f).items()
    }


# The defaults above were chosen on NAB and SKAB: one model per stream, its calibration that
# stream's own, anomalies that last. The other common shape is one model for a fleet, whose
# streams start cold and sit at different levels of the score, with short anomalies (spikes,
# dips): there each stream should learn its own level soon (a light prior) and a short
# average keeps a spike sharp. The demo and the performance benches run this profile.
FLEET_SCORING: Final[dict[str, float]] = {
    "short_window": 10,
    "alert_window": 0,  # the alert watches the short average: a spike alerts
    "threshold": 0.9999,
    "long_window": 2000,
    "prior_weight": 50.0,
}

# Tail probabilities of the onset filter: a step beyond ONSET_RED (one in a million) is an
# onset; the steps after it show no more than ONSET_YELLOW. On NAB, 1e-5 gave 47.4, 1e-6 50.4.
ONSET_RED: Final = 1e-6
ONSET_YELLOW: Final = 1e-3
SPATIAL_TAIL: Final = 1e-8  # what a value beyond anything seen shows (anomaly_score 0.5)

# Scorer columns of the two averages: (the average, its long-run mean, its long-run variance).
SHORT_STATS: Final = ("short_avg", "long_mean", "long_var")
ALERT_STATS: Final = ("alert_avg", "alert_mean", "alert_var")


@dataclass
class StepScores:
    """What one scoring step returns for B streams (arrays of length B)."""

    raw: F64  # raw score; NaN where there was no prediction yet
    likelihood: F64  # anomaly likelihood in [0, 1]; 0 during warm-up
    score: F64  # log_score of the tail: the same ordering, resolved near 1; 0 during warm-up
    std_errors: F64  # [B, F] standardised errors (NaN where no prediction)
    contributions: F64  # [B, F] each feature's part of the alert's average (NaN: none yet)
    raised: npt.NDArray[np.bool_]
    cleared: npt.NDArray[np.bool_]
    updated: npt.NDArray[np.bool_]  # periodic "still active" events (update_every_steps)
    active: npt.NDArray[np.bool_]
    episode: npt.NDArray[np.int64]  # per-stream episode number of the current/last alert


class Scorer:
    """Turns predictions and observations into likelihoods and alert events.

    ``step_batch`` updates the gathered per-stream columns in place; the caller
    scatters them back into the state table.
    """

    def __init__(self, config: ScoringConfig, calibration: Calibration) -> None:
        self.config = config
        self.prior_mean = float(calibration.window_mean)
        # The calibration describes an average over its own window; one over a different
        # window spreads more (shorter) or less (longer): for an exponential average of
        # independent scores the variance is var * a / (2 - a), a = ewma_alpha(window).
        self.prior_var = self._prior_var(calibration, config.short_window)
        self.raw_score = calibration.raw_score  # the score the calibration describes
        self._alpha_short = ewma_alpha(config.short_window)
        # The alert's own average, when alert_window > 0 (else the alert uses the short one).
        window = config.alert_window
        self._alpha_alert = ewma_alpha(window) if window else math.nan
        self.alert_prior_var = self._prior_var(calibration, window) if window else math.nan
        self._alpha_parts = self._alpha_alert if window else self._alpha_short  # alert_parts
        window = config.input_scale_window
        self._alpha_input = ewma_alpha(window) if window else math.nan

    def model_inputs(self, cols: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
        """What the model is fed, in its normalised units: ``z`` (the values normalised by
        the training statistics) over each stream's own input spread, or ``z`` itself when
        input_scale_window is 0. The model's predictions, and so the scores, are in these
        units."""
        if not self.config.input_scale_window:
            return z
        out: np.ndarray = z / np.sqrt(cols["input_var"])
        return out

    @staticmethod
    def _prior_var(calibration: Calibration, window: int) -> float:
        share = ewma_var_share(window) / ewma_var_share(calibration.window)
        return float(calibration.window_std) ** 2 * share

    def _average_tail(
        self,
        names: tuple[str, str, str],
        cols: dict[str, np.ndarray],
        raw: F64,
        ok: npt.NDArray[np.bool_],
        alpha: float,
        prior_var: float,
    ) -> tuple[F64, F64]:
        """Advance one exponential average of the raw score; return its Gaussian tail
        against the long-run mean and variance *before* this step, and the step's deviation.

        The long-run statistics are not updated here (``_learn`` does it), so whether a
        step teaches them can depend on its likelihood.
        """
        avg, lm, lv = (cols[name] for name in names)
        _advance_average(avg, raw, ok, alpha)
        # Long-run mean and variance of the average, with the calibration as a prior.
        fresh = ok & np.isnan(lm)
        lm[fresh] = self.prior_mean
        lv[fresh] = prior_var
        sd = np.sqrt(np.maximum(lv, 1e-12))
        tail: F64 = gaussian_tail((avg - lm) / sd)
        return tail, avg - lm

    def _learn(
        self,
        names: tuple[str, str, str],
        cols: dict[str, np.ndarray],
        learn: npt.NDArray[np.bool_],
        delta: F64,
    ) -> None:
        """Move the long-run mean and variance towards this step's average: the prior
        counts as prior_weight steps and the step size shrinks like 1/n up to long_window."""
        cfg = self.config
        _, lm, lv = (cols[name] for name in names)
        n = cols["n_scored"]
        eff = np.minimum(n[learn] + cfg.prior_weight + 1.0, float(cfg.long_window))
        alpha = 1.0 / eff
        d = delta[learn]
        lm[learn] += alpha * d
        lv[learn] = (1.0 - alpha) * (lv[learn] + alpha * d * d)

    def _average_parts(self, parts_avg: F64, parts: F64, ok: npt.NDArray[np.bool_]) -> F64:
        """Advance each feature's part of the raw score (error_parts) in an exponential
        average like the alert's own (alert_window, else short_window), in place; return a
        copy. A spike raises the alert a few steps after it, when another sensor may have
        the largest error; the averaged parts still name the spiking one."""
        _advance_average(parts_avg, parts, ok, self._alpha_parts)
        out: F64 = parts_avg.copy()
        out[~ok] = np.nan
        return out

    def _beyond_seen(
        self, cols: dict[str, np.ndarray], z: np.ndarray, eligible: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.bool_]:
        """Streams whose value lies beyond everything they showed before by more than
        ``spatial_tolerance`` of that range (any feature); then the range takes it in."""
        tolerance = self.config.spatial_tolerance
        if tolerance < 0:
            return np.zeros(len(eligible), np.bool_)
        x = np.asarray(z, np.float64)
        lo, hi = cols["seen_min"], cols["seen_max"]
        with np.errstate(invalid="ignore"):  # inf - inf, 0 * inf before any value was seen
            width = hi - lo  # -inf or NaN until a value was seen, 0 after one: cannot flag
            margin = tolerance * width
            beyond = (width > 0) & ((x > hi + margin) | (x < lo - margin))
        finite = np.isfinite(x)
        np.minimum(lo, np.where(finite, x, np.inf), out=lo)
        np.maximum(hi, np.where(finite, x, -np.inf), out=hi)
        out: npt.NDArray[np.bool_] = eligible & beyond.any(axis=-1)
        return out

    def _routine(
        self, onset_ts: F64, ts: np.ndarray, onset: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.bool_]:
        """Onsets that come one routine_period_s after a remembered onset of their stream,
        within routine_tolerance_s; every onset is then remembered (newest first, the
        oldest of ONSET_MEMORY forgotten), so a routine stays recognised day after day."""
        if not onset.any():  # the usual step: nothing to check or remember
            return onset
        cfg = self.config
        t = np.asarray(ts, np.float64)
        with np.errstate(invalid="ignore"):  # NaN: no onset remembered there yet
            lag = t[:, None] - onset_ts - cfg.routine_period_s
            routine = onset & (np.abs(lag) <= cfg.routine_tolerance_s).any(axis=-1)
        keep = onset & np.isfinite(t)
        onset_ts[keep, 1:] = onset_ts[keep, :-1]
        onset_ts[keep, 0] = t[keep]
        out: npt.NDArray[np.bool_] = routine
        return out

    def step_batch(
        self,
        cols: dict[str, np.ndarray],
        z: np.ndarray,
        mean: np.ndarray,
        log_var: np.ndarray,
        has_pred: npt.NDArray[np.bool_],
        z_train: np.ndarray | None = None,
        ts: np.ndarray | None = None,
    ) -> StepScores:
        """Score normalised observations ``z`` [B, F] (``model_inputs``) against the previous
        predictions. ``z_train``: the same values normalised by the training statistics alone
        (default ``z``); the range check and the input spread learn from them. ``ts`` [B]:
        the samples' times in seconds, for the routine check (None: no check)."""
        cfg = self.config
        seen = z if z_train is None else z_train
        std_errors = standardised_errors(z, mean, log_var)
        parts = error_parts(std_errors, self.raw_score)
        if self.raw_score == "student_t":  # student_t_score: the sum of its parts in hand
            raw = np.where(has_pred, np.sum(parts, axis=-1), np.nan)
        else:
            raw = np.where(has_pred, gaussian_nll(z, mean, log_var), np.nan)
        std_errors[~has_pred] = np.nan
        ok = has_pred & np.isfinite(raw)
        contributions = self._average_parts(cols["alert_parts"], parts, ok)

        n = cols["n_scored"]
        # The short average's tail makes anomaly_score; the alert rule watches its own
        # (longer) average, or the short one when alert_window is 0.
        tail, delta = self._average_tail(SHORT_STATS, cols, raw, ok, self._alpha_short,
                                         self.prior_var)  # fmt: skip
        alert_tail, alert_delta = tail, delta
        if cfg.alert_window:
            alert_tail, alert_delta = self._average_tail(
                ALERT_STATS, cols, raw, ok, self._alpha_alert, self.alert_prior_var
            )
        likelihood = np.where(ok, 1.0 - alert_tail, 0.0)
        learn = ok
        if not cfg.learn_from_anomalies:
            learn = ok & ((likelihood < cfg.clear_threshold) | (cols["warm"] < cfg.warmup_steps))
        if cfg.freeze_during_alert_steps:
            frozen = cols["active"] & (cols["active_steps"] < cfg.freeze_during_alert_steps)
            learn = learn & ~frozen
        self._learn(SHORT_STATS, cols, learn, delta)
        if cfg.alert_window:
            self._learn(ALERT_STATS, cols, learn, alert_delta)
        n[ok] += 1
        warm = cols["warm"]
        warm[ok] += 1

        eligible = ok & (warm > cfg.warmup_steps)
        likelihood = np.where(eligible, likelihood, 0.0)
        spatial = self._beyond_seen(cols, seen, eligible)
        if cfg.input_scale_window:
            learn_input_var(cols["input_var"], seen, self._alpha_input, cfg.input_scale_clip)
        if cfg.onset_only:
            prev = cols["prev_tail"]
            since = cols["since_red"]
            held = (prev <= ONSET_RED) | (since < cfg.onset_hold_steps)
            shown = np.where(held, np.maximum(tail, ONSET_YELLOW), tail)
            shown = np.where(spatial & ~held, np.minimum(shown, SPATIAL_TAIL), shown)
            onset = ok & (shown <= ONSET_RED) & ~held
            since[ok] += 1
            since[onset] = 0  # a routine onset holds the steps after it too
            prev[ok] = tail[ok]
            if ts is not None and cfg.routine_period_s > 0:
                routine = self._routine(cols["onset_ts"], ts, onset)
                shown = np.where(routine, np.maximum(shown, ONSET_YELLOW), shown)
        else:
            shown = np.where(spatial, np.minimum(tail, SPATIAL_TAIL), tail)
        score = np.where(eligible, log_score(shown), 0.0)
        active, below, last_raise = cols["active"], cols["below"], cols["last_raise"]
        # k of the last n eligible steps above threshold (k = n = 1: this step alone).
        bits = cols["above_bits"]
        window_mask = (1 << cfg.raise_n) - 1
        bits[eligible] = ((bits[eligible] << 1) | (likelihood[eligible] >= cfg.threshold)) & (
            window_mask
        )
        enough = _popcount(bits) >= cfg.raise_k
        raised = eligible & ~active & enough & (n - last_raise >= cfg.min_interval_steps)
        calm = active & ok & (likelihood < cfg.clear_threshold)
        below[:] = np.where(calm, below + 1, np.where(active, 0, below))
        cleared = active & (below >= cfg.clear_steps)
        last_raise[raised] = n[raised]
        cols["episodes"][raised] += 1
        steps_on = cols["active_steps"]
        steps_on[active & ok] += 1
        updated = np.zeros_like(raised)
        if cfg.update_every_steps:
            updated = active & ~cleared & ok & (steps_on % cfg.update_every_steps == 0)
        active[:] = (active | raised) & ~cleared
        below[cleared | raised] = 0
        steps_on[raised | cleared] = 0
        bits[raised] = 0
        return StepScores(
            raw=raw,
            likelihood=likelihood,
            score=score,
            std_errors=std_errors,
            raised=raised,
            cleared=cleared,
            updated=updated,
            active=active.copy(),
            episode=cols["episodes"].copy(),
            contributions=contributions,
        )


def _advance_average(avg: F64, x: F64, ok: npt.NDArray[np.bool_], alpha: float) -> None:
    """One step of exponential averages, in place: for the streams in ``ok``, the first value
    starts the average (NaN: none yet), later ones move it ``alpha`` of the way. ``avg`` and
    ``x`` are [B] or [B, F] (a row of F averages that start together).

    >>> avg = np.array([np.nan, 2.0])
    >>> _advance_average(avg, np.array([4.0, 4.0]), np.ones(2, np.bool_), 0.5)
    >>> avg.tolist()
    [4.0, 3.0]
    """
    empty = np.isnan(avg) if avg.ndim == 1 else np.isnan(avg).any(axis=-1)
    first = ok & empty
    avg[first] = x[first]
    upd = ok & ~first
    avg[upd] += alpha * (x[upd] - avg[upd])


def _popcount(bits: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Set bits per element (values below 2**62).

    >>> _popcount(np.array([0, 1, 7, 2**61])).tolist()
    [0, 1, 3, 1]
    """
    count = np.zeros_like(bits)
    b = bits.copy()
    while b.any():
        count += b & 1
        b >>= 1
    return count


def top_features(std_errors_row: np.ndarray, k: int) -> list[int]:
    """Indices of the k features with the largest magnitude (|standardised error|, or a
    contribution), largest first.

    >>> top_features(np.array([0.5, -4.0, 2.0]), 2)
    [1, 2]
    """
    mag = np.nan_to_num(np.abs(std_errors_row), nan=-1.0)
    order = np.argsort(-mag, kind="stable")[:k]
    return [int(i) for i in order]
