"""Training data preparation in numpy: missing values, splits, normalisation, CSV streams.

Missing values: within each stream a NaN is forward-filled from the last finite
value of its column, and a leading gap is back-filled from the first finite
value; a column with no finite value at all is a DataError naming the column.
Normalisation is a per-feature robust centre and scale fitted on training rows.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.artifact import Normalisation
from detector.csvdata import infer_interval, read_csv
from detector.errors import DataError

log = logging.getLogger(__name__)

# Normal-distribution consistency factors: IQR / 1.349 and MAD * 1.4826 estimate sigma.
IQR_TO_SIGMA = 1.349
MAD_TO_SIGMA = 1.4826


def fill_missing(
    values: np.ndarray, features: Sequence[str] | None = None, where: str = "stream"
) -> np.ndarray:
    """Forward-fill NaN/inf down each column, then back-fill the leading gap (a copy).

    >>> fill_missing(np.array([[np.nan, 1.0], [2.0, np.nan], [np.nan, 3.0]])).tolist()
    [[2.0, 1.0], [2.0, 1.0], [2.0, 3.0]]
    """
    out = np.array(values, dtype=np.float64, copy=True)
    if out.ndim != 2:
        raise DataError(f"{where}: expected a [rows, features] array, got shape {out.shape}")
    finite = np.isfinite(out)
    for j in np.flatnonzero(~finite.all(axis=0)):
        ok = finite[:, j]
        if not ok.any():
            name = features[int(j)] if features is not None else f"#{j}"
            raise DataError(f"{where}: column {name!r} has no numeric value")
        # Index of the last finite row at or before each row (-1 before the first one).
        last = np.maximum.accumulate(np.where(ok, np.arange(len(out)), -1))
        last[last < 0] = np.flatnonzero(ok)[0]
        out[:, j] = out[last, j]
    return out


def robust_scale(column: np.ndarray) -> float:
    """A positive spread: IQR/1.349, else MAD*1.4826, else std, else 1.0.

    >>> robust_scale(np.array([5.0, 5.0, 5.0]))
    1.0
    """
    q25, q50, q75 = np.percentile(column, [25, 50, 75])
    for candidate in (
        (q75 - q25) / IQR_TO_SIGMA,
        float(np.median(np.abs(column - q50))) * MAD_TO_SIGMA,
        float(np.std(column)),
    ):
        if math.isfinite(candidate) and candidate > 1e-12 * max(1.0, abs(q50)):
            return float(candidate)
    return 1.0


def fit_normalisation(train_parts: Sequence[np.ndarray]) -> Normalisation:
    """Median centre and robust scale per feature over all training rows."""
    rows = np.concatenate([np.asarray(p, dtype=np.float64) for p in train_parts], axis=0)
    centre = [float(np.median(rows[:, j])) for j in range(rows.shape[1])]
    scale = [robust_scale(rows[:, j]) for j in range(rows.shape[1])]
    return Normalisation(centre=centre, scale=scale)


def normalise(values: np.ndarray, norm: Normalisation) -> np.ndarray:
    """(x - centre) / scale in float64 (the exported graph does the same in float32)."""
    centre = np.asarray(norm.centre, dtype=np.float64)
    scale = np.asarray(norm.scale, dtype=np.float64)
    out: np.ndarray = (np.asarray(values, dtype=np.float64) - centre) / scale
    return out


def split_rows(n_rows: int, val_fraction: float) -> int:
    """Rows kept for training; the last ``round(n_rows * val_fraction)`` are validation.

    >>> split_rows(100, 0.2)
    80
    """
    return n_rows - int(round(n_rows * val_fraction))


def fingerprint(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over the shapes and float64 bytes of the arrays, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array, dtype=np.float64)
        digest.update(repr(a.shape).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CsvStreams:
    """Streams read from CSV files, in feature order, with where they came from."""

    streams: list[np.ndarray]  # each [T_i, F] float64 (NaN where missing)
    features: list[str]
    names: list[str]  # "file.csv" or "file.csv:stream-id"
    sample_interval_s: float | None  # median of the streams' inferred intervals
    timestamp_cols: list[str | None] = field(default_factory=list)  # used, one per file

    @property
    def timestamp_col(self) -> str | list[str | None] | None:
        """The timestamp column used: one name when every file agrees, else one per file."""
        used = list(dict.fromkeys(self.timestamp_cols))
        return used[0] if len(used) == 1 else (used or None)


def load_csv_streams(
    paths: Sequence[str | Path],
    columns: Sequence[str] | None = None,
    train_rows: int | None = None,
    timestamp_col: str | None = None,
    stream_col: str | None = None,
) -> CsvStreams:
    """Read CSV files into streams: one per file, or one per value of ``stream_col``."""
    if not paths:
        raise DataError("no data file given")
    if train_rows is not None and train_rows < 1:
        raise DataError(f"--train-rows must be positive, got {train_rows}")
    streams: list[np.ndarray] = []
    names: list[str] = []
    intervals: list[float] = []
    stamp_cols: list[str | None] = []
    features: list[str] | None = None
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        wanted = list(columns) if columns else None
        max_rows = train_rows if stream_col is None else None
        table = read_csv(path, columns=wanted, timestamp_col=timestamp_col, max_rows=max_rows)
        stamp_cols.append(table.timestamp_col)  # given, or detected by name
        cols = [c for c in table.value_columns if c != stream_col]
        if not cols:
            raise DataError(f"{path}: no numeric column to use besides the stream column")
        values = table.values[:, [table.value_columns.index(c) for c in cols]]
        if features is None:
            features = cols
        elif cols != features:
            raise DataError(
                f"{path}: columns {', '.join(cols)} differ from the first file's"
                f" {', '.join(features)}; give --columns to choose the same ones"
            )
        stamps = table.timestamps
        if stream_col is None:
            streams.append(values)
            names.append(str(path))
            step = infer_interval(stamps)
            if step is not None:
                intervals.append(step)
            continue
        ids = np.asarray(table.column(stream_col), dtype=object)
        for sid in dict.fromkeys(ids.tolist()):
            rows = np.flatnonzero(ids == sid)
            if stamps is not None:
                rows = rows[np.argsort(stamps[rows], kind="stable")]
            rows = rows[:train_rows] if train_rows is not None else rows
            streams.append(values[rows])
            names.append(f"{path}:{sid}")
            step = infer_interval(stamps[rows]) if stamps is not None else None
            if step is not None:
                intervals.append(step)
    assert features is not None
    interval = float(np.median(intervals)) if intervals else None
    log.debug(
        "read %d stream(s) of %d feature(s) from %d file(s)",
        len(streams),
        len(features),
        len(paths),
    )
    return CsvStreams(streams, features, names, interval, stamp_cols)
