"""Detection quality of ``rnnsentry replay`` output against labels (numpy + stdlib only).

:func:`evaluate` takes :class:`Labelled` files (``anomaly_score`` and ``alert`` per row, and
labelled events as inclusive row ranges) and returns a :class:`Report`: point-wise metrics
and event recall/delay of ``alert``, and NAB scores of ``anomaly_score`` (three profiles,
one threshold per profile optimised over the corpus: :mod:`training.nab`). Readers build
events from NAB window JSON or a SKAB 0/1 column. ``rnnsentry evaluate`` is the command
line; bad input: DataError.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.csvdata import read_csv
from detector.errors import DataError
from detector.payload import parse_timestamp
from training.nab import PROFILES, Event, NabResult, nab_corpus, nab_probation_rows

# ---------------------------------------------------------------------------------------
# Point-wise and event metrics of a 0/1 prediction.


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class PointMetrics:
    """Row-by-row counts and rates; NaN where a rate's denominator is 0."""

    tp: int
    fp: int
    fn: int
    tn: int
    precision: float
    recall: float
    f1: float
    far: float  # false-alarm rate FP / (FP + TN)
    mar: float  # missed-alarm rate FN / (FN + TP)

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int, tn: int) -> PointMetrics:
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        return cls(tp, fp, fn, tn, precision, recall, f1, _ratio(fp, fp + tn), _ratio(fn, fn + tp))


def pointwise(pred: np.ndarray, labels: np.ndarray) -> PointMetrics:
    """Point-wise metrics of 0/1 ``pred`` against 0/1 ``labels``.

    >>> m = pointwise(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    >>> m.f1, m.far, m.mar
    (0.5, 0.5, 0.5)
    """
    p, y = np.asarray(pred).astype(bool), np.asarray(labels).astype(bool)
    if p.shape != y.shape:
        raise DataError(f"prediction has {p.size} rows but the labels {y.size}")
    return PointMetrics.from_counts(
        int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum()), int((~p & ~y).sum())
    )


