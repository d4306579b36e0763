"""Detection quality of ``rnnsentry replay`` output against labels (numpy + stdlib only).

:func:`evaluate` takes :class:`Labelled` files (``anomaly_score`` and ``alert`` per row, and
labelled events as inclusive row ranges) and returns a :class:`Report`: point-wise metrics
of ``alert``; per event, whether an alert was raised inside it (caught, with the delay from
its first row), only after it ended (late) or not at all (missed), over all events and per
event class; and NAB scores of ``anomaly_score`` (three profiles, one threshold per profile
optimised over the corpus: :mod:`training.evaluation.nab`). Readers build events from NAB
window JSON or a SKAB 0/1 column. ``rnnsentry evaluate`` is the command line; bad input: DataError.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detector.csvdata import read_csv
from detector.errors import DataError
from detector.payload import parse_timestamp
from training.evaluation.nab import PROFILES, Event, NabResult, nab_corpus, nab_probation_rows

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
class EventOutcome:
    """What the alert did about one labelled event: ``caught`` (an alert raised at one of
    its rows), ``late`` (raised after its last row, within the grace) or ``missed``."""

    verdict: str
    row: int | None  # the raise that decided it; None when missed
    steps: int | None  # caught: rows from the event's first row; late: rows after its last
    seconds: float  # the same in seconds; NaN without timestamps or when missed


def raise_rows(alert: np.ndarray) -> np.ndarray:
    """The rows where ``alert`` goes from 0 to 1 (row 0 when it starts active).

    >>> raise_rows(np.array([1, 1, 0, 1, 0, 1])).tolist()
    [0, 3, 5]
    """
    a = np.concatenate(([False], np.asarray(alert).astype(bool)))
    return np.flatnonzero(a[1:] & ~a[:-1])


def first_raise(raises: np.ndarray, first: int, last: int, stop: int) -> tuple[str, int | None]:
    """One event's verdict from the rows (steps) where alerts were raised, sorted: "caught"
    and the first raise in [first, last], else "late" and the first in (last, stop], else
    ("missed", None). The demo and the fleet bench judge their anomalies with it too.

    >>> first_raise(np.array([2, 9]), 4, 6, 10), first_raise(np.array([5]), 4, 6, 10)
    (('late', 9), ('caught', 5))
    """
    inside = raises[(raises >= first) & (raises <= last)]
    if len(inside):
        return "caught", int(inside[0])
    after = raises[(raises > last) & (raises <= stop)]
    if len(after):
        return "late", int(after[0])
    return "missed", None


def event_outcomes(
    alert: np.ndarray,
    events: tuple[Event, ...],
    timestamps: np.ndarray | None = None,
    grace_rows: int | None = None,
) -> list[EventOutcome]:
    """Per event, whether an alert was raised inside it, and when.

    An alert already active at the event's first row, raised before it, does not catch it:
    only a raise at a row in [first, last] does. A raise after the last row, before the
    next event and at most ``grace_rows`` rows on (None: as many rows as the event lasts),
    makes it late; otherwise it is missed.

    >>> [o.verdict for o in event_outcomes(np.array([1, 1, 0, 0, 0, 1]), ((1, 2), (3, 4)))]
    ['missed', 'late']
    """
    raises = raise_rows(alert)
    out: list[EventOutcome] = []
    for i, (first, last) in enumerate(events):
        grace = last - first + 1 if grace_rows is None else grace_rows
        stop = min(last + grace, events[i + 1][0] - 1 if i + 1 < len(events) else len(alert) - 1)
        verdict, row = first_raise(raises, first, last, stop)
        if row is None:
            out.append(EventOutcome(verdict, None, None, math.nan))
            continue
        since = first if verdict == "caught" else last
        seconds = math.nan if timestamps is None else float(timestamps[row] - timestamps[since])
        out.append(EventOutcome(verdict, row, row - since, seconds))
    return out


def _stat(fn: Any, values: list[float]) -> float:
    return float(fn(values)) if values else math.nan


@dataclass(frozen=True)
class EventMetrics:
    """Labelled events caught (an alert raised inside), late and missed, and the delay from
    each caught event's first row to its raise."""

    events: int
    caught: int
    late: int
    missed: int
    recall: float  # caught / events
    median_delay_steps: float  # over caught events; NaN when none
    mean_delay_steps: float
    median_delay_s: float  # NaN without timestamps
    mean_delay_s: float

    @property
    def detected(self) -> int:
        """The caught events (the name bench/quality.py reads)."""
        return self.caught


