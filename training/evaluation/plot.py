"""A picture of what the detector saw: ``rnnsentry plot`` and ``rnnsentry replay --plot``.

:func:`plot_scores` draws a ``rnnsentry replay`` output as one PNG: a panel per input feature
(at most :data:`MAX_FEATURES` by default) with the labelled windows shaded, a panel of the
``anomaly_score``, and below them the ``alert_score`` with the alert rule's raise and clear
lines, the alert periods shaded and a marker where each alert is raised. The time axis is
the timestamp column when there is one, else the row number. It returns a
:class:`PlotResult` naming the spans it drew.

The alert rule compares the *likelihood* of its own average with its thresholds (raise at
``likelihood >= threshold``, clear after ``clear_steps`` steps below ``clear_threshold``);
``alert_score`` is that likelihood put on the [0, 1] axis of
:func:`detector.scoring.log_score`, and the lines are the thresholds put there the same
way, so an alert is raised where the trace crosses the raise line. ``anomaly_score`` is
another average and the lines say nothing about it. An output written before replay had
an ``alert_score`` column is drawn with ``anomaly_score`` in its place and a note saying so.

Labels come from the readers of :mod:`training.evaluation.evaluate` (NAB windows JSON, a SKAB 0/1
column). matplotlib is imported only when drawing, with its Agg backend (no pyplot).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from detector.csvdata import Table, read_csv
from detector.errors import ConfigError, DataError, RnnsentryError
from detector.labelargs import add_label_arguments
from detector.replay import OUTPUT_COLUMNS
from detector.scoring import ScoringConfig, log_score
from training.evaluation.evaluate import (
    event_outcomes,
    label_runs,
    match_key,
    read_label_column,
    read_windows,
    windows_to_events,
)
from training.evaluation.nab import Event

MAX_FEATURES: Final = 8  # feature panels drawn when none are named
DPI: Final = 100
WIDTH_PX: Final = 1200
FEATURE_PANEL_PX: Final = 130
ANOMALY_PANEL_PX: Final = 130  # anomaly_score, above the alert panel
SCORE_PANEL_PX: Final = 260  # the alert panel: alert_score, the rule's lines, the alerts
TOP_PX: Final = 45  # the title
BOTTOM_PX: Final = 105  # the time axis, then the legend (two rows) below it
MARGIN_PX: Final = TOP_PX + BOTTOM_PX

WINDOW_COLOUR: Final = "tab:olive"
ALERT_COLOUR: Final = "tab:red"
NO_ALERT_SCORE: Final = (
    "no alert_score column (written by an older replay): anomaly_score is drawn against"
    " the alert rule's lines, which apply to the alert's own average"
)


def require_matplotlib(what: str = "plotting") -> None:
    """One clear error, before any work, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RnnsentryError(f"{what} needs matplotlib: pip install 'rnnsentry[train]'") from None


@dataclass(frozen=True)
class Threshold:
    """A horizontal line on a score axis and what it stands for."""

    score: float
    label: str
    of_rule: bool = True  # one of the alert rule's thresholds, else an anomaly_score one


def alert_lines(rule: ScoringConfig | None = None) -> tuple[Threshold, ...]:
    """The alert rule's raise and clear thresholds on the alert_score axis, raise first.

    >>> [round(t.score, 4) for t in alert_lines(ScoringConfig(threshold=0.99999999))]
    [0.5, 0.125]
    """
    if rule is None:
        rule = ScoringConfig()
    raise_score, clear_score = (
        float(s) for s in log_score(np.array([1.0 - rule.threshold, 1.0 - rule.clear_threshold]))
    )
    return (
        Threshold(
            raise_score,
            f"raise: likelihood \u2265 {rule.threshold:.12g} (alert_score {raise_score:.3g})",
        ),
        Threshold(
            clear_score,
            f"clear: likelihood < {rule.clear_threshold:.12g} for {rule.clear_steps} steps"
            f" (alert_score {clear_score:.3g})",
        ),
    )


