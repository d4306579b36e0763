"""Surprise: each observation against the prediction made before it arrived.

``Surprise.score`` turns x_t and the model's prediction at t-1 (mean and log-variance,
normalised units) into the raw score and each feature's part of it.

A network's one-step errors are not white: on held-out data each step's error carries a
share of the last one's (a lag-one autocorrelation; negative where the network follows its
last input a little too far, as it does a noisy one). What one step alone says is the part
of its error the last one did not foretell, the innovation (e_t - rho e_(t-1)) /
sqrt(1 - rho^2), of the same spread as e_t but narrower about what could not be foreseen: a
spike's error stands further out against it. ``Surprise.score`` returns it beside the errors
for the per-step check (``StepTail``); the raw score, whose averages the calibration measures
as they are, stays of the errors. rho is the model's, per feature, measured with its
calibration (``error_lag``). The part keeps each stream's last error.

A spike two or three samples long is two or three errors of one sign, each of which alone
may be no further out than the noise's rare extremes. Their sum is: ``Surprise.score``
returns each feature's last two errors summed over their spread, (e_t + e_(t-1)) / sqrt(2 (1
+ rho)), as wide as one error (the pair), which the per-step check judges beside the
innovation. A single wild sample adds nothing there: with its neighbour, its pair is
narrower than itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from detector.scoring.calibration import RAW_SCORES
from detector.scoring.stats import (
    F64,
    ColumnSpec,
    Mask,
    gaussian_tail,
    learn_mean_square,
    row_max,
)

LOG_2PI: Final = math.log(2.0 * math.pi)
STUDENT_T_DOF: Final = 10.0  # degrees of freedom of the raw score's error model


def standardised_errors(z: np.ndarray, mean: np.ndarray, log_var: np.ndarray) -> F64:
    """Per-feature (z - mean) / sigma: which sensor is off, and in which direction.

    >>> standardised_errors(np.array([[3.0]]), np.array([[1.0]]), np.array([[0.0]])).tolist()
    [[2.0]]
    """
    out: F64 = (np.asarray(z, np.float64) - mean) * np.exp(-0.5 * np.asarray(log_var, np.float64))
    return out


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


def _student_t_parts(e: np.ndarray) -> F64:
    nu = STUDENT_T_DOF
    out: F64 = 0.5 * (nu + 1.0) * np.log1p(e * e / nu)
    return out


def student_t_score(z: np.ndarray, mean: np.ndarray, log_var: np.ndarray) -> F64:
    """The raw score: sum over features of (nu + 1) / 2 * log(1 + e^2 / nu), e the
    standardised error and nu = STUDENT_T_DOF.

    It is the negative log-likelihood of the errors under a Student t of the model's
    location and scale, less the terms that do not depend on the error. Within a few
    standard deviations it is close to the Gaussian NLL (about e^2 / 2); far out it grows
    like log e^2, so one wild reading moves a stream's long-run statistics of the score a
    bounded amount instead of swamping them for thousands of steps.

    >>> round(float(student_t_score(np.ones((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)))[0]), 4)
    1.0484
    """
    out: F64 = np.sum(_student_t_parts(standardised_errors(z, mean, log_var)), axis=-1)
    return out


def error_parts(std_errors: np.ndarray, raw_score: str) -> F64:
    """Each feature's part of the surprise in the raw score, [..., F]: the Student-t terms
    (they sum to the raw score), or e^2 / 2 for the Gaussian NLL (its terms less the constant
    and the predicted variance's, which say nothing about the observation).

    >>> error_parts(np.array([[0.0, 2.0]]), "gaussian_nll").tolist()
    [[0.0, 2.0]]
    """
    e = np.asarray(std_errors, np.float64)
    if raw_score == "student_t":
        return _student_t_parts(e)
    out: F64 = 0.5 * e * e
    return out


# The lag-one autocorrelation taken out of the errors is bounded here: 1 / sqrt(1 - rho^2)
# stays under 2.3, so no error is magnified without bound by an estimate near one.
MAX_ERROR_LAG: Final = 0.9


def error_lag(errors: Sequence[np.ndarray]) -> list[float]:
    """Per feature, the lag-one autocorrelation of standardised errors, pooled over streams
    (each [T, F], consecutive finite pairs), each error clipped at TAIL_FROM (a held-out
    spike does not set it): what the model file carries (``Calibration.error_lag``).

    >>> e = np.array([[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, 1.0]])
    >>> error_lag([e])
    [-0.9, 0.9]
    """
    f = errors[0].shape[1]
    cross, now, before = np.zeros(f), np.zeros(f), np.zeros(f)
    for e in errors:
        e = np.clip(np.asarray(e, np.float64), -TAIL_FROM, TAIL_FROM)
        a, b = e[1:], e[:-1]
        pair = np.isfinite(a) & np.isfinite(b)
        a, b = np.where(pair, a, 0.0), np.where(pair, b, 0.0)
        cross += (a * b).sum(axis=0)
        now += (a * a).sum(axis=0)
        before += (b * b).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        lag = cross / np.sqrt(now * before)
    lag = np.clip(np.nan_to_num(lag), -MAX_ERROR_LAG, MAX_ERROR_LAG)
    return [float(v) for v in lag]


def whiten(errors: np.ndarray, last: np.ndarray, lag: np.ndarray) -> F64:
    """Each error less what the last one foretells of it, at the same spread: (e - rho
    last) / sqrt(1 - rho^2); the error itself where there is no last (NaN).

    >>> whiten(np.array([[1.0, 1.0]]), np.array([[-1.0, np.nan]]), np.array([-0.6, -0.6]))
    array([[0.5, 1. ]])
    """
    rho = np.asarray(lag, np.float64)
    known = np.isfinite(last)
    if known.all():  # the usual step: no masks
        whole: F64 = (errors - rho * last) / np.sqrt(1.0 - rho * rho)
        return whole
    out: F64 = np.where(
        known, (errors - rho * np.where(known, last, 0.0)) / np.sqrt(1.0 - rho * rho), errors
    )
    return out


def error_pairs(errors: np.ndarray, last: np.ndarray, lag: np.ndarray | float) -> F64:
    """Each error summed with the last one over the sum's spread, (e + last) / sqrt(2 (1 +
    rho)) for errors of unit spread and lag-one autocorrelation rho: as wide as one error.
    NaN where there is no last.

    >>> error_pairs(np.array([[3.0, 3.0]]), np.array([[3.0, np.nan]]), np.array([0.5, 0.0]))
    array([[3.46410162,        nan]])
    """
    rho = np.asarray(lag, np.float64)
    out: F64 = (errors + last) / np.sqrt(2.0 * (1.0 + rho))
    return out


@dataclass
class Surprised:
    raw: F64  # [B] raw score; NaN where there was no prediction
    std_errors: F64  # [B, F] standardised errors; NaN where there was no prediction
    parts: F64  # [B, F] each feature's part of the raw score
    ok: Mask  # [B] a finite raw score: the step counts
    innovations: F64  # [B, F] each error less what the last one foretold (``whiten``)
    pairs: F64  # [B, F] each error with the last one (``error_pairs``); NaN where none


class Surprise:
    """The raw score the model's calibration describes (``raw_score``), and the errors'
    innovations under their lag-one autocorrelation ``lag`` (per feature; None: the errors
    as they come). Column ``error_last`` [F]: the stream's last standardised error (NaN:
    none)."""

    def __init__(self, raw_score: str, lag: list[float] | None = None) -> None:
        if raw_score not in RAW_SCORES:
            raise ValueError(f"unknown raw score {raw_score!r}")
        self.raw_score = raw_score
        self.lag = None if lag is None or not any(lag) else np.asarray(lag, np.float64)

    @staticmethod
    def columns(f: int) -> dict[str, ColumnSpec]:
        return {"error_last": ((f,), np.float32, math.nan)}

    def score(
        self, cols: dict[str, np.ndarray], z: np.ndarray, mean: np.ndarray,
        log_var: np.ndarray, has_pred: Mask,
    ) -> Surprised:  # fmt: skip
        std_errors = standardised_errors(z, mean, log_var)
        parts = error_parts(std_errors, self.raw_score)
        every = bool(has_pred.all())  # the usual step: no masks
        if self.raw_score == "student_t":  # the sum of its parts, already in hand
            raw = np.sum(parts, axis=-1)
        else:
            raw = gaussian_nll(z, mean, log_var)
        if not every:
            raw = np.where(has_pred, raw, np.nan)
            std_errors[~has_pred] = np.nan
        innovations = std_errors  # NaN where there was no prediction, whitened or not
        last = cols["error_last"]
        pairs = error_pairs(std_errors, last, 0.0 if self.lag is None else self.lag)
        if self.lag is not None:
            innovations = whiten(std_errors, last, self.lag)
        last[...] = std_errors  # none (NaN) after a step without a prediction
        return Surprised(raw, std_errors, parts, has_pred & np.isfinite(raw), innovations, pairs)


# A stream's error scale stays above a tenth of what the model predicts: errors far smaller
# than the model expects would make an ordinary next one look enormous.
ERROR_VAR_FLOOR: Final = 1e-2


TAIL_FROM: Final = 3.0  # spreads beyond which each stream learns its own tail (peaks over
# threshold: the exceedances' rate and the mean excess of x^2 / 2, an exponential beyond)
_GAUSS_RATE: Final = 0.0026997960632601866  # P(|N(0,1)| > 3): the prior of the rate
_GAUSS_EXCESS: Final = 0.9247401  # E[(X^2 - 9) / 2 | |X| > 3], X ~ N(0,1): the prior mean
# excess, (1 + 3 phi(3) / Q(3) - 9) / 2
# The Gaussian tail is an assumption, not evidence: it counts as the steps in which one
# exceedance is expected, so a stream's first exceedances already speak for its own tail.
TAIL_PRIOR_STEPS: Final = 1.0 / _GAUSS_RATE
_PEAK_MAX: Final = float(np.finfo(np.float32).max)


def _excess_sq(x: F64) -> F64:
    """How far x^2 / 2 lies beyond TAIL_FROM^2 / 2: what the tail's excess is measured in."""
    return _excess_of_square(x * x)