def event_metrics(outcomes: list[EventOutcome]) -> EventMetrics:
    """Counts and delays over ``outcomes``.

    >>> m = event_metrics([EventOutcome("caught", 3, 2, 20.0), EventOutcome("late", 9, 1, 10.0)])
    >>> m.caught, m.late, m.missed, m.recall, m.mean_delay_steps, m.median_delay_s
    (1, 1, 0, 0.5, 2.0, 20.0)
    """
    caught = [o for o in outcomes if o.verdict == "caught"]
    late = sum(o.verdict == "late" for o in outcomes)
    steps = [float(o.steps) for o in caught if o.steps is not None]
    seconds = [o.seconds for o in caught if not math.isnan(o.seconds)]
    return EventMetrics(
        len(outcomes), len(caught), late, len(outcomes) - len(caught) - late,
        _ratio(len(caught), len(outcomes)),
        _stat(np.median, steps), _stat(np.mean, steps),
        _stat(np.median, seconds), _stat(np.mean, seconds),
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
    classes: tuple[str, ...] | None = None  # each event's class, where known

    def __post_init__(self) -> None:
        n = len(self.score)
        if len(self.alert) != n or (self.timestamps is not None and len(self.timestamps) != n):
            raise DataError(f"{self.name}: score, alert and timestamps differ in length")
        if self.classes is not None and len(self.classes) != len(self.events):
            raise DataError(
                f"{self.name}: {len(self.events)} events but {len(self.classes)} classes"
            )
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
    event_by_class: dict[str, EventMetrics] = field(default_factory=dict)  # where known


def evaluate(
    files: list[Labelled],
    skip_rows: int = 0,
    nab_probation: int | None = None,
    perfect: str = "windows",
    grace_rows: int | None = None,
) -> Report:
    """Pool point-wise and event metrics over ``files`` (from row ``skip_rows`` on; an event
    starting earlier is clipped to it) and score the corpus with every NAB profile.

    ``nab_probation``: rows whose detections NAB ignores; None: NAB's rule per file.
    ``grace_rows``: how long after an event a raise counts as late (:func:`event_outcomes`).
    """
    if not files:
        raise DataError("no files to evaluate")
    counts = np.zeros(4, np.int64)
    outcomes: list[EventOutcome] = []
    by_class: dict[str, list[EventOutcome]] = {}
    for f in files:
        y, p = f.labels()[skip_rows:], np.asarray(f.alert).astype(bool)[skip_rows:]
        m = pointwise(p, y)
        counts += (m.tp, m.fp, m.fn, m.tn)
        kept = [i for i, (_, b) in enumerate(f.events) if b >= skip_rows]
        events = tuple((max(f.events[i][0], skip_rows), f.events[i][1]) for i in kept)
        found = event_outcomes(f.alert, events, f.timestamps, grace_rows)
        outcomes += found
        if f.classes is not None:
            for i, outcome in zip(kept, found, strict=True):
                by_class.setdefault(f.classes[i], []).append(outcome)
    corpus = [
        (f.score, f.events, nab_probation_rows(len(f.score)) if nab_probation is None
         else nab_probation)
        for f in files
    ]  # fmt: skip
    nab = {name: nab_corpus(corpus, p, perfect) for name, p in PROFILES.items()}
    rows = sum(len(f.score) for f in files)
    return Report(
        len(files), rows, sum(max(len(f.score) - skip_rows, 0) for f in files),
        PointMetrics.from_counts(*(int(c) for c in counts)), event_metrics(outcomes), nab,
        {name: event_metrics(found) for name, found in sorted(by_class.items())},
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
    parser.add_argument(
        "--grace-rows",
        type=int,
        default=None,
        metavar="N",
        help="an alert raised at most N rows after an event ends (and before the next)"
        " counts as late, not caught (default: as many rows as the event lasts)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def key_class(key: str, events: int) -> tuple[str, ...] | None:
    """The class of a windows key's events: the key's folder (NAB's ``realKnownCause``...),
    None for a key without one.

    >>> key_class("realKnownCause/nyc_taxi.csv", 2), key_class("nyc_taxi.csv", 2)
    (('realKnownCause', 'realKnownCause'), None)
    """
    folder = Path(key).parent.as_posix()
    return None if folder == "." else (folder,) * events


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
            events, classes = label_runs(y), None
        else:
            key = args.key[i] if args.key else match_key(Path(path).stem, list(windows),
                                                          args.key_prefix)  # fmt: skip
            if key not in windows:
                raise DataError(f"{args.windows}: has no key {key!r}")
            events = windows_to_events(windows[key], s.timestamps, path)
            classes = key_class(key, len(events))
        files.append(Labelled(str(path), s.score, s.alert, events, s.timestamps, classes))
    return files


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _event_row(name: str, e: EventMetrics) -> str:
    return (
        f"| {name} | {e.events} | {e.caught} | {e.late} | {e.missed} | {_fmt(e.recall)}"
        f" | {_fmt(e.median_delay_steps, '.1f')} / {_fmt(e.mean_delay_steps, '.1f')}"
        f" | {_fmt(e.median_delay_s, '.0f')} / {_fmt(e.mean_delay_s, '.0f')} |"
    )


def report_markdown(report: Report) -> str:
    """The report as small markdown tables."""
    p, e = report.point, report.event
    lines = [
        f"{report.files} file(s), {report.rows} rows ({report.rows_evaluated} evaluated),"
        f" {e.events} labelled event(s)",
        "",
        "| alert | precision | recall | F1 | FAR | MAR |",
        "|---|---|---|---|---|---|",
        f"| point-wise | {_fmt(p.precision)} | {_fmt(p.recall)} | {_fmt(p.f1)} | {_fmt(p.far)}"
        f" | {_fmt(p.mar)} |",
        "",
        "Events: caught = an alert raised inside the event; late = raised after it ended;"
        " delay from the event's first row to the raise, over caught events.",
        "",
        "| events | labelled | caught | late | missed | recall | delay steps (median / mean)"
        " | delay s (median / mean) |",
        "|---|---|---|---|---|---|---|---|",
        _event_row("all", e),
        *(_event_row(name, m) for name, m in report.event_by_class.items()),
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
    given = [v for v in (args.skip_rows, args.nab_probation, args.grace_rows) if v is not None]
    if min(given) < 0:
        raise DataError("--skip-rows, --nab-probation and --grace-rows must not be negative")
    report = evaluate(
        load_labelled(args), args.skip_rows, args.nab_probation, grace_rows=args.grace_rows
    )
    if args.json:
        print(json.dumps(_json_safe(asdict(report)), indent=2))
    else:
        print(report_markdown(report))
    return 0