def score_line(score: float) -> Threshold:
    """A threshold on the anomaly_score axis, such as the one ``evaluate`` reports for NAB.

    >>> score_line(0.4).label
    'anomaly_score threshold 0.4'
    """
    return Threshold(float(score), f"anomaly_score threshold {float(score):g}", of_rule=False)


@dataclass(frozen=True)
class PlotResult:
    """What :func:`plot_scores` drew; spans are inclusive row ranges of the scores file."""

    path: Path
    rows: int
    features: tuple[str, ...]  # one panel each, in order
    omitted: tuple[str, ...]  # numeric input columns left out (beyond MAX_FEATURES)
    time_axis: str  # the timestamp column, or "row"
    alert_column: str  # drawn in the alert panel: alert_score, or anomaly_score without one
    thresholds: tuple[Threshold, ...]  # the rule's raise line first, or a score line
    alerts: tuple[Event, ...]  # alert periods (alert = 1), shaded on the alert panel
    raised: tuple[int, ...]  # rows where an alert is raised, marked
    windows: tuple[Event, ...]  # labelled windows, shaded on every panel
    windows_caught: int  # labelled windows with an alert raised inside them
    windows_late: int  # ... raised only after they ended (evaluate.event_outcomes)
    size: tuple[int, int]  # the PNG's width and height in pixels
    note: str = ""  # what the picture lacks, drawn on it and printed


def _numbers(table: Table, name: str) -> np.ndarray:
    """One column of ``table`` as floats (NaN where empty or not a number)."""
    if name in table.value_columns:
        return np.asarray(table.values[:, table.value_columns.index(name)], dtype=np.float64)
    out = np.full(len(table.rows), math.nan)
    for i, cell in enumerate(table.column(name)):
        try:
            out[i] = float(cell)
        except ValueError:
            pass
    return out


def _check_events(events: Sequence[Event], rows: int, where: str) -> tuple[Event, ...]:
    spans = tuple(sorted((int(a), int(b)) for a, b in events))
    if any(not 0 <= a <= b < rows for a, b in spans):
        raise DataError(f"{where}: a labelled window lies outside the file's {rows} rows")
    return spans


