"""The score calibration a model file carries: plain data, no I/O.

:class:`Calibration` is read from the artifact's metadata (``detector.artifact``) and
written by the trainer; the scorer's likelihood takes it as its prior. It lives here, in
the scoring core, so the core needs no module that reads files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# The raw scores a calibration can be of (detector.scoring.surprise computes each).
RAW_SCORES: Final = ("student_t", "gaussian_nll")


@dataclass(frozen=True)
class RelationsPrior:
    """How the sensors of one held-out stream relate, measured at training: the prior of
    ``detector.scoring.relations``.

    ``covariance`` [F][F]: of the normalised inputs about each stream's own mean, pooled over
    the held-out streams. ``average_var`` [F]: how far the average over ``window`` steps of
    each sensor's residual given the others strays, measured over ``steps`` steps.
    """

    covariance: list[list[float]]
    window: int
    average_var: list[float]
    steps: int


@dataclass(frozen=True)
class Calibration:
    """The raw score on held-out normal data, streamed like the daemon.

    ``window_mean``/``window_std`` describe the short-term average of the raw
    score over ``window`` steps: the prior of each stream's anomaly likelihood.
    ``raw_score`` names the raw score these figures are of, and so the one the daemon
    computes for this model (see :data:`RAW_SCORES`); files without it mean the Gaussian
    NLL, the raw score of the first releases. ``level_std`` says how much streams differ:
    the spread of the held-out streams' mean raw scores about one another, less what their
    own sampling noise explains, and at least what their number can tell from none (0 when
    the calibration saw one stream), measured on
    ``level_streams`` streams (0: not recorded, as in files before it).
    ``relations`` is the prior of the relations check (:class:`RelationsPrior`).
    ``tail_rate`` and ``tail_excess`` are the per-step check's prior, per feature: the share
    of held-out standardised errors beyond 3 and their mean excess of x^2 / 2
    (``detector.scoring.surprise.tail_prior``); None in files before it (a Gaussian's).
    ``error_lag`` is, per feature, the lag-one autocorrelation of the held-out standardised
    errors (``detector.scoring.surprise.error_lag``), which the surprise takes out of each
    step's error for the per-step check: the tail above is of the errors so whitened (the
    innovations), the raw scores of the errors. None in files before it (errors taken as
    they come). ``settle_steps`` is how many steps the
    network takes to settle from a cold start (its predictions within a tenth of a spread of
    a warm start's, on the held-out streams): the daemon's warm-up. None where it was not
    measured (a file before it, or a calibration without a warm start to compare with).
    """

    n: int
    mean: float
    std: float
    quantiles: dict[str, float]  # "0.5", "0.9", "0.99", "0.999" -> raw score
    window: int
    window_mean: float
    window_std: float
    threshold: float  # default anomaly-likelihood threshold for this model
    raw_score: str = "gaussian_nll"
    level_std: float = 0.0  # how far the held-out streams' own levels of the raw score lie
    # apart, beyond what sampling explains: 0 for one stream (or a file without it)
    level_streams: int = 0  # the held-out streams level_std was measured on
    relations: RelationsPrior | None = None  # how the sensors relate (None: one sensor, or a
    # file from before the relations check)
    tail_rate: list[float] | None = None  # per feature: held-out errors beyond 3 spreads
    tail_excess: list[float] | None = None  # ... and their mean excess of x^2 / 2
    error_lag: list[float] | None = None  # per feature: the errors' lag-one autocorrelation
    settle_steps: int | None = None  # steps a cold start takes to settle: the warm-up


def measured_weight(prior_steps: float, long_window: int, measured: float, dim: int) -> float:
    """How many of a stream's own samples a spread the model measured on held-out data (of
    ``dim`` variables) counts as. For a model of one stream (``prior_steps``, the
    likelihoods' weight, is ``long_window``), the samples of that stream it was measured on
    (``measured``). For a fleet's, whose machines each differ in it (their noise, the
    coefficients of their relations), the weakest proper prior of a covariance of ``dim``
    variables, an inverse Wishart's least degrees of freedom, dim + 1: each stream's own
    samples take over from the first. Never more than ``prior_steps``.

    >>> measured_weight(8000.0, 8000, 341.0, 8), measured_weight(263.0, 8000, 31528.0, 8)
    (341.0, 9.0)
    >>> measured_weight(263.0, 8000, 6400.0, 1)
    2.0
    """
    if prior_steps >= long_window:
        return float(min(prior_steps, measured))
    return float(min(prior_steps, dim + 1))
