"""The scorer's pure maths: tail probabilities, exponential averages, the log score.

Every function takes and returns numpy arrays (or floats) and keeps no state.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
ColumnSpec = tuple[tuple[int, ...], type, float]  # trailing shape, dtype, initial value

ROBUST_CLIP: Final = 1.5  # learnt spreads take deviations clipped at this many spreads (Huber)
LOG_SCORE_DECADES: Final = 16.0  # tail probabilities down to 1e-16 map onto [0, 1]


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


def student_tail(t: np.ndarray, dof: np.ndarray | float) -> F64:
    """Upper tail probability of Student's t with ``dof`` degrees of freedom (any positive
    number; infinite: the Gaussian's), through Wallace's (1959) normal approximation
    z = (8 dof + 1) / (8 dof + 3) sqrt(dof log(1 + t^2 / dof)), within a few per cent of the
    exact tail for 7 or more degrees of freedom and within a fifth for 3.

    >>> tails = student_tail(np.array([0.0, 2.0, 2.0]), np.array([5, 7, np.inf]))
    >>> [round(float(v), 4) for v in tails]
    [0.5, 0.0429, 0.0228]
    """
    x = np.asarray(t, np.float64)
    nu = np.asarray(dof, np.float64)
    finite = nu < 1e9  # beyond, the t is the Gaussian to float precision
    every = bool(finite.all())  # the usual call: no Gaussian among them, no masks
    safe = nu if every else np.where(finite, nu, 1.0)
    with np.errstate(invalid="ignore"):
        eight = 8.0 * safe
        wallace = (eight + 1.0) / (eight + 3.0) * np.sqrt(safe * np.log1p(x * x / safe))
    z = np.copysign(wallace, x) if every else np.where(finite, np.copysign(wallace, x), x)
    return gaussian_tail(z)


def log_score(tail: np.ndarray) -> F64:
    """Anomaly score in [0, 1] from a tail probability: -log10(tail) / 16.

    The likelihood 1 - tail crowds against 1 (0.9999 and 0.99999999 print alike); its
    logarithm keeps the resolution a threshold search needs (HTM's log-likelihood idea).

    >>> log_score(np.array([1.0, 1e-4, 1e-16, 1e-30])).tolist()
    [0.0, 0.25, 1.0, 1.0]
    """
    with np.errstate(divide="ignore"):
        score = np.log10(np.asarray(tail, np.float64))
    score /= -LOG_SCORE_DECADES
    # np.clip's own wrapper costs more than its arithmetic at a batch's size
    np.maximum(score, 0.0, out=score)
    np.minimum(score, 1.0, out=score)
    score += 0.0  # no -0.0
    out: F64 = score
    return out


def row_max(x: np.ndarray) -> npt.NDArray[Any]:
    """The largest value of each row of ``x`` [B, F], as ``np.max(x, axis=-1)`` gives it (NaN
    included): reduced over a feature-major copy, so numpy's inner loop runs along the batch.
    Along rows as short as a stream's sensors its reduction is several times slower.

    >>> row_max(np.array([[1.0, 3.0], [2.0, -1.0]])).tolist()
    [3.0, 2.0]
    """
    out: npt.NDArray[Any] = np.ascontiguousarray(np.asarray(x).T).max(axis=0)
    return out


def row_min(x: np.ndarray) -> npt.NDArray[Any]:
    """The smallest value of each row of ``x`` [B, F], as :func:`row_max`."""
    out: npt.NDArray[Any] = np.ascontiguousarray(np.asarray(x).T).min(axis=0)
    return out


def row_any(x: np.ndarray) -> Mask:
    """Whether any value of each row of the mask ``x`` [B, F] is set, as :func:`row_max`."""
    out: Mask = np.asarray(np.ascontiguousarray(np.asarray(x).T).any(axis=0))
    return out


def combine_tails(*tails: np.ndarray) -> F64:
    """The tail of the most surprising of several signals, corrected for looking at
    several (Bonferroni): min(1, m * min(tails)). No signal needs a threshold of its own.

    >>> combine_tails(np.array([1e-9, 0.5]), np.array([0.2, 1e-3])).tolist()
    [2e-09, 0.002]
    """
    lowest = np.minimum(tails[0], tails[1]) if len(tails) > 1 else np.array(tails[0], np.float64)
    for tail in tails[2:]:  # pairwise: no stacked copy of the tails
        np.minimum(lowest, tail, out=lowest)
    lowest *= len(tails)
    out: F64 = np.minimum(lowest, 1.0, out=lowest)
    return out


def ewma_alpha(window: int) -> float:
    """Smoothing factor of an exponential average whose centre of mass matches a window.

    >>> ewma_alpha(1)
    1.0
    """
    return 2.0 / (window + 1.0)


def ewma_var_share(window: int) -> float:
    """Variance of an exponential average of independent unit-variance values: also the
    share of a stream's steps that count as independent evidence about that average.

    >>> ewma_var_share(1)
    1.0
    """
    a = ewma_alpha(window)
    return a / (2.0 - a)


def advance_average(
    avg: F64, x: F64, ok: Mask, alpha: float, count: np.ndarray | None = None
) -> None:
    """One step of exponential averages, in place: for the streams in ``ok``, the first value
    starts the average (NaN: none yet), later ones move it ``alpha`` of the way. ``avg`` and
    ``x`` are [B] or [B, F] (a row of F averages that start together). ``count`` [B]: the
    values already in each average; while they are fewer than the window the average is
    their plain mean (step 1 / (count + 1)), so its first value does not weigh on it for long.

    >>> avg = np.array([np.nan, 2.0])
    >>> advance_average(avg, np.array([4.0, 4.0]), np.ones(2, np.bool_), 0.5)
    >>> avg.tolist()
    [4.0, 3.0]
    >>> avg, ok = np.array([2.0]), np.ones(1, bool)
    >>> advance_average(avg, np.array([5.0]), ok, 0.1, count=np.array([2]))
    >>> avg.tolist()
    [3.0]
    """
    empty = np.isnan(avg if avg.ndim == 1 else avg[:, 0])  # a row's averages start together
    upd = ok
    if empty.any():
        first = ok & empty
        avg[first] = x[first]
        upd = ok & ~first
    every = bool(upd.all())  # the usual step: every stream moves, no copies
    if count is None:
        step: float | F64 = alpha
    else:
        step = np.maximum(alpha, 1.0 / (np.asarray(count, np.float64) + 1.0))
        if not every:
            step = step[upd]
        if avg.ndim > 1:
            step = step[:, None]
    if every:
        avg += step * (x - avg)
    else:
        avg[upd] += step * (x[upd] - avg[upd])


def average_var_share(window: int, count: np.ndarray) -> F64:
    """Variance of the average ``advance_average`` keeps, over that of one value, once it
    holds ``count`` independent values: 1 / count while it is a plain mean, then the
    exponential average's share.

    >>> average_var_share(20, np.array([1, 4, 1000])).round(4).tolist()
    [1.0, 0.25, 0.05]
    """
    out: F64 = np.maximum(
        ewma_var_share(window), 1.0 / np.maximum(np.asarray(count, np.float64), 1.0)
    )
    return out


def short_average(raw: np.ndarray, window: int) -> F64:
    """The trailing average the scorer keeps (``advance_average`` with its count), over a
    whole series: a plain mean of the first values, then an exponential average.

    >>> short_average(np.array([1.0, 1.0, 4.0]), 1).tolist()
    [1.0, 1.0, 4.0]
    >>> short_average(np.array([1.0, 3.0, 5.0]), 5).tolist()
    [1.0, 2.0, 3.0]
    """
    alpha = ewma_alpha(window)
    out = np.empty(len(raw), dtype=np.float64)
    acc = math.nan
    for i, value in enumerate(np.asarray(raw, dtype=np.float64)):
        acc = value if math.isnan(acc) else acc + max(alpha, 1.0 / (i + 1)) * (value - acc)
        out[i] = acc
    return out


@functools.cache  # a handful of clips, asked for every step
def huber_consistency(clip: float) -> float:
    """E[min(x^2, clip^2)] for x ~ N(0, 1): where a mean square of unit Gaussian values,
    each clipped at ``clip``, settles. Dividing by it makes the clipped estimate consistent.

    >>> round(huber_consistency(1.5), 4), round(huber_consistency(40.0), 4)
    (0.7785, 1.0)
    """
    inside = math.erf(clip / math.sqrt(2.0))
    density = math.exp(-0.5 * clip * clip) / math.sqrt(2.0 * math.pi)
    return inside - 2.0 * clip * density + clip * clip * (1.0 - inside)


def chi2_even_sf(x: float, dof: int) -> float:
    """P(X > x) for X ~ chi^2 with an even ``dof``: exp(-x / 2) sum_{j < dof / 2} (x / 2)^j / j!.

    >>> round(chi2_even_sf(2.0, 2), 4), round(chi2_even_sf(0.0, 16), 4)
    (0.3679, 1.0)
    """
    half, term, total = 0.5 * x, 1.0, 0.0
    for j in range(dof // 2):
        if j:
            term *= half / j
        total += term
    return math.exp(-half) * total


def huber_scatter(dim: int, clip: float = ROBUST_CLIP) -> tuple[float, float]:
    """For a Huber-robust covariance of ``dim`` (even) variables, each sample's outer product
    weighted min(1, k / q), q its squared Mahalanobis distance: the bound k, where as large a
    share of Gaussian samples is held back as a clip at ``clip`` holds back of one variable
    (so ROBUST_CLIP stays the one setting), and E[min(q, k)] / dim, which makes the estimate
    consistent as huber_consistency does.

    >>> k, c = huber_scatter(2, 40.0); round(c, 4)
    1.0
    """
    share = math.erfc(clip / math.sqrt(2.0))  # of one variable's values beyond the clip
    lo, hi = 0.0, 10.0 * dim + 100.0
    for _ in range(200):  # bisection: chi2_even_sf(k, dim) = share
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if chi2_even_sf(mid, dim) > share else (lo, mid)
    k = 0.5 * (lo + hi)
    # E[q; q <= k] = dim P(chi^2_{dim + 2} <= k)
    consistency = (1.0 - chi2_even_sf(k, dim + 2)) + k / dim * chi2_even_sf(k, dim)
    return k, consistency


def scatter_weight(q: np.ndarray, bound: float) -> F64:
    """Each sample's weight in a Huber-robust covariance (:func:`huber_scatter`): min(1, k / q)
    for its squared Mahalanobis distance ``q`` and the bound k.

    >>> scatter_weight(np.array([1.0, 40.0]), 20.0).tolist()
    [1.0, 0.5]
    """
    out: F64 = np.minimum(1.0, bound / np.maximum(q, 1e-12))
    return out


def learn_mean_square(
    var: np.ndarray, sq: np.ndarray, alpha: float | np.ndarray, floor: float,
    clip: float = ROBUST_CLIP,
) -> None:  # fmt: skip
    """One step of a Huber-robust mean square, in place: ``var`` moves by ``alpha`` towards
    ``sq``, each value clipped at ``clip``^2 ``var`` and divided by huber_consistency(clip)
    (so Gaussian values settle at their variance), and stays at or above ``floor``.

    >>> v = np.ones(2); learn_mean_square(v, np.array([0.0, 100.0]), 0.5, 1e-2)
    >>> [round(float(a), 4) for a in v]
    [0.5, 1.9452]
    """
    step = np.minimum(sq, clip * clip * var)
    step /= huber_consistency(clip)
    step -= var
    step *= alpha
    var += step
    np.maximum(var, floor, out=var)