def _pick_features(table: Table, features: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The feature columns to draw and the numeric input columns left out."""
    inputs = [c for c in table.value_columns if c not in OUTPUT_COLUMNS]
    if features is None:
        return inputs[:MAX_FEATURES], inputs[MAX_FEATURES:]
    wanted = list(features)
    unknown = [c for c in wanted if c not in table.header or c in OUTPUT_COLUMNS]
    if unknown:
        raise DataError(
            f"{table.path}: no feature column(s) {', '.join(map(repr, unknown))}"
            f" (it has {', '.join(inputs) or 'none'})"
        )
    return wanted, [c for c in inputs if c not in wanted]


def load_scores(scores: str | Path | Table) -> Table:
    """A ``rnnsentry replay`` output, checked: DataError when it is not one."""
    table = scores if isinstance(scores, Table) else read_csv(scores)
    missing = [c for c in ("anomaly_score", "alert") if c not in table.header]
    if missing:
        raise DataError(
            f"{table.path}: not an output of rnnsentry replay (no column"
            f" {', '.join(map(repr, missing))})"
        )
    alert = np.nan_to_num(_numbers(table, "alert"), nan=0.0)
    if not np.isin(alert, (0.0, 1.0)).all():
        raise DataError(f"{table.path}: column 'alert' holds values other than 0 and 1")
    return table


@dataclass(frozen=True)
class _Panel:
    """A score panel: its column, values, lines, height, and whether the alerts go on it."""

    column: str
    values: np.ndarray
    lines: tuple[Threshold, ...]
    height_px: int
    alerts: bool


def plot_scores(
    scores: str | Path | Table,
    out_png: str | Path,
    *,
    features: Sequence[str] | None = None,
    threshold: ScoringConfig | float | None = None,
    events: Sequence[Event] | None = None,
    windows: Sequence[tuple[float, float]] | None = None,
    title: str | None = None,
) -> PlotResult:
    """Draw a replay output (a path or a :class:`Table` read from one) to ``out_png``.

    ``features``: columns to draw (default: the numeric input columns, at most
    :data:`MAX_FEATURES`). ``threshold``: the alert rule whose lines are drawn on the
    alert_score axis, a ScoringConfig (default: the defaults), or a number drawn on the
    anomaly_score axis instead. Labelled windows as inclusive row ranges (``events``) or
    [start, end] epoch seconds (``windows``, placed by the timestamp column).
    """
    require_matplotlib()
    table = load_scores(scores)
    where = table.path
    rows = len(table.rows)
    shown, omitted = _pick_features(table, features)
    anomaly = _numbers(table, "anomaly_score")
    alert = np.nan_to_num(_numbers(table, "alert"), nan=0.0).astype(bool)
    labelled: tuple[Event, ...] = ()
    if events is not None and windows is not None:
        raise ValueError("give labelled windows as events (rows) or windows (times), not both")
    if windows is not None:
        labelled = windows_to_events(list(windows), table.timestamps, where)
    elif events is not None:
        labelled = _check_events(events, rows, where)
    alerts = label_runs(alert)
    raised = tuple(a for a, _ in alerts)
    outcomes = [o.verdict for o in event_outcomes(alert, labelled)]

    rule: tuple[Threshold, ...] = ()
    number: tuple[Threshold, ...] = ()
    if threshold is None or isinstance(threshold, ScoringConfig):
        rule = alert_lines(threshold)
    else:
        number = (score_line(threshold),)
    note = ""
    if "alert_score" in table.header:
        panels = [
            _Panel("anomaly_score", anomaly, number, ANOMALY_PANEL_PX, False),
            _Panel("alert_score", _numbers(table, "alert_score"), rule, SCORE_PANEL_PX, True),
        ]
    else:
        note = NO_ALERT_SCORE if rule else ""
        panels = [_Panel("anomaly_score", anomaly, rule + number, SCORE_PANEL_PX, True)]

    x, step, time_axis = _time_axis(table)
    size = _draw(
        out_png,
        x=x,
        step=step,
        dates=table.timestamps is not None,
        features=[(name, _numbers(table, name)) for name in shown],
        scores=panels,
        alerts=alerts,
        raised=raised,
        labelled=labelled,
        note=note,
        xlabel=time_axis if table.timestamps is not None else "row",
        title=title or f"{Path(where).name}: {rows} rows, {len(raised)} alert(s) raised",
    )
    return PlotResult(
        Path(out_png), rows, tuple(shown), tuple(omitted), time_axis, panels[-1].column,
        rule + number, alerts, raised, labelled, outcomes.count("caught"),
        outcomes.count("late"), size, note,
    )  # fmt: skip


def _untyped(module: object) -> Any:
    """matplotlib.dates has no type hints: called through Any."""
    return module


def _time_axis(table: Table) -> tuple[np.ndarray, float, str]:
    """x per row (matplotlib date numbers, or row numbers), one row's width, the axis name."""
    if table.timestamps is None or table.timestamp_col is None:
        return np.arange(len(table.rows), dtype=np.float64), 1.0, "row"
    from matplotlib import dates as mdates

    days = np.asarray(table.timestamps, dtype=np.float64) / 86400.0
    x = days + float(_untyped(mdates).date2num(np.datetime64("1970-01-01T00:00:00")))
    steps = np.diff(x)
    steps = steps[steps > 0]
    step = float(np.median(steps)) if len(steps) else 1.0 / 86400.0
    return x, step, table.timestamp_col


def _draw(
    path: str | Path,
    *,
    x: np.ndarray,
    step: float,
    dates: bool,
    features: list[tuple[str, np.ndarray]],
    scores: list[_Panel],
    alerts: tuple[Event, ...],
    raised: tuple[int, ...],
    labelled: tuple[Event, ...],
    note: str,
    xlabel: str,
    title: str,
) -> tuple[int, int]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratios = [FEATURE_PANEL_PX] * len(features) + [p.height_px for p in scores]
    height_px = MARGIN_PX + sum(ratios)
    figure = Figure(figsize=(WIDTH_PX / DPI, height_px / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    axes: Any = figure.subplots(
        len(ratios), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios}
    )[:, 0]
    figure.subplots_adjust(
        left=0.06, right=0.98, top=1 - TOP_PX / height_px, bottom=BOTTOM_PX / height_px, hspace=0.08
    )

    def shade(ax: Any, spans: tuple[Event, ...], colour: str, alpha: float, label: str) -> None:
        for i, (a, b) in enumerate(spans):
            ax.axvspan(x[a], x[b] + step, color=colour, alpha=alpha, linewidth=0,
                       label=label if i == 0 else None)  # fmt: skip

    def tidy(ax: Any) -> None:
        ax.tick_params(labelsize="small")
        ax.grid(True, alpha=0.3)

    window_label = f"labelled window ({len(labelled)})"
    for ax, (name, values) in zip(axes, features, strict=False):
        shade(ax, labelled, WINDOW_COLOUR, 0.25, window_label)
        ax.plot(x, values, linewidth=0.7, color="tab:blue")
        ax.text(0.005, 0.92, name, transform=ax.transAxes, va="top", fontsize="small",
                bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})  # fmt: skip
        tidy(ax)

    handles: list[Any] = []
    names: list[str] = []
    for ax, panel in zip(axes[len(features) :], scores, strict=True):
        shade(ax, labelled, WINDOW_COLOUR, 0.25 if panel.alerts else 0.15, window_label)
        if panel.alerts:
            shade(ax, alerts, ALERT_COLOUR, 0.3, f"alert active ({len(alerts)} period(s))")
        colour = "black" if panel.alerts else "dimgray"
        ax.plot(x, panel.values, linewidth=0.7, color=colour, label=panel.column)
        for line, style in zip(panel.lines, ("--", ":"), strict=False):
            ax.axhline(line.score, color=ALERT_COLOUR if panel.alerts else "dimgray",
                       linestyle=style, linewidth=1, label=line.label)  # fmt: skip
        if panel.alerts and raised:
            rows = np.array(raised)
            ax.plot(x[rows], np.minimum(np.nan_to_num(panel.values[rows]), 1.0) + 0.03,
                    linestyle="none", marker="v", color=ALERT_COLOUR, markersize=7,
                    label=f"alert raised ({len(raised)})")  # fmt: skip
        ax.set_ylim(-0.02, 1.08)
        ax.set_ylabel(panel.column, fontsize="small")
        tidy(ax)
        if panel.alerts and note:
            ax.text(0.995, 0.92, note, transform=ax.transAxes, va="top", ha="right",
                    fontsize="x-small", color=ALERT_COLOUR,
                    bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})  # fmt: skip
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in names:  # the windows are shaded on every panel: one entry
                handles.append(handle)
                names.append(label)
    ax = axes[-1]
    figure.legend(handles, names, loc="lower center", ncols=3, fontsize="small", frameon=False)
    ax.set_xlabel(xlabel, fontsize="small")
    if dates:
        from matplotlib import dates as mdates

        locator = _untyped(mdates).AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(_untyped(mdates).ConciseDateFormatter(locator))
    if len(x):
        ax.set_xlim(float(np.min(x)), float(np.max(x)) + step)
    figure.suptitle(title, fontsize="medium")
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise RnnsentryError(f"cannot write {path}: {exc.strerror or exc}") from None
    width, height = canvas.get_width_height()
    return int(width), int(height)


