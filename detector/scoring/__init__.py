"""Scoring core: pure numpy over a batch of streams, no I/O, no metrics.

Parts with one concern each, every one declaring the per-stream columns it owns and
keeping scoring apart from learning; :class:`Scorer` composes them:

- ``surprise``: the raw score of x_t under the prediction made at t-1, and each
  feature's part of it;
- ``likelihood``: how far a stream's average surprise lies in the tail of its own
  history, with the model's calibration as the prior;
- ``sensors``: what a one-step predictor cannot see (a stuck sensor, a value beyond
  all seen);
- ``relations``: each sensor against the others' values and their averages (a drift, a broken
  correlation);
- ``onsets``: ``anomaly_score`` marks where an anomaly starts;
- ``alerts``: warm-up, raise, hold, clear;
- ``inputs``: each stream's own input spread, which the model is fed over;
- ``calibration``: the model file's figures of its raw score, the likelihood's prior.
"""

from detector.scoring.calibration import RAW_SCORES, Calibration, RelationsPrior
from detector.scoring.inputs import INPUT_VAR_FLOOR, learn_input_var
from detector.scoring.onsets import ONSET_RED, ONSET_YELLOW, SPATIAL_TAIL
from detector.scoring.scorer import (
    ALERT_STATS,
    SHORT_STATS,
    Scorer,
    ScoringConfig,
    StepScores,
    scorer_column_specs,
    scorer_columns,
    top_features,
)
from detector.scoring.stats import (
    F64,
    ColumnSpec,
    combine_tails,
    ewma_alpha,
    ewma_var_share,
    gaussian_tail,
    huber_consistency,
    log_score,
    short_average,
)
from detector.scoring.surprise import (
    STUDENT_T_DOF,
    error_parts,
    gaussian_nll,
    standardised_errors,
    student_t_score,
)

__all__ = [
    "ALERT_STATS", "F64", "INPUT_VAR_FLOOR", "ONSET_RED", "ONSET_YELLOW", "RAW_SCORES",
    "SHORT_STATS", "SPATIAL_TAIL", "STUDENT_T_DOF", "Calibration", "ColumnSpec",
    "RelationsPrior", "Scorer",
    "ScoringConfig", "StepScores", "combine_tails", "error_parts", "ewma_alpha",
    "ewma_var_share", "gaussian_nll", "gaussian_tail", "huber_consistency", "learn_input_var",
    "log_score", "scorer_column_specs", "scorer_columns", "short_average",
    "standardised_errors", "student_t_score", "top_features",
]  # fmt: skip
