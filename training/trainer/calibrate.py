"""Score calibration: the raw-score distribution of held-out normal data, streamed.

The exported step runs in onnxruntime over each held-out stream from a zero state,
feeding its state back exactly as the daemon does; every step after the burn-in is
scored with the raw score :data:`RAW_SCORE` (the sum of :func:`detector.scoring.error_parts`)
against the previous prediction, and its short-term average with
:func:`detector.scoring.short_average` over the daemon's default short window.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import onnx

from detector.artifact import Normalisation
from detector.errors import DataError
from detector.scoring import (
    Calibration,
    RelationsPrior,
    ScoringConfig,
    error_parts,
    ewma_alpha,
    ewma_var_share,
    short_average,
)
from detector.scoring.relations import relation_residuals, relations_precision
from detector.scoring.stats import advance_average, huber_scatter, scatter_weight
from detector.scoring.surprise import error_lag, standardised_errors, tail_prior, whiten
from training.trainer.export import make_session, onnx_rollout

log = logging.getLogger(__name__)

QUANTILES = ("0.5", "0.9", "0.99", "0.999")
DEFAULT_WINDOW = ScoringConfig().short_window
FOLDS: Final = 5  # the relations' spreads are measured out of fold (relations_prior)
ALERT_WINDOW = ScoringConfig().alert_window  # the relations check's average: the alerts'
RAW_SCORE = "student_t"  # what the calibration describes, and so what the daemon computes
DEFAULT_THRESHOLD = 0.9999
MIN_STD = 1e-6  # the daemon refuses a calibration whose window_std is not positive


def predictions(
    proto: onnx.ModelProto | bytes, streams: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The streams side by side (B, T, F; :func:`side_by_side`) and the exported step's
    predictions over them, stepped from a zero state: (x, mean, log_var)."""
    x = side_by_side(streams)
    mean, log_var, _ = onnx_rollout(make_session(proto), x)
    return x, mean, log_var