# ---------------------------------------------------------------------------------------
# Labels and the command line: rnnsentry plot (and rnnsentry replay --plot).


@dataclass(frozen=True)
class Labels:
    """Labelled windows read before the scores exist: NAB windows (times) or 0/1 flags."""

    source: str
    windows: list[tuple[float, float]] | None = None
    flags: np.ndarray | None = None

    def events(self, table: Table) -> tuple[Event, ...]:
        if self.windows is not None:
            return windows_to_events(self.windows, table.timestamps, table.path)
        assert self.flags is not None
        if len(self.flags) != len(table.rows):
            raise DataError(
                f"{table.path} has {len(table.rows)} rows but {self.source} {len(self.flags)}"
            )
        return label_runs(self.flags)


def load_labels(
    *,
    windows: str | None = None,
    key: str | None = None,
    labels: str | None = None,
    label_col: str = "anomaly",
    stem: str = "",
) -> Labels | None:
    """Read ``--windows`` (the entry ``key``, else the one matching ``stem``) or ``--labels``."""
    if windows and labels:
        raise DataError("give --windows or --labels, not both")
    if key and not windows:
        raise DataError("--key names a windows key: use it with --windows")
    if labels:
        return Labels(f"{labels} ({label_col})", flags=read_label_column(labels, label_col))
    if not windows:
        return None
    doc = read_windows(windows)
    name = key or match_key(stem, list(doc))
    if name not in doc:
        raise DataError(f"{windows}: has no key {name!r}")
    return Labels(f"{windows} [{name}]", windows=doc[name])


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scores", required=True, metavar="S.csv", help="output of rnnsentry replay"
    )
    parser.add_argument("--out", required=True, metavar="P.png", help="PNG file to write")
    add_label_arguments(parser)
    parser.add_argument(
        "--features",
        metavar="a,b",
        help=f"feature columns to draw (default: the inputs, at most {MAX_FEATURES})",
    )
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--config",
        metavar="FILE.toml",
        help="draw the alert thresholds of this file's [scoring] on the alert_score axis"
        " (default: the defaults, as replay without --config)",
    )
    rule.add_argument(
        "--threshold",
        type=float,
        metavar="S",
        help="draw this anomaly_score threshold instead of the alert rule's lines,"
        " e.g. evaluate's NAB one",
    )
    parser.add_argument("--title", metavar="T", help="title (default: the file and its alerts)")


