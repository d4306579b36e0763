"""The scorer: the parts composed into one step of many streams.

Per step of B streams: input scaling (what the model is fed, an outlier held back),
surprise (the raw score under the prediction made before), two likelihoods of it (a short
average for ``anomaly_score``, a longer one for alerts), the per-step (each sample, and each
pair of samples) and stuck-sensor checks, the range check, onset marking, and the alert
state machine. The alert's likelihood is that of
the most surprising of its signals (``combine_tails``). One set of defaults serves a model
per stream and a model shared by a fleet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from detector.scoring.alerts import Alerts, raise_once
from detector.scoring.calibration import Calibration, measured_weight
from detector.scoring.inputs import InputScale, within_tail
from detector.scoring.likelihood import Likelihood, prior_steps
from detector.scoring.onsets import Onsets
from detector.scoring.relations import Relations
from detector.scoring.sensors import Range, Stuck
from detector.scoring.stats import F64, ColumnSpec, combine_tails, log_score
from detector.scoring.surprise import (
    TAIL_FROM,
    StepTail,
    Surprise,
    standardised_errors,
    tail_bound,
)


@dataclass(frozen=True)
class ScoringConfig:
    """How raw scores become likelihoods and alerts; one setting serves every stream."""

    warmup_steps: int = -1  # steps scored before a stream may alert (-1: as long as the
    # network takes to settle from a cold start, its calibration says, and at least
    # FALLBACK_WARMUP)
    short_window: int = 20  # steps in the average of the raw score that anomaly_score shows
    alert_window: int = 50  # steps in the average the alert rule watches (0: the short one):
    # an alert is for a condition that lasts, the score marks where one starts
    long_window: int = 8000  # steps of memory of each stream's long-run statistics
    step_check: bool = True  # alerts also watch each sample's own error and each pair's
    # (spikes, jumps)
    stuck_check: bool = True  # alerts also watch for a sensor repeating its last reading
    relations_check: bool = True  # alerts also watch each sensor against the others at the
    # same step (a drift, a broken correlation); needs 2 sensors and a model that has the
    # inputs' covariance
    threshold: float = 0.99999999  # likelihood at which an alert is raised (a tail of 1e-8)
    clear_threshold: float = 0.99  # likelihood below which an active alert may clear
    clear_steps: int = 20  # consecutive steps below clear_threshold to clear: an anomaly
    # that lasts keeps one alert through its calmer stretches
    top_k: int = 3  # features named in an alert
    update_every_steps: int = 0  # while active, an "update" event every this many steps (0: off)
    onset_hold_steps: int = 100  # anomaly_score holds this many steps after an onset, so one
    # incident shows as one onset
    input_scale_window: int = 16000  # steps of memory of each stream's own input spread (0:
    # off): the model sees the stream's values over it
    spatial_tolerance: float = 0.01  # a value beyond the stream's range so far by this share
    # of the range marks an onset in anomaly_score (negative: off); alerts do not use it

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 < self.clear_threshold <= self.threshold < 1.0:
            problems.append("need 0 < clear_threshold <= threshold < 1")
        for name in ("short_window", "long_window", "clear_steps", "top_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.warmup_steps < -1:
            problems.append("warmup_steps must be -1 (the model's) or a count of steps")
        for name in ("update_every_steps", "onset_hold_steps", "alert_window",
                     "input_scale_window"):  # fmt: skip
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        return problems


FALLBACK_WARMUP: Final = 30  # the least default warm-up (a file that does not say how long
# its network takes to settle: this)


def warmup_steps(config: ScoringConfig, calibration: Calibration) -> int:
    """The steps a stream is scored before it may alert: the setting, or by default as long
    as the network takes to settle from a cold start (``Calibration.settle_steps``), and at
    least FALLBACK_WARMUP.

    >>> cal = Calibration(100, 1.0, 1.0, {}, 20, 1.0, 0.5, 0.9999, settle_steps=140)
    >>> warmup_steps(ScoringConfig(), cal), warmup_steps(ScoringConfig(warmup_steps=5), cal)
    (140, 5)
    """
    if config.warmup_steps >= 0:
        return config.warmup_steps
    return max(FALLBACK_WARMUP, calibration.settle_steps or 0)


# The likelihoods' columns: (the average, its long-run mean, its long-run variance).
SHORT_STATS: Final = ("short_avg", "long_mean", "long_var")
ALERT_STATS: Final = ("alert_avg", "alert_mean", "alert_var")


@dataclass
class StepScores:
    """What one scoring step returns for B streams (arrays of length B)."""

    raw: F64  # raw score; NaN where there was no prediction yet
    likelihood: F64  # the alert rule's likelihood in [0, 1]; 0 during warm-up
    score: F64  # anomaly_score: log_score of the short average's tail, onsets marked
    std_errors: F64  # [B, F] standardised errors (NaN where no prediction)
    contributions: F64  # [B, F] each feature's part of the most surprising signal: the alert's
    # average (NaN: none yet), this step's errors, a stuck run
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
        cfg = config
        self.warmup = warmup_steps(cfg, calibration)
        self.inputs = InputScale(cfg.input_scale_window)
        self.surprise = Surprise(calibration.raw_score, calibration.error_lag)
        weight = prior_steps(calibration, cfg.long_window)  # how much the model's
        # calibration says of this stream: a stream like those it was measured on
        self.short = Likelihood(SHORT_STATS, cfg.short_window, calibration, cfg.long_window,
                                weight)  # fmt: skip
        self.alert = (
            Likelihood(ALERT_STATS, cfg.alert_window, calibration, cfg.long_window, weight)
            if cfg.alert_window
            else None
        )
        # the held-out steps that showed the model's predicted variance, and its tail; a
        # cluster of exceedances ends as an alert clears
        rate, excess = calibration.tail_rate, calibration.tail_excess
        tail = None if rate is None or excess is None else (rate, excess)
        # the error scale's prior: the model's variance, counted as the held-out steps it was
        # measured on for a model of one stream, as the weakest proper prior for a fleet's;
        # the tail's, as the held-out steps it was measured on
        scale_steps = measured_weight(weight, cfg.long_window, float(calibration.n), 1)
        self.step = StepTail(scale_steps, cfg.long_window, cfg.clear_steps, tail,
                             float(calibration.n))  # fmt: skip
        self.stuck = Stuck(cfg.long_window)
        prior = calibration.relations if cfg.relations_check else None
        # the signals alerts watch (the average, and each check in use), and the tails at
        # which one raises and at which it is calm
        signals = 1 + sum((cfg.step_check, cfg.stuck_check, prior is not None))
        self.level, self.calm_level = (1.0 - cfg.threshold) / signals, 1.0 - cfg.clear_threshold
        self.relations = (
            Relations(
                prior,
                cfg.alert_window or cfg.short_window,
                weight,
                cfg.long_window,
                calm=self.calm_level,
                level=self.level,
            )
            if prior is not None
            else None
        )
        self.range = Range(cfg.spatial_tolerance)
        self.onsets = Onsets(cfg.onset_hold_steps)
        self.alerts = Alerts(cfg.threshold, cfg.clear_threshold, cfg.clear_steps,
                             cfg.update_every_steps,
                             cfg.alert_window or cfg.short_window)  # fmt: skip

    @staticmethod
    def column_specs(f: int) -> dict[str, ColumnSpec]:
        """Every per-stream column of the scorer's parts for streams of ``f`` features."""
        specs: dict[str, ColumnSpec] = {
            "n_scored": ((), np.int64, 0),  # steps scored in the stream's life
            "warm": ((), np.int64, 0),  # steps scored since the stream (re)started
        }
        for names in (SHORT_STATS, ALERT_STATS):
            specs.update({name: ((), np.float64, math.nan) for name in names})
        for part in (Surprise, InputScale, StepTail, Stuck, Relations, Range, Onsets, Alerts):
            specs.update(part.columns(f))
        return specs

    @property
    def gap_reset(self) -> list[str]:
        """Columns a time gap resets: the averages and the warm-up, not the long-run
        statistics or the alert's episode."""
        names = ["warm", SHORT_STATS[0], ALERT_STATS[0]]
        relations = Relations.gap_reset if self.relations is not None else ()
        return [*names, *Stuck.gap_reset, *relations, *Alerts.gap_reset]

    def model_inputs(self, cols: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
        """What the model's prediction is judged against, in its normalised units: ``z`` (the
        values normalised by the training statistics) over each stream's own input spread."""
        return self.inputs.model_inputs(cols, z)

    def model_feed(self, cols: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
        """What the model is fed of ``z`` (``model_inputs``): past the warm-up, where the stream
        has a prediction, a value beyond where the per-step check's learnt tail makes an error
        as rare as a Gaussian's beyond TAIL_FROM (``surprise.tail_bound``, of the stream's
        error spreads) no further out than that, unless the last one was beyond it on the same
        side (``inputs.within_tail``). The engine holds the previous prediction in ``mean``
        and ``log_var``."""
        past = cols["has_pred"] & (cols["warm"] >= self.warmup)
        if not past.any():
            return z
        mean, log_var, scale = cols["mean"], cols["log_var"], np.sqrt(cols["error_var"])
        error = standardised_errors(z, mean, log_var)
        if not (np.abs(error) > TAIL_FROM * scale).any():  # the usual step: the bound is
            return z  # never nearer than TAIL_FROM, so nothing is held back
        bound = tail_bound(cols["tail_rate"], cols["tail_excess_sq"]) * scale
        return within_tail(z, mean, log_var, error, cols["error_last"], bound, past)

    def step_batch(
        self,
        cols: dict[str, np.ndarray],
        z: np.ndarray,
        mean: np.ndarray,
        log_var: np.ndarray,
        has_pred: npt.NDArray[np.bool_],
        z_train: np.ndarray | None = None,
    ) -> StepScores:
        """Score normalised observations ``z`` [B, F] (``model_inputs``) against the previous
        predictions. ``z_train``: the same values normalised by the training statistics alone
        (default ``z``); the stuck and range checks and the input spread work on them."""
        cfg = self.config
        seen = z if z_train is None else z_train
        s = self.surprise.score(cols, z, mean, log_var, has_pred)
        ok, n, warm = s.ok, cols["n_scored"], cols["warm"]
        # What is normal is learnt past the warm-up, as the calibration skips its burn-in: a
        # stream's first steps carry the network's cold start, not the stream's habits. The
        # averages start there too.
        learn = ok & (warm >= self.warmup)
        count = np.maximum(warm - self.warmup, 0)  # the values already in the averages

        short_tail, short_delta = self.short.score(cols, s.raw, learn, count)
        alert_tail, alert_delta = short_tail, short_delta
        if self.alert is not None:
            alert_tail, alert_delta = self.alert.score(cols, s.raw, learn, count)
        stuck = stuck_tail = None
        if cfg.stuck_check:
            stuck = self.stuck.score(cols, seen, ok)
            stuck_tail = stuck.tail
        step_tail = spread = None
        if cfg.step_check:
            spread = StepTail.spread(cols, s.innovations)  # one step: its innovation
            self.step.start(cols, ok & (n == 0))
            step_tail = self.step.score(cols, spread, StepTail.spread(cols, s.pairs))

        relations = relations_tail = residuals = None
        if self.relations is not None:
            relations = self.relations.score(cols, seen, ok, count)
            relations_tail, residuals = relations.tail, relations.z
        beyond = self.range.score(cols, seen, learn)  # (flagged past the warm-up)

        # What is learnt from the step: each part from the steps it is given.
        self.short.learn(cols, learn, short_delta, n)
        if self.alert is not None:
            self.alert.learn(cols, learn, alert_delta, n)
        if spread is not None:
            self.step.learn(cols, spread, learn, n)
        self.inputs.learn(cols, seen)
        if stuck is not None:
            self.stuck.learn(cols, stuck)
        if self.relations is not None and relations is not None:
            self.relations.learn(cols, relations, learn)
        self.range.learn(cols, seen)
        every_ok = bool(ok.all())  # the usual step: whole columns, no masks
        if every_ok:
            n += 1
            warm += 1
        else:
            n[ok] += 1
            warm[ok] += 1
        eligible = ok & (warm > self.warmup)
        every_eligible = every_ok and bool(eligible.all())

        # Alerts watch the most surprising of their signals. A sample's error or a stuck run
        # raises an alert; what holds and clears it is the average: a sensor that stays flat
        # after an incident, as a closed valve's flow does, does not keep its alert on.
        average_tail = alert_tail
        # A stuck run, or a sensor's departure from the others, raises once, as it becomes
        # too unlikely to be chance; one that goes on after its alert has cleared (a
        # machine left in a new state) does not raise again until it has ended.
        level, calm_level = self.level, self.calm_level
        if stuck_tail is not None:
            stuck_tail = raise_once(cols["stuck_armed"], stuck_tail, level, calm_level,
                                    cfg.clear_steps, ok)  # fmt: skip
        if relations is not None and self.relations is not None:
            # its two averages, each on its share of the check's level, raising once
            fast, slow = self.relations.weights
            fast_tail = relations.tail / fast
            slow_tail = relations.slow_tail / slow
            by_slow = slow_tail < fast_tail
            if by_slow.any():  # named by the sensors of the average that is further out
                residuals = np.where(by_slow[:, None], relations.slow_z, relations.z)
            fast_armed, slow_armed = cols["rel_armed"], cols["rel_armed_slow"]
            fast_tail = raise_once(fast_armed, np.minimum(1.0, fast_tail), level, calm_level,
                                   cfg.clear_steps, ok)  # fmt: skip
            slow_tail = raise_once(slow_armed, np.minimum(1.0, slow_tail), level, calm_level,
                                   cfg.clear_steps, ok)  # fmt: skip
            relations_tail = np.minimum(fast_tail, slow_tail)
            # a raise by either disarms both, each until its own average is calm again:
            # one departure, one alert
            fired = ok & (relations_tail < level)
            if fired.any():
                fast_armed[fired] = 0
                slow_armed[fired] = 0
        alert_tails = [t for t in (alert_tail, step_tail, stuck_tail, relations_tail)
                       if t is not None]  # fmt: skip
        alert_tail = combine_tails(*alert_tails)
        likelihood, calm = 1.0 - alert_tail, 1.0 - average_tail
        if not every_eligible:
            likelihood = np.where(eligible, likelihood, 0.0)
            calm = np.where(eligible, calm, 0.0)
        shown = self.onsets.step(cols, short_tail, beyond, ok)
        score = log_score(shown)
        if not every_eligible:
            score = np.where(eligible, score, 0.0)
        steps = self.alerts.step(cols, likelihood, calm, s.parts, learn, eligible, count)
        contributions = steps.contributions  # the alert's average's: each sensor's part
        # An alert names the sensors of the signal that is most surprising at this step: a
        # spike's own errors, a stuck sensor's run.
        lowest = average_tail
        for tail, blame in ((step_tail, s.parts), (stuck_tail, cols["repeat_logp"]),
                            (relations_tail, residuals)):  # fmt: skip
            if tail is not None and blame is not None:
                mine = tail < lowest
                if mine.any():
                    contributions[mine] = np.abs(blame[mine])
                lowest = np.minimum(lowest, tail)
        return StepScores(
            raw=s.raw,
            likelihood=likelihood,
            score=score,
            std_errors=s.std_errors,
            contributions=contributions,
            raised=steps.raised,
            cleared=steps.cleared,
            updated=steps.updated,
            active=steps.active,
            episode=steps.episode,
        )


def scorer_column_specs(f: int) -> dict[str, ColumnSpec]:
    """Every per-stream scorer column for streams of ``f`` features: name -> (trailing
    shape, dtype, initial value).

    >>> scorer_column_specs(3)["seen_min"][0], scorer_column_specs(3)["n_scored"][0]
    ((3,), ())
    """
    return Scorer.column_specs(f)


def scorer_columns(b: int, f: int) -> dict[str, np.ndarray]:
    """Fresh scorer columns for ``b`` streams of ``f`` features, as the state table makes them.

    >>> scorer_columns(2, 3)["seen_min"].shape
    (2, 3)
    """
    return {
        name: np.full((b, *shape), fill, dtype)
        for name, (shape, dtype, fill) in scorer_column_specs(f).items()
    }


def top_features(std_errors_row: np.ndarray, k: int) -> list[int]:
    """Indices of the k features with the largest magnitude (|standardised error|, or a
    contribution), largest first.

    >>> top_features(np.array([0.5, -4.0, 2.0]), 2)
    [1, 2]
    """
    mag = np.nan_to_num(np.abs(std_errors_row), nan=-1.0)
    order = np.argsort(-mag, kind="stable")[:k]
    return [int(i) for i in order]