def stream_errors(
    norm: Normalisation, streams: Sequence[np.ndarray], x: np.ndarray, mean: np.ndarray,
    log_var: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Per stream, the raw score per step and the standardised errors [T, F] (NaN at step
    0, which has no prediction), from the streams' :func:`predictions` (x, mean, log_var); a
    short stream is scored only to its end."""
    # The daemon normalises in float64 with a reciprocal; so do we.
    z = (x - np.asarray(norm.centre)) * (1.0 / np.asarray(norm.scale))  # (B, T, F)
    out = []
    for b, n in enumerate(len(s) for s in streams):
        raw = np.full(n, np.nan)
        errors = np.full((n, x.shape[2]), np.nan)
        if n > 1:
            errors[1:] = standardised_errors(z[b, 1:n], mean[b, : n - 1], log_var[b, : n - 1])
            raw[1:] = np.sum(error_parts(errors[1:], RAW_SCORE), axis=-1)  # as the daemon sums
        out.append((raw, errors))
    return out


# A cold start has settled where its predictions stay within this many of the warm
# predictions' spreads: a bias of a tenth of a spread adds a hundredth to the errors' variance.
SETTLED: Final = 0.1


def settle_steps(
    proto: onnx.ModelProto | bytes,
    streams: Sequence[np.ndarray],
    score_from: Sequence[int],
    warm: tuple[np.ndarray, np.ndarray],
) -> int | None:
    """How long the network takes to settle from a cold start: each held-out part (stream
    ``i`` from row ``score_from[i]``) stepped from a zero state beside the same rows stepped
    warm, at the end of its whole stream (``warm``: the mean and log-variance of the whole
    streams' :func:`predictions`); the first step after which every feature's cold
    prediction stays within SETTLED of the warm one's spreads (mean square over the
    streams; a held-out part of fewer than two rows says nothing). A network that has not
    settled by the end of the held-out parts counts their length, with a warning. What the
    daemon's warm-up waits (``Calibration.settle_steps``); None without a held-out part."""
    kept = [b for b, (s, i) in enumerate(zip(streams, score_from, strict=True)) if len(s) - i >= 2]
    if not kept:
        return None
    parts = [np.asarray(streams[b], np.float64)[score_from[b] :] for b in kept]
    _, cold, _ = predictions(proto, parts)
    warm_mean, warm_lv = warm
    steps = cold.shape[1]
    total = np.zeros((steps, cold.shape[2]))
    count = np.zeros(steps)
    for k, (b, part) in enumerate(zip(kept, parts, strict=True)):
        n, start = len(part), score_from[b]
        spread = np.exp(0.5 * warm_lv[b, start : start + n].astype(np.float64))
        total[:n] += ((cold[k, :n] - warm_mean[b, start : start + n]) / spread) ** 2
        count[:n] += 1
    off = np.flatnonzero((total / np.maximum(count, 1)[:, None]).max(axis=1) > SETTLED**2)
    settle = 0 if len(off) == 0 else int(off[-1]) + 1
    if settle >= steps:
        log.warning(
            "the network had not settled from a cold start by the end of the %d held-out"
            " steps: new streams wait that long before they may alert ([scoring]"
            " warmup_steps sets it)", steps,
        )  # fmt: skip
    return settle


def side_by_side(streams: Sequence[np.ndarray]) -> np.ndarray:
    """Streams [T_i, F] as one batch (B, T, F), a short one padded with its last row.

    >>> side_by_side([np.zeros((1, 1)), np.ones((2, 1))])[:, :, 0].tolist()
    [[0.0, 0.0], [1.0, 1.0]]
    """
    steps = max(len(s) for s in streams)
    return np.stack([
        np.pad(np.asarray(s, np.float64), ((0, steps - len(s)), (0, 0)), mode="edge")
        for s in streams
    ])  # fmt: skip


def innovations(errors: np.ndarray, lag: Sequence[float] | None) -> np.ndarray:
    """A stream's standardised errors [T, F] less what each last one foretells
    (``detector.scoring.surprise.whiten``, the last error in float32 as the daemon keeps
    it; the errors as they are without ``lag``): what the per-step check judges."""
    if lag is None or len(errors) < 2:
        return errors
    out = errors.copy()
    out[1:] = whiten(errors[1:], errors[:-1].astype(np.float32), np.asarray(lag))
    return out


def relations_prior(
    norm: Normalisation, streams: Sequence[np.ndarray], burn_in: int, window: int
) -> RelationsPrior | None:
    """What the relations check (:mod:`detector.scoring.relations`) takes as its prior, from
    held-out streams (raw units, each from ``burn_in`` on); None for a single feature.

    - The covariance [2F, 2F] of the normalised inputs and their averages over ``window``
      steps, about each stream's own mean, pooled over the streams: how the sensors of one
      stream move together, not how streams differ. Huber-robust (``robust_covariance``),
      as the daemon learns it.
    - Per feature, the variance of the average over ``window`` steps of the residual given
      the others' values and averages, taken as the daemon takes it (about the stream's
      running mean, with a covariance that has not seen the step: out of fold), and the
      steps it was measured on.

    >>> t = np.arange(400.0)
    >>> x = np.stack([np.sin(t / 9), 2 * np.sin(t / 9) + 5], axis=1)
    >>> rel = relations_prior(Normalisation([0.0, 5.0], [1.0, 2.0]), [x, x], 0, 20)
    >>> cov = np.array(rel.covariance)
    >>> cov.shape, np.round(cov[:2, :2] / cov[0, 0], 2).tolist(), rel.steps
    ((4, 4), [[1.0, 1.0], [1.0, 1.0]], 758)
    """
    scale = 1.0 / np.asarray(norm.scale, np.float64)
    f = len(scale)
    if f < 2:
        return None
    parts = [
        (np.asarray(s, np.float64)[burn_in:] - np.asarray(norm.centre)) * scale for s in streams
    ]
    parts = [z for z in parts if len(z) > window + 1]
    if not parts:
        raise DataError(f"no held-out stream is longer than {burn_in + window + 1} steps")
    # the values beside their own averages over the window, as the daemon keeps them
    parts = [np.concatenate([z, slow_averages(z, window)], axis=1) for z in parts]
    within = np.concatenate([y - y.mean(axis=0) for y in parts])
    cov = robust_covariance(within, len(parts))
    # Each step's residual is taken with a covariance measured without the rows around it
    # (the rows in FOLDS blocks, each left out in turn), as the daemon meets steps its
    # covariance has not seen: a covariance fitted to the same rows explains part of their
    # slow wander (the averages' relations rest on few independent values), and would
    # promise a spread that new data does not keep.
    bounds = np.linspace(0, len(within), FOLDS + 1).astype(int)
    fold = np.searchsorted(bounds, np.arange(len(within)), side="right") - 1
    precs = []
    for k in range(FOLDS):
        rest = within[fold != k]
        precs.append(relations_precision(robust_covariance(rest, len(parts))))
    averages, start = [], 0
    for y in parts:
        running = np.cumsum(y, axis=0) / np.arange(1, len(y) + 1)[:, None]
        d = y[1:] - running[:-1]  # each step against the mean of the steps before it
        folds_here = fold[start + 1 : start + len(y)]
        start += len(y)
        r = np.empty((len(d), f))
        for k in np.unique(folds_here):
            mine = folds_here == k
            r[mine] = relation_residuals(precs[k][None], d[mine])
        averages.append(np.stack([short_average(r[:, i], window) for i in range(f)], 1)[window:])
    avg = np.concatenate(averages)
    return RelationsPrior(
        covariance=[[float(v) for v in row] for row in cov],
        window=window,
        average_var=[float(v) for v in np.mean(avg**2, axis=0)],
        steps=len(avg),
    )


def robust_covariance(rows: np.ndarray, means: int, rounds: int = 20) -> np.ndarray:
    """The covariance of ``rows`` [N, D] (deviations from ``means`` means taken out), Huber
    robust as the daemon learns it (``detector.scoring.stats.huber_scatter``): each row
    weighted min(1, k / q), q its squared Mahalanobis distance, to the fixed point.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((4000, 2)) * [1.0, 2.0]
    >>> x[:40] = 50.0  # a few gross outliers
    >>> np.round(np.sqrt(np.diag(robust_covariance(x, 0))), 1).tolist()
    [1.0, 2.0]
    """
    bound, consistency = huber_scatter(rows.shape[1])
    dof = max(len(rows) - means, 1)
    cov = rows.T @ rows / dof
    for _ in range(rounds):
        prec = relations_precision(cov)
        held = scatter_weight(np.einsum("ni,ij,nj->n", rows, prec, rows), bound)
        cov = (rows * (held / consistency)[:, None]).T @ rows / dof
    return cov


def slow_averages(z: np.ndarray, window: int) -> np.ndarray:
    """Each column's exponential average over ``window`` steps, from its first value, as
    ``detector.scoring.relations`` keeps it.

    >>> slow_averages(np.array([[0.0], [3.0], [3.0]]), 2).round(2).tolist()
    [[0.0], [2.0], [2.67]]
    """
    alpha, one = ewma_alpha(window), np.ones(1, np.bool_)
    z = np.asarray(z, np.float64)
    out = np.empty_like(z)
    acc = np.full((1, z.shape[1]), np.nan)
    for i in range(len(z)):
        advance_average(acc, z[i : i + 1], one, alpha)
        out[i] = acc[0]
    return out


# A feature whose held-out rows spread less than this share of the training rows' spread
# makes ``train`` warn: the calibration describes a quieter stretch than the data.
QUIET_SHARE: Final = 0.25


def quiet_features(
    train: Sequence[np.ndarray], held_out: Sequence[np.ndarray], features: Sequence[str]
) -> list[str]:
    """The features whose held-out rows (raw units) spread less than QUIET_SHARE of the
    training rows' (each about its own stream's mean, pooled over the streams). The
    calibration is measured on the held-out rows: a routine event they never show (a working
    day's start, when the data ends on a weekend) is news to it, and alerts in a stream's
    first days until the stream has learnt it.

    >>> t = np.arange(200.0)
    >>> busy = np.stack([np.sin(t / 5), np.sin(t / 5)], axis=1)
    >>> quiet_features([busy], [busy[:50] * [1.0, 0.1]], ["a", "b"])
    ['b']
    """
    out = []
    for j, name in enumerate(features):
        trained = within_std([np.asarray(s, np.float64)[:, j] for s in train if len(s)])
        held = within_std([np.asarray(s, np.float64)[:, j] for s in held_out if len(s)])
        if held < QUIET_SHARE * trained:
            out.append(name)
    return out


def within_std(parts: Sequence[np.ndarray]) -> float:
    """The spread of values about their own stream's mean, pooled over streams.

    A model may serve many streams whose scores sit at different levels; what the prior
    has to say is how far a stream's score moves about its own level, and pooling the
    values of all streams would add the differences between the levels to that.

    >>> within_std([np.array([0.0, 2.0]), np.array([10.0, 12.0])])
    1.0
    """
    sq = sum(float(np.sum((p - p.mean()) ** 2)) for p in parts)
    return float(np.sqrt(sq / sum(len(p) for p in parts)))


def average_std(
    raw_parts: Sequence[np.ndarray], avg_parts: Sequence[np.ndarray], window: int
) -> float:
    """The spread of the short average about each stream's level: measured, but never below
    what independent steps would give, within_std(raw) * sqrt(a / (2 - a)).

    A held-out tail is short (on NAB 150 steps, a handful of windows of 20), so the measured
    spread of its average is a noisy figure that falls low as often as high; the raw score's
    own spread is measured on every step. Scores that follow one another make the average
    spread more, not less, than independent ones: the floor is a lower bound
    (``docs/quality-notes.md`` has what it measured).

    >>> round(average_std([np.array([0.0, 2.0] * 50)], [np.full(100, 1.0)], 3), 3)
    0.577
    """
    independent = within_std(raw_parts) * math.sqrt(ewma_var_share(window))
    return max(within_std(avg_parts), independent)


def level_std(
    raw_parts: Sequence[np.ndarray], avg_parts: Sequence[np.ndarray], window: int
) -> float:
    """How far streams' own levels (their mean raw scores) lie apart, beyond what each
    level's sampling noise explains: sqrt(var(levels) - mean noise), and no less than what k
    streams can tell from none, the standard error of that difference when the levels are
    alike, sqrt(2 / (k - 1)) mean noise: a few streams whose levels agree within their noise
    do not show that a fleet's streams are alike, and a spread of 0 would make the model's
    calibration outweigh each stream's own evidence for its whole life. 0 for one stream.

    A level's noise is var(raw) / n, widened by how much more its short average spreads than
    independent steps would make it (scores that follow one another carry less evidence).

    >>> level_std([np.zeros(100), np.full(100, 2.0)], [np.zeros(100), np.full(100, 2.0)], 5)
    1.4142135623730951
    >>> level_std([np.arange(100.0)], [np.arange(100.0)], 5)
    0.0
    >>> rng = np.random.default_rng(0)
    >>> alike = [rng.normal(size=400) for _ in range(8)]
    >>> 0.0 < level_std(alike, alike, 1) < 0.05
    True
    """
    if len(raw_parts) < 2:
        return 0.0
    share = ewma_var_share(window)
    levels, noise = [], []
    for raw, avg in zip(raw_parts, avg_parts, strict=True):
        var = float(raw.var())
        widen = max(1.0, float(avg.var()) / (var * share)) if var > 0 else 1.0
        levels.append(float(raw.mean()))
        noise.append(var * widen / len(raw))
    between = float(np.var(levels, ddof=1)) - float(np.mean(noise))
    resolved = math.sqrt(2.0 / (len(levels) - 1)) * float(np.mean(noise))
    return math.sqrt(max(between, resolved))


def first_counted(i: int, burn_in: int, score_from: Sequence[int] | None) -> int:
    """Where stream ``i``'s counted steps start, in its scores from step 1 on: after the
    burn-in, and within its held-out part when ``score_from`` says where that starts."""
    return burn_in if score_from is None else max(burn_in, score_from[i] - 1)


def summarise(
    scores: Sequence[np.ndarray],
    burn_in: int,
    window: int = DEFAULT_WINDOW,
    threshold: float = DEFAULT_THRESHOLD,
    score_from: Sequence[int] | None = None,
) -> Calibration:
    """Pool raw scores and their short averages after ``burn_in`` steps into a Calibration.

    ``score_from``: per stream, the first step whose score counts (the held-out part of a
    stream stepped from its start, so the state there is warm as in the daemon); at least
    ``burn_in + 1``."""
    raw_parts, avg_parts = [], []
    for i, raw in enumerate(scores):
        first = first_counted(i, burn_in, score_from)
        if len(raw) <= first + 1:
            continue
        # The daemon's short average starts at the first scored step, before any warm-up.
        avg = short_average(raw[1:], window)
        raw_parts.append(raw[1:][first:])
        avg_parts.append(avg[first:])
    if not raw_parts:
        raise DataError(f"no held-out stream is longer than the burn-in of {burn_in} steps")
    raw_all = np.concatenate(raw_parts)
    avg_all = np.concatenate(avg_parts)
    if not np.isfinite(raw_all).all():
        raise DataError("the model scores some held-out steps as non-finite")
    qs = np.quantile(raw_all, [float(q) for q in QUANTILES])
    return Calibration(
        n=int(raw_all.size),
        mean=float(raw_all.mean()),
        std=max(float(raw_all.std()), MIN_STD),
        quantiles={q: float(v) for q, v in zip(QUANTILES, qs, strict=True)},
        window=window,
        window_mean=float(avg_all.mean()),
        window_std=max(average_std(raw_parts, avg_parts, window), MIN_STD),
        threshold=threshold,
        raw_score=RAW_SCORE,
        level_std=level_std(raw_parts, avg_parts, window),
        level_streams=len(raw_parts),
    )


def calibrate(
    proto: onnx.ModelProto | bytes,
    norm: Normalisation,
    streams: Sequence[np.ndarray],
    burn_in: int,
    window: int = DEFAULT_WINDOW,
    threshold: float = DEFAULT_THRESHOLD,
    score_from: Sequence[int] | None = None,
) -> Calibration:
    """Calibration of the exported step over ``streams`` (raw units, gaps filled), each
    scored from ``score_from`` on (see :func:`summarise`)."""
    x, mean, log_var = predictions(proto, streams)
    scored = stream_errors(norm, streams, x, mean, log_var)
    # the steps the calibration counts, of each stream's errors (step 0 has none)
    counted = [e[1:][first_counted(i, burn_in, score_from) :] for i, (_, e) in enumerate(scored)]
    lag = error_lag(counted) if any(len(e) > 1 for e in counted) else None
    scores = [raw for raw, _ in scored]
    # the per-step check's tail: of the innovations, on the steps the calibration counts
    errors = np.concatenate([
        innovations(e, lag)[1:][first_counted(i, burn_in, score_from) :]
        for i, (_, e) in enumerate(scored)
    ])  # fmt: skip
    rate, excess = tail_prior(errors)
    calibration = dataclasses.replace(
        summarise(scores, burn_in, window, threshold, score_from),
        relations=relations_prior(norm, streams, burn_in, ALERT_WINDOW),
        tail_rate=rate,
        tail_excess=excess,
        error_lag=lag,
        settle_steps=(None if score_from is None else settle_steps(
            proto, streams, score_from, (mean, log_var))),
    )  # fmt: skip
    log.debug(
        "calibration over %d steps: raw score mean %.3f sd %.3f",
        calibration.n,
        calibration.mean,
        calibration.std,
    )
    return calibration
