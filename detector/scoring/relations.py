"""Relations: each sensor against the stream's other sensors and their recent course.

A one-step predictor follows a sensor that drifts or breaks away from the others: it reads
the change as the process moving and predicts the next step from it. What it cannot
follow is how the sensors stand to one another. ``Relations`` keeps, per stream, each
sensor's own average over the window beside its value, and the mean and the inverse
covariance (precision) P of the values and averages together (2F of them, in training
units). Each sensor's residual is taken given every other value and every other sensor's
average, its own average left out (it follows a drift of its own sensor): with u = P d,
d = (x, s) - mean, marginalising the sensor's average s out of the Gaussian gives

    r_f = (u_f - P_fs u_s / P_ss) / sqrt(P_ff - P_fs^2 / P_ss),

N(0, 1) for a sensor where the others say it should be (a Gaussian graphical model). The
others' averages pin down a sensor that lags them, as a temperature lags the load, which
their values at the same step leave loose. A drifting sensor, a sensor whose partner
stopped following it, or one stuck while the others move, leaves the place the others put
it in, however slowly it got there. What the check watches is the residual's average over
the alert window, against how far such an average strays in normal data: the relations of
real machines are not linear, so the residual wanders slowly, and an average of it strays
further than the white-noise share would say. The model file measures that spread on
held-out streams (``RelationsPrior.average_var``), each step with a covariance that had not
seen it. The check also watches a slow average of the same residuals, over SLOW_WINDOWS
windows: their slow wander averages out about as fast as noise would, so a drift that creeps
over hundreds of steps stands out there before it does in the window's average. The two ask
one question, so they share the check's part of the alert's level in proportion to the
independent averages each holds (a weighted Bonferroni), and a raise by either disarms both
until each is calm again (one departure, one alert). The slow average's prior spread is the
window's rescaled by white-noise shares, and each stream learns its own, as it does for the
window's.

The covariance's prior is the model's: the held-out streams' covariance within each stream,
counted as samples of the stream's own (``calibration.measured_weight``): for a model of one
stream, whose calibration describes that stream, the samples it was measured on (a few
hundred held-out rows are not a full memory); for a fleet, the weakest proper prior, 2F + 1
samples.
A fleet's covariance is an average over machines whose relations have each their own
coefficients, and the average blurs them: a sensor that lags the load is several times
sharper given the others on its own machine than under the average. It says which sensors
move together, not how closely on this one, and the stream's own samples take over from the
first. Each step past the warm-up moves it by 1 / evidence, up to ``long_window``; its
precision is kept by a rank-one (Sherman-Morrison) update, (2F)^2 work a step and no
inversion, and stored as its upper triangle. The covariance and the mean are Huber-robust,
as the other learnt spreads are: a step far from what the relations say (its squared
Mahalanobis distance past the bound of ``stats.huber_scatter``) counts for less, so a
stream's own incidents (a stuck sensor while the load moved, a level shift) do not loosen
the relations that would show the next one. The covariance weighs a step's outer product by
min(1, k / q) and the mean its deviation by the square root of that, min(1, sqrt(k / q)):
Huber's M-estimator of location and scatter (Maronna 1976), whose location has a bounded
influence. (The scatter's weight on the mean made its influence fall as 1 / distance: a mean
that started far from the stream's values, as after a start-up transient, stayed there.)
Robust weights bound what one step teaches, not what hundreds do: a drift's steps are each
only a little out, and a young stream, whose covariance moves by 1 / its age, takes a
departure of a few hundred steps in as a third of what it knows; the check then calms before
the departure ends, and the return raises as a second one. So a departure, the steps since
the check was last calm, teaches the covariance none of its steps the check raises at (their
tail below the alert's level) until it has lasted as long as what the covariance knew before
it began: then it is most of what the covariance knows, and what the stream is now (an
estimator's breakdown point of one half). A model file from before the averages joined (an
F x F covariance) takes them as unrelated to the values until the stream has learnt them. The
mean is learnt from the samples past the warm-up, as the calibration's starts past the
network's burn-in (every one of them, so that a new state moves it); until the first of them
it follows the stream's values. (A running mean from the stream's first sample kept the
warm-up's samples, whose averages have not settled, and every deviation carried them.) Each
stream learns how much its own averages stray, in units of the calibration's (a Huber-robust
mean square, with the calibration as its prior), so a stream whose relations wander more
learns a wider spread. It learns that spread from the steps the check calls calm, its tail
above the level an alert clears at: a drift the check is watching grows slowly, and a spread
that took it in would widen as the drift grows and never let it stand out. A machine left in
a new state is taken in by the mean and, once the move is most of what it knows, the
covariance; its tail comes back and its spread learns again, no wider for the move. The tail
is a Student t whose degrees of freedom are the independent averages behind that spread (the
steps it was measured on, then the stream's own, times an average's share of them): a spread
measured on a short file is a rough one. (A tail learnt from exceedances, as the per-step
check's, does not suit an average: one excursion is dozens of exceedances in a row, and the
tail would learn the anomaly.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from detector.scoring.alerts import ARMED
from detector.scoring.calibration import RelationsPrior, measured_weight
from detector.scoring.stats import (
    F64,
    ColumnSpec,
    Mask,
    advance_average,
    average_var_share,
    ewma_alpha,
    ewma_var_share,
    huber_scatter,
    learn_mean_square,
    row_max,
    scatter_weight,
    student_tail,
)

PREFIX: Final = "rel_"
# Added to the covariance's diagonal (training units, where a sensor's variance is about 1)
# before it is inverted: a sensor that never moved in the held-out data still has a precision.
RIDGE: Final = 1e-3
# A deviation of a million training spreads is as far from the relations as any: bounded
# there, the float32 products of the residuals and the update cannot overflow.
DEVIATION_BOUND: Final = 1e6
VAR_FLOOR: Final = 0.1  # a stream's averages stray at least a tenth of the calibration's
GATHER_BYTES: Final = 2**22  # the most of a batch's full precisions gathered at once (4 MiB)
# The slow average of the residuals spans this many of the check's windows (400 steps for
# the alert's 50): a drift that creeps over hundreds of steps stands out there first.
SLOW_WINDOWS: Final = 8


def relations_precision(covariance: np.ndarray | list[list[float]]) -> F64:
    """The precision the residuals take: the inverse of the (symmetrised) covariance plus
    RIDGE on its diagonal.

    >>> relations_precision([[1.0, 0.0], [0.0, 3.999]]).round(3).tolist()
    [[0.999, 0.0], [0.0, 0.25]]
    """
    cov = np.asarray(covariance, np.float64)
    out: F64 = np.linalg.inv(0.5 * (cov + cov.T) + RIDGE * np.eye(len(cov))).astype(np.float64)
    return out


def relation_residuals(prec: np.ndarray, d: np.ndarray) -> F64:
    """Each sensor's residual given the others' values and averages, for deviations ``d``
    [..., 2F] from the mean of the values and their averages, and precisions ``prec``
    [..., 2F, 2F] over them (broadcast): what the calibration measures and the daemon
    watches. The sensor's own average s is left out of what it is judged against (it
    follows a drift): with u = P d, marginalising s out of the Gaussian gives

        r_f = (u_f - P_fs u_s / P_ss) / sqrt(P_ff - P_fs^2 / P_ss).

    Two sensors that move together, values and averages alike; the second is off by one:

    >>> cov = np.array([[1.0, 0.9], [0.9, 1.0]])
    >>> prec = relations_precision(np.kron(np.ones((2, 2)), cov) + 0.1 * np.eye(4))
    >>> relation_residuals(prec, np.array([0.0, 1.0, 0.0, 0.0])).round(1).tolist()
    [-0.7, 1.7]
    """
    u = np.einsum("...ij,...j->...i", prec, d)  # numpy's batched matmul is slow at this size
    f = u.shape[-1] // 2
    diag = np.diagonal(prec, axis1=-2, axis2=-1)
    p_fs = np.diagonal(prec[..., :f, f:], axis1=-2, axis2=-1)  # each value with its average
    return _given_the_others(u[..., :f], u[..., f:], diag[..., :f], p_fs, diag[..., f:])


def _given_the_others(u_f: np.ndarray, u_s: np.ndarray, p_ff: np.ndarray, p_fs: np.ndarray,
                      p_ss: np.ndarray) -> F64:  # fmt: skip
    """Each sensor's residual from u = P d and its value's (f) and own average's (s) entries
    of the precision, the average marginalised out; any layout, as long as all agree."""
    with np.errstate(invalid="ignore", divide="ignore"):
        k = p_fs / p_ss
        r: F64 = (u_f - k * u_s) / np.sqrt(p_ff - k * p_fs)
    return r


def feature_major(packed: np.ndarray) -> np.ndarray:
    """A copy of the batch's triangles [B, T] laid out [T, B]: each entry across the batch is
    one contiguous row, so the products of the rank-one update are whole-row operations,
    not short strided pieces. Where B is a multiple of 128, the rows are one element longer:
    with a stride of a power of two, the copy back to [B, T] contends for the same cache sets.

    >>> feature_major(np.arange(6.0).reshape(3, 2)).tolist()
    [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    """
    b, t = packed.shape
    width = b + 1 if b % 128 == 0 else b
    out = np.empty((t, width), packed.dtype)[:, :b]
    out[...] = packed.T
    return out


def slow_prior(covariance: np.ndarray | list[list[float]], f: int) -> F64:
    """The covariance over the values and their averages [2F, 2F] that a prior gives: its
    own, or for a file that measured the values alone [F, F] (before the averages joined),
    the values' with the averages taken as unrelated to them, which each stream then learns.

    >>> slow_prior([[2.0]], 1).tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    """
    cov: F64 = np.asarray(covariance, np.float64)
    if len(cov) == 2 * f:
        return cov
    out = np.zeros((2 * f, 2 * f))
    out[:f, :f] = out[f:, f:] = cov
    return out


def packing(n: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """How a symmetric n x n matrix is kept as its upper triangle (n (n + 1) / 2 values, row
    by row): the triangle's index of each entry [n, n], and the entries the triangle holds.

    >>> index, upper = packing(2)
    >>> index.tolist(), [a.tolist() for a in upper]
    ([[0, 1], [1, 2]], [[0, 0, 1], [0, 1, 1]])
    """
    upper = np.triu_indices(n)
    index = np.zeros((n, n), np.intp)
    index[upper] = np.arange(len(upper[0]))
    index = np.maximum(index, index.T)
    return index, upper


@dataclass(frozen=True)
class RelationsStep:
    """What ``Relations.score`` found at one step: its tail and standardised averages, and
    what ``Relations.learn`` takes from it."""

    tail: F64  # [B] each stream's tail
    z: F64  # [B, F] each sensor's residual average over its spread
    ok: Mask  # [B] the rows scored
    n: F64  # [B] the samples the state had taken in before the step
    d: F64  # [B, 2F] the deviations from the mean (0 where a row is not in use)
    prec_t: np.ndarray  # [T, B] the precisions' triangles, feature-major (float32)
    d_t: np.ndarray  # [2F, B] the deviations, feature-major (float32)
    u_t: np.ndarray  # [2F, B] P d, feature-major
    evidence: F64  # [B] what the covariance counts as known, the step included
    calm: Mask  # [B] the tail above the level an alert clears at
    departed: Mask  # [B] a departure's raising step, held back from the covariance
    slow_tail: F64  # [B] the tail of the residuals' slow average
    slow_z: F64  # [B, F] each sensor's slow average over its spread


class Relations:
    """Columns: each sensor's own average ``rel_slow`` [F], the mean of the values and
    averages ``rel_mean`` [2F], their precision's upper triangle ``rel_prec`` [F (2F + 1)],
    the residuals' average ``rel_avg`` [F], the stream's own spread of that average
    ``rel_var`` [F] (in the calibration's units), the calm samples since the last raise
    ``rel_armed``, the samples taken in ``rel_n`` (the covariance's evidence) and those
    the mean has learnt ``rel_learnt`` (NaN: a state kept before it, whose mean learnt every
    sample taken in), and the steps since the check was last calm ``rel_away``; the
    residuals' slow average ``rel_avg_slow`` [F], its own spread ``rel_var_slow`` [F] and
    raise state ``rel_armed_slow``. Each average's tail is the smallest over its features,
    times their number; ``weights`` are the two averages' shares of the check's level.

    The prior's ``average_var`` is the spread of the average over its ``window``; for another
    ``window`` it is rescaled by the exponential averages' white-noise shares (close, not
    exact, where the residuals are autocorrelated).

    Two sensors that move together (the second's residual is (x2 - 0.9 x1) / sqrt(0.19)),
    then the second holds while the first climbs:

    >>> prior = RelationsPrior([[1.0, 0.9], [0.9, 1.0]], 5, [0.1, 0.1], 5000)
    >>> part = Relations(prior, 5, 1000.0, 8000, calm=0.01, level=2.5e-9)
    >>> cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in part.columns(2).items()}
    >>> ok, count = np.ones(1, np.bool_), np.zeros(1)
    >>> tails = []
    >>> for i in range(60):
    ...     v = math.sin(i / 3.0) if i < 50 else math.sin(50 / 3.0) + (i - 49) * 0.3
    ...     w = math.sin(i / 3.0) if i < 50 else math.sin(50 / 3.0)
    ...     scored = part.score(cols, np.array([[v, w]]), ok, count)
    ...     part.learn(cols, scored, ok)
    ...     tails.append(float(scored.tail[0]))
    ...     count += 1
    >>> max(tails[:50]) == 1.0, tails[-1] < 1e-6
    (True, True)
    """

    def __init__(
        self,
        prior: RelationsPrior,
        window: int,
        prior_steps: float,
        long_window: int,
        calm: float,
        level: float,
    ) -> None:
        f = len(prior.average_var)
        if f < 2 or len(prior.covariance) not in (f, 2 * f):
            raise ValueError(
                "relations need F average spreads, F >= 2, and a covariance of"
                " the values and their averages, 2F x 2F (or F x F)"
            )
        self.prior_prec = relations_precision(slow_prior(prior.covariance, f))
        self._index, self._upper = packing(2 * f)
        self._prior_packed = self.prior_prec[self._upper].astype(np.float32)
        self._diagonal = np.diagonal(self._index).copy()  # where the triangle keeps P_ii
        # where it keeps each value's entry with its own average, P_fs
        self._value_average = self._index[np.arange(f), np.arange(f) + f]
        self._bound, self._consistency = huber_scatter(2 * f)
        self.window = window
        self._alpha = ewma_alpha(window)
        self._share = ewma_var_share(window)
        self.slow_window = SLOW_WINDOWS * window
        self._slow_alpha = ewma_alpha(self.slow_window)
        self._slow_share = ewma_var_share(self.slow_window)
        # the prior's spread of each average: the measured one's, by white-noise shares
        measured = np.asarray(prior.average_var) / ewma_var_share(prior.window)
        self.average_sd = np.sqrt(np.maximum(measured * self._share, 1e-12))
        self.slow_sd = np.sqrt(np.maximum(measured * self._slow_share, 1e-12))
        # The two averages ask one question, so they share the check's part of the alert's
        # level, each in proportion to the independent averages it holds (a weighted
        # Bonferroni): the window's 0.89, the slow one's 0.11.
        total = self._share + self._slow_share
        self.weights = (self._share / total, self._slow_share / total)
        self.prior_steps = measured_weight(prior_steps, long_window, float(prior.steps), 2 * f)
        self.long_window = long_window
        # A spread is known as well as the independent averages behind it: the steps it was
        # measured on, then the stream's own, times an average's share of them.
        self.calibration_steps = float(prior.steps)
        self.calm = calm  # a step whose tail is above this is calm (alerts clear above it)
        self.level = level  # a step whose tail is below this raises (the alert's level)

    @staticmethod
    def columns(f: int) -> dict[str, ColumnSpec]:
        if f < 2:  # one sensor has no others to be judged against
            return {}
        return {
            PREFIX + "slow": ((f,), np.float32, math.nan),  # the values' own averages
            PREFIX + "mean": ((2 * f,), np.float32, math.nan),  # of the values and averages
            # the precision's upper triangle (it is symmetric): 2F (2F + 1) / 2 values
            PREFIX + "prec": ((f * (2 * f + 1),), np.float32, math.nan),
            PREFIX + "avg": ((f,), np.float32, math.nan),
            PREFIX + "var": ((f,), np.float32, 1.0),
            PREFIX + "armed": ((), np.int16, ARMED),  # calm samples since the last raise
            # (alerts.raise_once)
            PREFIX + "n": ((), np.float32, 0.0),  # samples taken in
            PREFIX + "learnt": ((), np.float32, math.nan),  # samples the mean learnt
            PREFIX + "away": ((), np.float32, 0.0),  # steps since the check was calm
            # the residuals' slow average and its stream's own spread
            PREFIX + "avg_slow": ((f,), np.float32, math.nan),
            PREFIX + "var_slow": ((f,), np.float32, 1.0),
            PREFIX + "armed_slow": ((), np.int16, ARMED),  # its own raise state
        }

    gap_reset = (
        PREFIX + "slow", PREFIX + "avg", PREFIX + "armed", PREFIX + "away",
        PREFIX + "avg_slow", PREFIX + "armed_slow",
    )  # fmt: skip

    def score(
        self,
        cols: dict[str, np.ndarray],
        x: F64,
        ok: Mask,
        count: np.ndarray,
    ) -> RelationsStep:
        """Score one step of values ``x`` [B, F] (training units): advance each sensor's own
        average and its residual's, and the departure's count. ``count``: the values already
        in each stream's averages. Returns each stream's tail [B], the standardised averages
        [B, F], and what ``learn`` takes from the step."""
        mean, packed, avg, slow = (cols[PREFIX + k] for k in ("mean", "prec", "avg", "slow"))
        x = np.asarray(x, np.float64)
        # A stream's first step, or one whose state is new (a snapshot from before the check,
        # or from a version that kept it in another shape, restores the stream without it):
        # the model's covariance, its own mean, and the part's other columns anew.
        fresh = ok & np.isnan(packed[:, 0])
        if fresh.any():
            packed[fresh] = self._prior_packed
            mean[fresh] = np.concatenate([x[fresh], x[fresh]], axis=1)
            for name, (_, _, fill) in self.columns(x.shape[1]).items():
                if name not in (PREFIX + "prec", PREFIX + "mean"):
                    cols[name][fresh] = fill
            cols[PREFIX + "learnt"][fresh] = 0.0
        n = cols[PREFIX + "n"].astype(np.float64)  # the samples this state has taken in
        every_ok = bool(ok.all())  # the usual step: no masks
        # each value's own average over the window, from the stream's (or the gap's) first
        advance_average(slow, x, ok, self._alpha)
        d = np.concatenate([x, slow], axis=1) - mean
        finite = np.isfinite(d)
        if not every_ok:
            finite &= ok[:, None]
            d[~finite] = 0.0
        elif not finite.all():
            d[~finite] = 0.0
        np.maximum(d, -DEVIATION_BOUND, out=d)  # (np.clip's wrapper costs more than this)
        np.minimum(d, DEVIATION_BOUND, out=d)
        # In the precision's float32: half the memory traffic, ample for a residual. A row
        # not in use is NaN and stays out of the average. The batch's triangles are worked
        # on feature-major ([T, B], ``feature_major``) and copied back only if they learn.
        prec_t = feature_major(packed)
        d_t = np.ascontiguousarray(d.T, np.float32)  # [2F, B]
        u_t = self._times_deviations(prec_t, d_t)  # P d
        diag = prec_t[self._diagonal]
        f = x.shape[1]
        r = _given_the_others(u_t[:f], u_t[f:], diag[:f], prec_t[self._value_average],
                              diag[f:]).T  # fmt: skip
        advance_average(avg, r, ok, self._alpha, count)
        slow_avg = cols[PREFIX + "avg_slow"]
        advance_average(slow_avg, r, ok, self._slow_alpha, count)
        steps = np.maximum(self.calibration_steps, np.minimum(
            self.calibration_steps + n, float(self.long_window)))  # fmt: skip
        tail, z = self._tail(avg, self.average_sd, cols[PREFIX + "var"], self.window,
                             self._share, count, steps, None if every_ok else ok)  # fmt: skip
        slow_tail, slow_z = self._tail(slow_avg, self.slow_sd, cols[PREFIX + "var_slow"],
                                       self.slow_window, self._slow_share, count, steps,
                                       None if every_ok else ok)  # fmt: skip
        # A departure: the steps since the check was last calm. It teaches the covariance
        # none of its steps the check raises at (their tail below the alert's level) until
        # it has lasted as long as what the covariance knew before it began: then it is
        # most of what the covariance knows, what the stream is now.
        memory = float(self.long_window)
        away = cols[PREFIX + "away"]
        evidence = np.minimum(self.prior_steps + n + 1.0, memory)
        departed = (tail < self.level) & (away + away < evidence)
        calm = tail > self.calm
        np.minimum(np.where(calm, 0.0, away + 1.0), memory, out=away, where=ok)
        return RelationsStep(tail, z, ok, n, d, prec_t, d_t, u_t, evidence, calm, departed,
                             slow_tail, slow_z)  # fmt: skip

    def _tail(
        self, avg: np.ndarray, sd: F64, var: np.ndarray, window: int, share: float,
        count: np.ndarray, steps: F64, ok: Mask | None,
    ) -> tuple[F64, F64]:  # fmt: skip
        """Each stream's tail [B] for its residuals' averages ``avg`` [B, F] over ``window``
        steps (the model's spread ``sd``, the stream's own ``var`` in its units), and the
        standardised averages [B, F]. A young average spreads more; z is NaN only on rows not
        in use (no average yet), whose tail is 1 (``ok``; None: every row is in use)."""
        young = average_var_share(window, count + 1) / share
        z: F64 = avg / (sd * np.sqrt(young)[:, None])
        x = np.abs(z) / np.sqrt(var)
        one = student_tail(row_max(x), np.maximum(steps * share, 1.0))
        tail: F64 = np.minimum(1.0, 2.0 * avg.shape[1] * one)
        if ok is not None:
            tail = np.where(ok, tail, 1.0)
        return tail, z

    def learn(self, cols: dict[str, np.ndarray], step: RelationsStep, learn: Mask) -> None:
        """Learn from a scored step, on the rows in ``learn``: the stream's spread of its
        averages from the calm steps, the covariance from all but a departure's raising
        steps, the mean from every step (until the first, it follows the values)."""
        mean, packed, var = cols[PREFIX + "mean"], cols[PREFIX + "prec"], cols[PREFIX + "var"]
        n, d, z, evidence = step.n, step.d, step.z, step.evidence
        memory = float(self.long_window)
        every = bool(learn.all())  # the usual step: whole columns, no masks
        if learn.any():
            rows = slice(None) if every else np.nonzero(learn)[0]
            base = 1.0 / (evidence if every else evidence[rows])
            # each average's spread learns from the steps its own tail calls calm (a drift
            # it took in would hide)
            for spread, zs, calm in ((var, z, step.calm),
                                     (cols[PREFIX + "var_slow"], step.slow_z,
                                      step.slow_tail > self.calm)):  # fmt: skip
                own = spread if every else spread[rows]
                learn_mean_square(own, zs[rows] ** 2, (base * calm[rows])[:, None], VAR_FLOOR)
                if not every:
                    spread[rows] = own
            teach, every_taught = learn, every
            if step.departed.any():
                teach = learn & ~step.departed
                every_taught = bool(teach.all())
            held = self._learn_covariance(packed, step.prec_t, step.d_t, step.u_t, teach,
                                          every_taught, evidence)  # fmt: skip
        else:
            held = np.ones(len(n))
        # the mean: a running mean of the samples past the warm-up, up to long_window,
        # each with its Huber weight for location, the square root of the covariance's;
        # until the first, the values themselves (d is 0 where a row is not ok)
        learnt = cols[PREFIX + "learnt"]
        kept_before = np.isnan(learnt)
        if kept_before.any():
            learnt[kept_before] = n[kept_before]
        follows = learnt == 0.0  # (a first sample learnt is the mean, whatever its weight)
        if every:
            learnt += 1.0
            np.minimum(learnt, memory, out=learnt)
            weight = np.sqrt(held) / learnt
            if follows.any():
                weight[follows] = 1.0
        else:  # (a row not ok has d = 0: whatever its weight, it stays)
            learnt[learn] = np.minimum(learnt[learn] + 1.0, memory)
            weight = np.where(learn, np.sqrt(held) / np.maximum(learnt, 1.0), 0.0)
            weight[follows] = 1.0
        mean += d * weight[:, None]
        taken = np.minimum(n + 1.0, memory)
        ok = step.ok
        if bool(ok.all()):
            cols[PREFIX + "n"][...] = taken
        else:
            cols[PREFIX + "n"][ok] = taken[ok]

    def _times_deviations(self, prec_t: np.ndarray, d_t: np.ndarray) -> np.ndarray:
        """P d [2F, B] from the triangles ``prec_t`` [T, B] and the deviations ``d_t`` [2F,
        B], a block of streams at a time: each block's full matrices [2F, 2F, block] stay
        within GATHER_BYTES, in the cache, where a wide model's whole batch would not."""
        n, b = d_t.shape
        block = max(1, GATHER_BYTES // (n * n * prec_t.itemsize))
        out = np.empty((n, b), np.result_type(prec_t, d_t))
        for lo in range(0, b, block):
            rows = slice(lo, lo + block)
            np.einsum("ijb,jb->ib", prec_t[:, rows][self._index], d_t[:, rows], out=out[:, rows])
        return out

    def _learn_covariance(
        self, packed: np.ndarray, prec_t: np.ndarray, d_t: np.ndarray, u_t: np.ndarray,
        learn: Mask, every: bool, evidence: F64,
    ) -> F64:  # fmt: skip
        """S' = (1 - b) S + b d d^T, b = 1 / evidence; so, with c = b / (1 - b),
        P' = (P - c u u^T / (1 + c d.u)) / (1 - b), u = P d; on the triangles ``prec_t``
        [T, B] (feature-major), copied back into ``packed`` [B, T]. A row that does not learn
        takes b = 0, which leaves it as it was (``every``: all of them learn). Returns each
        row's Huber weight, whether it learns or not (the mean's weight)."""
        b = 1.0 / np.maximum(evidence, 2.0)
        if not every:
            b = np.where(learn, b, 0.0)
        q = np.einsum("ib,ib->b", d_t, u_t)
        # Huber-robust: a sample far from the others (its squared Mahalanobis distance q
        # past the bound) counts for less, so a stream's anomalies do not loosen its relations
        held = scatter_weight(q, self._bound)
        keep = 1.0 - b
        c = b * held / self._consistency / keep
        k = (c / (1.0 + c * q)).astype(np.float32)
        i, j = self._upper
        prec_t -= (u_t * k)[i] * u_t[j]
        prec_t *= (1.0 / keep).astype(np.float32)
        # A precision that lost its positive diagonal to rounding (or a non-finite value,
        # which reaches the diagonal) starts again from the prior.
        positive = prec_t[self._diagonal] > 0
        if not positive.all():
            bad = learn & ~positive.all(axis=0)
            if bad.any():
                prec_t[:, bad] = self._prior_packed[:, None]
        packed[...] = prec_t.T
        return held
