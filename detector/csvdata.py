"""Reading sensor CSV files for training and replay (stdlib csv + numpy).

The separator (``,`` or ``;``) is detected; a timestamp column named
``timestamp``, ``datetime``, ``time`` or ``ts`` is found unless one is named;
value columns default to every numeric column but the timestamp and label-like
ones. Cells that are empty or not numbers become NaN. Problems raise DataError.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from detector.errors import DataError
from detector.payload import parse_timestamp

TIMESTAMP_NAMES: Final = ("timestamp", "datetime", "time", "ts")
LABEL_NAMES: Final = ("label", "anomaly", "changepoint")


@dataclass(frozen=True)
class Table:
    """One CSV file: its header, raw rows, chosen value columns and timestamps."""

    path: str
    header: list[str]
    rows: list[list[str]]
    value_columns: list[str]
    values: np.ndarray  # [rows, len(value_columns)] float64, NaN where missing
    timestamp_col: str | None
    timestamps: np.ndarray | None  # [rows] float64 epoch seconds

    def column(self, name: str) -> list[str]:
        try:
            i = self.header.index(name)
        except ValueError:
            raise DataError(f"{self.path}: no column named {name!r}") from None
        return [row[i] if i < len(row) else "" for row in self.rows]


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def detect_separator(first_line: str) -> str:
    """``;`` when the header has more semicolons than commas, else ``,``.

    >>> detect_separator("datetime;a;b")
    ';'
    """
    return ";" if first_line.count(";") > first_line.count(",") else ","


def read_csv(
    path: str | Path,
    columns: list[str] | None = None,
    timestamp_col: str | None = None,
    max_rows: int | None = None,
) -> Table:
    """Read one CSV file into a :class:`Table`; one clear DataError on any problem."""
    where = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
            if not first.strip():
                raise DataError(f"{where}: the file is empty")
            handle.seek(0)
            reader = csv.reader(handle, delimiter=detect_separator(first))
            header = [name.strip() for name in next(reader)]
            rows = []
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                rows.append([cell.strip() for cell in row])
                if max_rows is not None and len(rows) >= max_rows:
                    break
    except OSError as exc:
        raise DataError(f"{where}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{where}: not a UTF-8 text file") from None
    except csv.Error as exc:
        raise DataError(f"{where}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"{where}: the file has a header but no rows")
    if len(set(header)) != len(header):
        raise DataError(f"{where}: the header repeats a column name")

    if timestamp_col is None:
        lower = {name.lower(): name for name in header}
        timestamp_col = next((lower[n] for n in TIMESTAMP_NAMES if n in lower), None)
    elif timestamp_col not in header:
        raise DataError(f"{where}: no timestamp column named {timestamp_col!r}")

    width = len(header)
    matrix = np.array(
        [[_to_float(row[i]) if i < len(row) else math.nan for i in range(width)] for row in rows],
        dtype=np.float64,
    ).reshape(len(rows), width)

    if columns is None:
        skip = {timestamp_col, *[h for h in header if h.lower() in LABEL_NAMES]}
        columns = [
            name
            for i, name in enumerate(header)
            if name not in skip and np.isfinite(matrix[:, i]).any()
        ]
        if not columns:
            raise DataError(f"{where}: no numeric column to use")
    else:
        unknown = [name for name in columns if name not in header]
        if unknown:
            raise DataError(
                f"{where}: no column(s) named {', '.join(map(repr, unknown))}"
                f" (the file has {', '.join(header)})"
            )
    values = matrix[:, [header.index(name) for name in columns]]

    timestamps = None
    if timestamp_col is not None:
        i = header.index(timestamp_col)
        stamps = np.empty(len(rows), dtype=np.float64)
        for k, row in enumerate(rows):
            cell = row[i] if i < len(row) else ""
            try:
                stamps[k] = parse_timestamp(cell)
            except ValueError:
                raise DataError(
                    f"{where}: row {k + 2}: cannot read timestamp {cell!r} in column"
                    f" {timestamp_col!r}"
                ) from None
        timestamps = stamps
    return Table(where, header, rows, list(columns), values, timestamp_col, timestamps)


def infer_interval(timestamps: np.ndarray | None) -> float | None:
    """The median positive step between timestamps, or None when there is none.

    >>> infer_interval(np.array([0.0, 5.0, 10.0, 20.0]))
    5.0
    """
    if timestamps is None or len(timestamps) < 2:
        return None
    steps = np.diff(timestamps)
    steps = steps[steps > 0]
    return float(np.median(steps)) if len(steps) else None