def _excess_of_square(sq: F64) -> F64:
    """:func:`_excess_sq` of a square already in hand."""
    out: F64 = 0.5 * (sq - TAIL_FROM * TAIL_FROM)
    return out


def tail_bound(rate: np.ndarray, excess: np.ndarray) -> F64:
    """Where a learnt tail (``rate``, mean ``excess``) makes an error as rare as a Gaussian's
    beyond TAIL_FROM, in spreads: TAIL_FROM for a tail no heavier than the Gaussian's, further
    out for a stream whose large errors are a habit (a reading that jumps by quanta, a
    routine step that the model follows a sample late).

    >>> tail_bound(np.array([_GAUSS_RATE, _GAUSS_RATE * math.e**4]), np.array([1.0, 2.0]))
    array([3., 5.])
    """
    heavier = np.maximum(np.log(np.asarray(rate, np.float64) / _GAUSS_RATE), 0.0)
    out: F64 = np.sqrt(TAIL_FROM * TAIL_FROM + 2.0 * np.asarray(excess, np.float64) * heavier)
    return out


def tail_prior(errors: np.ndarray) -> tuple[list[float], list[float]]:
    """Each feature's tail as held-out standardised ``errors`` [N, F] show it: the rate of
    errors beyond TAIL_FROM and their mean excess of x^2 / 2, each with the Gaussian's as one
    exceedance's worth of prior (a short held-out stretch may show none). What the model
    file carries (``Calibration.tail_rate``, ``tail_excess``) and each stream starts from.

    >>> rate, excess = tail_prior(np.zeros((1000, 1)))
    >>> round(rate[0] / _GAUSS_RATE, 2), round(excess[0], 4)
    (0.27, 0.9247)
    """
    x = np.abs(np.asarray(errors, np.float64))
    x = np.where(np.isfinite(x), x, 0.0)
    over = x > TAIL_FROM
    seen = over.sum(axis=0)
    excess = (np.where(over, _excess_sq(x), 0.0).sum(axis=0) + _GAUSS_EXCESS) / (seen + 1.0)
    rate = (seen + 1.0) / (len(x) + TAIL_PRIOR_STEPS)
    return [float(v) for v in rate], [float(v) for v in excess]