def summary(result: PlotResult, scores: str | Path) -> str:
    """The one line the commands print."""
    features = ", ".join(result.features) or "none"
    if result.omitted:
        features += f" (+{len(result.omitted)} not drawn)"
    labelled = (
        f", {len(result.windows)} labelled window(s): {result.windows_caught} caught"
        f" (alert raised inside), {result.windows_late} late"
        if result.windows
        else ""
    )
    first = result.thresholds[0]
    line = (
        f"raise line at {result.alert_column} {first.score:.3g}" if first.of_rule
        else first.label
    )  # fmt: skip
    note = f"; note: {result.note}" if result.note else ""
    return (
        f"plotted {result.rows} rows of {scores} -> {result.path} ({result.size[0]}x"
        f"{result.size[1]}): features {features}; {len(result.raised)} alert(s) raised"
        f"{labelled}; {line}{note}"
    )


def plot_with_labels(
    scores: str | Path,
    out_png: str | Path,
    labels: Labels | None,
    *,
    features: Sequence[str] | None = None,
    threshold: ScoringConfig | float | None = None,
    title: str | None = None,
) -> PlotResult:
    """Read ``scores`` once, place ``labels`` on its rows, draw."""
    table = load_scores(scores)
    events = labels.events(table) if labels is not None else None
    return plot_scores(
        table, out_png, features=features, threshold=threshold, events=events, title=title
    )


def run_plot(args: argparse.Namespace) -> int:
    from detector.config import load_config

    require_matplotlib("rnnsentry plot")
    rule: ScoringConfig | float
    if args.threshold is not None:
        rule = args.threshold
    else:
        config, problems = load_config(args.config, environ={})
        if problems:
            raise ConfigError("; ".join(problems))
        rule = config.scoring
    labels = load_labels(windows=args.windows, key=args.key, labels=args.labels,
                         label_col=args.label_col, stem=Path(args.scores).stem)  # fmt: skip
    features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
    result = plot_with_labels(
        args.scores, args.out, labels, features=features, threshold=rule, title=args.title
    )
    print(summary(result, args.scores))
    return 0