def label_runs(labels: np.ndarray) -> tuple[Event, ...]:
    """The maximal runs of 1s as inclusive row ranges.

    >>> label_runs(np.array([0, 1, 1, 0, 1]))
    ((1, 2), (4, 4))
    """
    y = np.concatenate(([0], np.asarray(labels).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(y))
    return tuple((int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True))


@dataclass(frozen=True)
class EventMetrics:
    """Labelled events caught by ``alert``, and the delay to the first alert row inside each."""

    events: int
    detected: int
    recall: float
    mean_delay_steps: float  # over detected events; NaN when none
    mean_delay_s: float  # NaN without timestamps


def event_delays(
    pred: np.ndarray, events: tuple[Event, ...], timestamps: np.ndarray | None = None
) -> list[tuple[int, float] | None]:
    """Per event: (steps, seconds) from its first row to its first predicted row, or None.

    >>> event_delays(np.array([0, 0, 1, 0, 0]), ((1, 3), (4, 4)))
    [(1, nan), None]
    """
    p = np.asarray(pred).astype(bool)
    out: list[tuple[int, float] | None] = []
    for first, last in events:
        hits = np.flatnonzero(p[first : last + 1])
        if not len(hits):
            out.append(None)
            continue
        row = first + int(hits[0])
        seconds = math.nan if timestamps is None else float(timestamps[row] - timestamps[first])
        out.append((row - first, seconds))
    return out


def event_metrics(delays: list[tuple[int, float] | None]) -> EventMetrics:
    found = [d for d in delays if d is not None]
    return EventMetrics(
        len(delays), len(found), _ratio(len(found), len(delays)),
        float(np.mean([d[0] for d in found])) if found else math.nan,
        float(np.mean([d[1] for d in found])) if found else math.nan,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# A corpus of labelled files -> a report.


@dataclass(frozen=True)
class Labelled:
    """One replayed file with its labelled events (sorted, disjoint, inclusive row ranges)."""

    name: str
    score: np.ndarray  # anomaly_score per row (NaN: not scored)
    alert: np.ndarray  # 0/1 per row
    events: tuple[Event, ...]
    timestamps: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.score)
        if len(self.alert) != n or (self.timestamps is not None and len(self.timestamps) != n):
            raise DataError(f"{self.name}: score, alert and timestamps differ in length")
        for (_, b), (c, _) in zip(self.events, self.events[1:], strict=False):
            if c <= b:
                raise DataError(f"{self.name}: labelled windows overlap or are out of order")
        if any(not 0 <= a <= b < n for a, b in self.events):
            raise DataError(f"{self.name}: a labelled window lies outside the file's rows")

    def labels(self) -> np.ndarray:
        y = np.zeros(len(self.score), np.bool_)
        for a, b in self.events:
            y[a : b + 1] = True
        return y


@dataclass(frozen=True)
class Report:
    files: int
    rows: int  # rows of every file
    rows_evaluated: int  # rows from skip_rows on (point-wise and event metrics)
    point: PointMetrics
    event: EventMetrics
    nab: dict[str, NabResult]


def evaluate(
    files: list[Labelled],
    skip_rows: int = 0,
    nab_probation: int | None = None,
    perfect: str = "windows",
) -> Report:
    """Pool point-wise and event metrics over ``files`` (from row ``skip_rows`` on; an event
    starting earlier is clipped to it) and score the corpus with every NAB profile.

    ``nab_probation``: rows whose detections NAB ignores; None: NAB's rule per file.
    """
    if not files:
        raise DataError("no files to evaluate")
    counts = np.zeros(4, np.int64)
    delays: list[tuple[int, float] | None] = []
    for f in files:
        y, p = f.labels()[skip_rows:], np.asarray(f.alert).astype(bool)[skip_rows:]
        m = pointwise(p, y)
        counts += (m.tp, m.fp, m.fn, m.tn)
        events = tuple((max(a, skip_rows), b) for a, b in f.events if b >= skip_rows)
        delays += event_delays(f.alert, events, f.timestamps)
    corpus = [
        (f.score, f.events, nab_probation_rows(len(f.score)) if nab_probation is None
         else nab_probation)
        for f in files
    ]  # fmt: skip
    nab = {name: nab_corpus(corpus, p, perfect) for name, p in PROFILES.items()}
    rows = sum(len(f.score) for f in files)
    return Report(
        len(files), rows, sum(max(len(f.score) - skip_rows, 0) for f in files),
        PointMetrics.from_counts(*(int(c) for c in counts)), event_metrics(delays), nab,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Readers.


@dataclass(frozen=True)
class Scores:
    """The columns of a replay output that evaluation reads."""

    path: str
    score: np.ndarray
    alert: np.ndarray
    timestamps: np.ndarray | None


def read_scores(path: str | Path) -> Scores:
    """``anomaly_score``, ``alert`` and the timestamps of a ``rnnsentry replay`` output."""
    table = read_csv(path, columns=["anomaly_score", "alert"])
    alert = np.nan_to_num(table.values[:, 1], nan=0.0)
    if not np.isin(alert, (0.0, 1.0)).all():
        raise DataError(f"{path}: column 'alert' holds values other than 0 and 1")
    return Scores(str(path), table.values[:, 0], alert.astype(bool), table.timestamps)


def read_label_column(path: str | Path, column: str = "anomaly") -> np.ndarray:
    """A SKAB-style 0/1 label column (bool per row)."""
    values = read_csv(path, columns=[column]).values[:, 0]
    if not np.isin(values, (0.0, 1.0)).all():
        raise DataError(f"{path}: label column {column!r} holds values other than 0 and 1")
    return values.astype(bool)


def read_windows(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """NAB-style JSON: file key -> list of [start, end] timestamps, as epoch seconds."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path}: not a JSON document") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object of file -> list of [start, end]")
    out: dict[str, list[tuple[float, float]]] = {}
    for key, windows in doc.items():
        try:
            pairs = [(parse_timestamp(a), parse_timestamp(b)) for a, b in windows]
        except (TypeError, ValueError):
            raise DataError(f"{path}: {key!r} is not a list of [start, end] timestamps") from None
        if any(b < a for a, b in pairs):
            raise DataError(f"{path}: {key!r} has a window that ends before it starts")
        out[key] = sorted(pairs)
    return out


def windows_to_events(
    windows: list[tuple[float, float]], timestamps: np.ndarray | None, where: str = "scores"
) -> tuple[Event, ...]:
    """Per window, the span from the first to the last row whose timestamp lies in
    [start, end] (a file may step back in time: NAB's machine temperature does); windows
    that hold no row are dropped.

    >>> windows_to_events([(2.0, 4.0)], np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    ((2, 4),)
    """
    if timestamps is None:
        raise DataError(f"{where}: has no timestamp column to place the windows")
    events = []
    for start, end in windows:
        rows = np.flatnonzero((timestamps >= start) & (timestamps <= end))
        if len(rows):
            events.append((int(rows[0]), int(rows[-1])))
    return tuple(sorted(events))


def match_key(stem: str, keys: list[str], prefix: str = "") -> str:
    """The windows key of a scores file: the key whose file stem equals ``stem``, else the
    longest one ``stem`` starts with followed by ``.``, ``_`` or ``-`` (``nyc_taxi.scores``);
    only keys starting with ``prefix`` are considered.

    >>> match_key("nyc_taxi", ["a/nyc_taxi.csv", "a/nyc.csv"])
    'a/nyc_taxi.csv'
    """
    pool = {k: Path(k).stem for k in keys if k.startswith(prefix)}
    found = [k for k, s in pool.items() if s == stem]
    if not found:
        near = [k for k, s in pool.items() if stem[: len(s) + 1] in (s + ".", s + "_", s + "-")]
        longest = max((len(pool[k]) for k in near), default=0)
        found = [k for k in near if len(pool[k]) == longest]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise DataError(
            f"{what} windows key matches {stem!r}; name it with --key (or --key-prefix)"
        )
    return found[0]


# ---------------------------------------------------------------------------------------
# Command line: rnnsentry evaluate.


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scores", required=True, nargs="+", metavar="S.csv", help="output(s) of rnnsentry replay"
    )
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument(
        "--windows",
        metavar="WINDOWS.json",
        help="NAB-style JSON: file key -> list of [start, end] timestamps",
    )
    labels.add_argument(
        "--labels",
        nargs="+",
        metavar="DATA.csv",
        help="CSV file(s) with a 0/1 label column, one per scores file, same rows",
    )
    parser.add_argument(
        "--key",
        action="append",
        metavar="NAME",
        help="windows key of each scores file, in order (default: matched by"
        " the file's stem, see --key-prefix)",
    )
    parser.add_argument(
        "--key-prefix",
        default="",
        metavar="P",
        help="match stems only against keys starting with P, e.g. realKnownCause/",
    )
    parser.add_argument(
        "--label-col",
        default="anomaly",
        metavar="C",
        help="label column of --labels files (%(default)s)",
    )
    parser.add_argument(
        "--skip-rows",
        type=int,
        default=0,
        metavar="N",
        help="leave the first N rows of each file out of the point-wise and event"
        " metrics, e.g. SKAB's 400 training rows (%(default)s)",
    )
    parser.add_argument(
        "--nab-probation",
        type=int,
        default=None,
        metavar="N",
        help="ignore detections in the first N rows for the NAB score"
        " (default: NAB's min(floor(0.15 rows), 750))",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def load_labelled(args: argparse.Namespace) -> list[Labelled]:
    """The files named by ``rnnsentry evaluate``'s flags, with their events."""
    files = []
    if args.labels is not None and len(args.labels) != len(args.scores):
        raise DataError(
            f"{len(args.scores)} scores file(s) but {len(args.labels)} --labels file(s)"
        )
    if args.key and len(args.key) != len(args.scores):
        raise DataError(f"{len(args.scores)} scores file(s) but {len(args.key)} --key value(s)")
    if args.key and args.labels is not None:
        raise DataError("--key names windows keys: use it with --windows, not --labels")
    windows = read_windows(args.windows) if args.windows else {}
    for i, path in enumerate(args.scores):
        s = read_scores(path)
        if args.labels is not None:
            y = read_label_column(args.labels[i], args.label_col)
            if len(y) != len(s.score):
                raise DataError(f"{path} has {len(s.score)} rows but {args.labels[i]} {len(y)}")
            events = label_runs(y)
        else:
            key = args.key[i] if args.key else match_key(Path(path).stem, list(windows),
                                                          args.key_prefix)  # fmt: skip
            if key not in windows:
                raise DataError(f"{args.windows}: has no key {key!r}")
            events = windows_to_events(windows[key], s.timestamps, path)
        files.append(Labelled(str(path), s.score, s.alert, events, s.timestamps))
    return files


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report_markdown(report: Report) -> str:
    """The report as small markdown tables."""
    p, e = report.point, report.event
    lines = [
        f"{report.files} file(s), {report.rows} rows ({report.rows_evaluated} evaluated),"
        f" {e.events} labelled event(s)",
        "",
        "| alert | precision | recall | F1 | FAR | MAR | event recall | delay steps | delay s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| point-wise | {_fmt(p.precision)} | {_fmt(p.recall)} | {_fmt(p.f1)} | {_fmt(p.far)}"
        f" | {_fmt(p.mar)} | {e.detected}/{e.events} ({_fmt(e.recall)}) |"
        f" {_fmt(e.mean_delay_steps, '.1f')} | {_fmt(e.mean_delay_s, '.0f')} |",
        "",
        "| NAB profile | score | threshold | raw | TP | FP | FN |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.nab.values():
        lines.append(f"| {r.profile} | {_fmt(r.normalised, '.1f')} | {_fmt(r.threshold, '.6g')}"
                     f" | {r.raw:.3f} | {r.tp} | {r.fp} | {r.fn} |")  # fmt: skip
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def run_evaluate(args: argparse.Namespace) -> int:
    if args.skip_rows < 0 or (args.nab_probation is not None and args.nab_probation < 0):
        raise DataError("--skip-rows and --nab-probation must not be negative")
    report = evaluate(load_labelled(args), args.skip_rows, args.nab_probation)
    if args.json:
        print(json.dumps(_json_safe(asdict(report)), indent=2))
    else:
        print(report_markdown(report))
    return 0