def pooled_excess(rate: Sequence[float], excess: Sequence[float], steps: float) -> list[float]:
    """A model's mean excess per feature (``tail_prior``'s, from ``steps`` held-out steps),
    each shrunk towards the features' common one as far as their differences lie within
    what their exceedances can tell: empirical Bayes, a random-effects model of log b across
    the features (DerSimonian and Laird 1986). A mean of k exponential excesses has log b
    known to about 1 / sqrt(k); the far tail goes as exp(-excess / b), so at seven spreads a
    b a quarter off (16 exceedances) moves the tail by two decades. The sensors of one model
    share its network and its process: where their b differ by no more than chance, they
    share one, known from all their exceedances together; a sensor whose tail truly differs
    (one that jumps by habit) keeps its own. One feature: its own.

    Twenty exceedances each: within chance, one b; further apart, each drawn in part; beside a
    sensor whose tail is far heavier, the others are left as they are:

    >>> [round(b, 2) for b in pooled_excess([0.003] * 3, [0.8, 0.9, 1.05], 6400.0)]
    [0.91, 0.91, 0.91]
    >>> [round(b, 2) for b in pooled_excess([0.003] * 3, [0.6, 0.9, 1.4], 6400.0)]
    [0.67, 0.9, 1.24]
    >>> [round(b, 2) for b in pooled_excess([0.003, 0.003, 0.1], [0.9, 1.0, 600.0], 6400.0)]
    [0.9, 1.01, 599.81]
    """
    if len(excess) < 2:
        return [float(b) for b in excess]
    log_b = np.log(np.asarray(excess, np.float64))
    # each log b's precision: the exceedances it was measured from, the prior's one included
    weight = np.asarray(rate, np.float64) * (steps + TAIL_PRIOR_STEPS)
    total = weight.sum()
    scale = total - (weight * weight).sum() / total
    if not scale > 0.0:  # one feature's count outweighs the rest beyond float precision
        return [float(b) for b in excess]
    common = (weight * log_b).sum() / total
    beyond_chance = (weight * (log_b - common) ** 2).sum() - (len(log_b) - 1)
    spread = max(0.0, beyond_chance / scale)  # tau^2: the true log b's spread across features
    noise = 1.0 / weight  # (spread 0: every b is the common one)
    mixed = 1.0 / (noise + spread)
    centre = (mixed * log_b).sum() / mixed.sum()
    shrunk = centre + (log_b - centre) * (spread / (spread + noise))
    return [float(b) for b in np.exp(shrunk)]


