"""Replay a CSV file through the daemon's scoring path, one row at a time, in order.

Each row becomes one sample of one stream, stepped by the same :class:`Engine`
the daemon uses; the output CSV holds the input columns then ``raw_score``,
``anomaly_score`` (the log-scaled likelihood in [0, 1], 0 in warm-up; see
:func:`detector.scoring.log_score`), ``alert`` (0/1, active at this row),
``top_feature`` (the sensor an alert at the row would name first: of the most surprising
signal, as ``rnnsentry/alerts`` names them) and ``alert_score`` (the likelihood the alert
rule compares with its thresholds, log-scaled the same way). Rows with a missing value are
not stepped.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.config import StreamConfig
from detector.csvdata import read_csv
from detector.engine import SCORED, Engine
from detector.errors import DataError
from detector.model import LoadedModel
from detector.scoring import ScoringConfig, log_score, top_features

OUTPUT_COLUMNS = ("raw_score", "anomaly_score", "alert", "top_feature", "alert_score")


@dataclass
class ReplayResult:
    raw: np.ndarray
    likelihood: np.ndarray  # what the alert rule compares with its thresholds
    score: np.ndarray  # the anomaly_score column
    alert: np.ndarray  # bool per row
    top_feature: list[str]
    timestamps: np.ndarray
    values: np.ndarray
    raised: int
    skipped: int

    @property
    def alert_score(self) -> np.ndarray:
        """The alert_score column: the alert's likelihood on the anomaly_score axis, where a
        likelihood threshold ``p`` lies at ``log_score(1 - p)``."""
        return log_score(1.0 - self.likelihood)


def replay_table(
    model: LoadedModel,
    values: np.ndarray,
    timestamps: np.ndarray | None,
    scoring: ScoringConfig | None = None,
    streams: StreamConfig | None = None,
) -> ReplayResult:
    """Step every row of ``values`` [T, F] (model feature order) through a fresh engine."""
    engine = Engine(model, scoring, streams)
    rows = len(values)
    if timestamps is None:
        step = model.meta.sample_interval_s or 1.0
        timestamps = np.arange(rows, dtype=np.float64) * step
    raw = np.full(rows, np.nan)
    like = np.zeros(rows)
    score = np.zeros(rows)
    alert = np.zeros(rows, np.bool_)
    top = [""] * rows
    features = model.meta.features
    finite = np.isfinite(values).all(axis=1)
    active = False
    raised = 0
    for t in range(rows):
        if not finite[t]:
            alert[t] = active
            continue
        result = engine.process(["replay"], timestamps[t : t + 1], values[t : t + 1], now=0.0)
        if result.status[0] == SCORED:
            raw[t] = result.raw[0]
            like[t] = result.likelihood[0]
            score[t] = result.score[0]
            active = bool(result.active[0])
            if not math.isnan(raw[t]):  # the sensor an alert here would name first
                parts = result.contributions[0]
                named = parts if np.isfinite(parts).any() else result.std_errors[0]
                top[t] = features[top_features(named, 1)[0]]
            raised += sum(1 for e in result.events if e.event == "raised")
        alert[t] = active
    return ReplayResult(
        raw, like, score, alert, top, timestamps, values, raised, int((~finite).sum())
    )


def replay_csv(
    model: LoadedModel,
    data: str | Path,
    out: str | Path,
    scoring: ScoringConfig | None = None,
    streams: StreamConfig | None = None,
    timestamp_col: str | None = None,
) -> ReplayResult:
    """Replay ``data`` and write the scored CSV to ``out``."""
    table = read_csv(data, columns=model.meta.features, timestamp_col=timestamp_col)
    result = replay_table(model, table.values, table.timestamps, scoring, streams)
    try:
        with open(out, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([*table.header, *OUTPUT_COLUMNS])
            alert_score = result.alert_score
            for i, row in enumerate(table.rows):
                raw = result.raw[i]
                writer.writerow([
                    *row,
                    "" if math.isnan(raw) else f"{raw:.6g}",
                    f"{result.score[i]:.6f}",
                    int(result.alert[i]),
                    result.top_feature[i],
                    f"{alert_score[i]:.6f}",
                ])  # fmt: skip
    except OSError as exc:
        raise DataError(f"cannot write {out}: {exc.strerror}") from None
    return result