class StepTail:
    """How unlikely one step's error is on its own, each feature against its stream's own
    history: a spike or a step change that the averages dilute shows here at once.

    Per feature, the error over the stream's error scale, x = |e| / s, has a Gaussian body
    and, beyond TAIL_FROM, a tail the stream learns (peaks over threshold, the extreme-value
    way) of v = x^2 / 2: the rate r of steps beyond it and the mean excess b of v, so P(x' >
    x) = r exp(-(v - TAIL_FROM^2 / 2) / b). For Gaussian errors v's excess is close to
    exponential (b near 1), so the tail keeps the Gaussian's shape far out, as the model's
    own likelihood does; an exponential in x itself would make a ten-spread error a thousand
    times likelier than a Gaussian does. A sensor whose errors are heavy-tailed learns a
    larger b and does not alert on its usual outliers. The stream's
    tail is the smallest over its features, times their number.

    Exceedances come in clusters, and the mean excess learns one exceedance from each, its
    largest (runs declustering, Coles 2001, 5.3): a cluster ends after ``cluster_gap`` calm
    steps in a row, as an alert clears. A noise burst of thirty steps is one event, not
    thirty, and does not teach the tail to pass the next spike. The rate counts every
    exceedance. A sensor whose large errors are a habit from the start (a reading that
    jumps by quanta) is known from the model's held-out errors: the tail starts from
    ``prior`` (the model file's rate and mean excess per feature), counted as ``tail_steps``,
    the held-out steps it was measured on: a tail learnt from a stream's first dozen
    exceedances, extrapolated to an error twice as far out, is a guess, wrong in either
    direction by orders of magnitude, where the model's held-out errors say how its errors
    fall off. Each feature's mean excess there is known from its own exceedances, a dozen or
    two; where the features' differ by no more than that allows, they share one
    (``pooled_excess``). A file without them has the Gaussian's, an assumption, counted as
    TAIL_PRIOR_STEPS, one Gaussian exceedance's worth, and never less than that.

    Columns per feature: ``error_var`` (s^2, Huber-robust), ``tail_rate``,
    ``tail_excess_sq`` (b), ``tail_peak`` (the open cluster's largest excess) and
    ``tail_calm`` (steps since the last exceedance). The scale's prior is the model's own
    variance, counted as ``prior_steps``: for a model of one stream, the held-out steps it
    was measured on; for a fleet's, whose machines differ in noise, the weakest proper prior
    (``calibration.measured_weight``), so that a noisier machine's scale is its own from its
    first samples rather than its tail taking the extra noise for outliers. Every step size
    shrinks like 1 / evidence, up to ``long_window``.

    With ``pairs``, ``score`` judges each feature's last two errors together as well, on the
    same learnt tail (``Surprised.pairs``): a spike of two or three samples, each alone
    within the noise's rare extremes, stands out as a pair.

    >>> part = StepTail(prior_steps=100.0, long_window=1000, cluster_gap=20)
    >>> cols = {k: np.full((2, *sh), v, dt) for k, (sh, dt, v) in part.columns(2).items()}
    >>> tail = part.score(cols, part.spread(cols, np.array([[0.5, -1.0], [0.0, 9.0]])))
    >>> float(tail[0]) > 0.5, float(tail[1]) < 1e-10
    (True, True)
    """

    def __init__(
        self,
        prior_steps: float,
        long_window: int,
        cluster_gap: int,
        prior: tuple[list[float], list[float]] | None = None,
        tail_steps: float = TAIL_PRIOR_STEPS,
    ) -> None:
        self.prior_steps = prior_steps
        self.long_window = long_window
        self.cluster_gap = cluster_gap
        if prior is not None:  # each feature's mean excess, pooled with its sensors' alike
            prior = (prior[0], pooled_excess(prior[0], prior[1], tail_steps))
        self.prior = None if prior is None else tuple(np.asarray(p, np.float32) for p in prior)
        # a Gaussian's tail (no prior) is an assumption: one exceedance's worth, never less
        self.tail_steps = TAIL_PRIOR_STEPS if prior is None else max(tail_steps, TAIL_PRIOR_STEPS)

    @staticmethod
    def columns(f: int) -> dict[str, ColumnSpec]:
        return {
            "error_var": ((f,), np.float32, 1.0),
            "tail_rate": ((f,), np.float32, _GAUSS_RATE),
            "tail_excess_sq": ((f,), np.float32, _GAUSS_EXCESS),
            "tail_peak": ((f,), np.float32, 0.0),  # the open cluster's largest excess
            "tail_calm": ((f,), np.int16, np.iinfo(np.int16).max),  # steps since the last
            # exceedance: a cluster is open while they are under cluster_gap
        }

    def start(self, cols: dict[str, np.ndarray], fresh: Mask) -> None:
        """The model's tail for streams taking their first step (``fresh``)."""
        if self.prior is not None and fresh.any():
            cols["tail_rate"][fresh] = self.prior[0]
            cols["tail_excess_sq"][fresh] = self.prior[1]

    @staticmethod
    def spread(cols: dict[str, np.ndarray], std_errors: F64) -> F64:
        """Each feature's error over the stream's error scale, |e| / s [B, F]: what ``score``
        and ``learn`` take. A NaN error (no prediction) counts as none."""
        out: F64 = np.fmax(np.abs(std_errors) / np.sqrt(cols["error_var"]), 0.0)
        return out

    def score(self, cols: dict[str, np.ndarray], x: F64, pairs: F64 | None = None) -> F64:
        """Each stream's tail [B] for its errors' spreads ``x`` [B, F] (``spread``). With
        ``pairs`` (the spreads of its pairs, ``Surprised.pairs``), the smaller of the two
        tails, times two: a pair is as wide as one error, and the same tail judges it."""
        out = self._tail(cols, x)
        if pairs is None:
            return out
        both: F64 = np.minimum(1.0, 2.0 * np.minimum(out, self._tail(cols, pairs)))
        return both

    def _tail(self, cols: dict[str, np.ndarray], x: F64) -> F64:
        f = x.shape[-1]
        # The Gaussian body: the largest error's, no lower than at TAIL_FROM ...
        out: F64 = 2.0 * f * gaussian_tail(np.minimum(row_max(x), TAIL_FROM))
        beyond = x > TAIL_FROM
        if beyond.any():  # ... and beyond it, each feature's own learnt tail
            at = np.nonzero(beyond)
            rate, excess = cols["tail_rate"][at], cols["tail_excess_sq"][at]
            tail = f * rate * np.exp(-_excess_sq(x[at]) / excess)
            np.minimum.at(out, at[0], tail)
        np.minimum(out, 1.0, out=out)
        return out

    def learn(self, cols: dict[str, np.ndarray], spread: F64, learn: Mask, n: np.ndarray) -> None:
        """Learn from this step's ``spread`` (the one ``score`` took)."""
        every = bool(learn.all())  # the usual step: views of whole columns, no copies
        rows = slice(None) if every else learn
        names = ("error_var", "tail_rate", "tail_excess_sq", "tail_peak", "tail_calm")
        var, rate, excess, peak, calm = (cols[k] if every else cols[k][rows] for k in names)
        x = spread[rows]
        memory = float(self.long_window)
        evidence = np.minimum(self.tail_steps + n[rows] + 1.0, memory)  # the tail's
        alpha = (1.0 / evidence)[:, None]
        scale_alpha = (1.0 / np.minimum(self.prior_steps + n[rows] + 1.0, memory))[:, None]
        gap = self.cluster_gap
        over = x > TAIL_FROM
        calm_now = ~over
        sq = x * x
        # a cluster ends at its cluster_gap-th calm step; its peak teaches the excess
        ends = calm_now & (calm == gap - 1)
        if over.any():
            # (in float32, whose range a wild value's square may pass: it counts as the
            # largest there, as it is learnt no larger than three mean excesses anyway)
            excess_sq = _excess_of_square(sq)
            np.maximum(peak, np.where(over, np.minimum(excess_sq, _PEAK_MAX), 0.0), out=peak)
        ends &= peak > 0
        if ends.any():
            # the mean excess learns from the clusters' peaks alone, each clipped at 3 of the
            # excess so far (an exponential passes that one time in twenty): a spike is
            # not a habit
            at = np.nonzero(ends)
            counted = evidence[at[0]] * rate[at]
            seen = np.minimum(peak[at], 3.0 * excess[at])
            excess[at] += (seen - excess[at]) / (counted + 1.0)
            peak[at] = 0.0
        np.add(calm, 1, out=calm, where=calm_now & (calm < gap))
        calm[over] = 0
        rate *= 1.0 - alpha  # the exceedances' rate: an exponential mean of 0 / 1
        rate += np.where(over, alpha, 0.0)
        # the error scale: a Huber-robust mean square of the errors, x^2 var
        sq *= var
        learn_mean_square(var, sq, scale_alpha, ERROR_VAR_FLOOR)
        if not every:
            for k, v in zip(names, (var, rate, excess, peak, calm), strict=True):
                cols[k][rows] = v
