"""A picture of what the detector saw: ``rnnsentry plot`` and ``rnnsentry replay --plot``.

:func:`plot_scores` draws a ``rnnsentry replay`` output as one PNG: a panel per input feature
(at most :data:`MAX_FEATURES` by default) with the labelled windows shaded, and below them
the ``anomaly_score`` with the alert rule's thresholds, the alert periods shaded and a marker
where each alert is raised. The time axis is the timestamp column when there is one, else
the row number. It returns a :class:`PlotResult` naming the spans it drew.

The alert state machine raises on the *likelihood* (``likelihood >= threshold``, k of the
last n steps), while the file holds the log-scaled ``anomaly_score``; the lines drawn are
those likelihoods put on the score's axis with :func:`detector.scoring.log_score`. With
``onset_only`` the score is capped after an onset, so a long anomaly shows a spike then a
plateau below the line while its alert stays active; and with ``alert_window`` the alert
watches a longer average than the score does, so the lines show its levels, while the
shaded periods and markers show when it acted.

Labels come from the readers of :mod:`training.evaluate` (NAB windows JSON, a SKAB 0/1
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

from detector.cli import add_label_arguments
from detector.csvdata import Table, read_csv
from detector.errors import ConfigError, DataError, RnnsentryError
from detector.replay import OUTPUT_COLUMNS
from detector.scoring import ScoringConfig, log_score
from training.evaluate import (
    event_delays,
    label_runs,
    match_key,
    read_label_column,
    read_windows,
    windows_to_events,
)
from training.nab import Event

MAX_FEATURES: Final = 8  # feature panels drawn when none are named
DPI: Final = 100
WIDTH_PX: Final = 1200
FEATURE_PANEL_PX: Final = 130
SCORE_PANEL_PX: Final = 260
TOP_PX: Final = 45  # the title
BOTTOM_PX: Final = 105  # the time axis, then the legend (two rows) below it
MARGIN_PX: Final = TOP_PX + BOTTOM_PX

WINDOW_COLOUR: Final = "tab:olive"
ALERT_COLOUR: Final = "tab:red"


def require_matplotlib(what: str = "plotting") -> None:
    """One clear error, before any work, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RnnsentryError(f"{what} needs matplotlib: pip install 'rnnsentry[train]'") from None


@dataclass(frozen=True)
class Threshold:
    """A horizontal line on the anomaly_score axis and what it stands for."""

    score: float
    label: str


def alert_lines(rule: ScoringConfig | float | None = None) -> tuple[Threshold, ...]:
    """The lines that show an alert rule on the anomaly_score axis: the raise threshold
    first, then (for a ScoringConfig) the clear threshold. A number is drawn as it is.

    >>> [round(t.score, 4) for t in alert_lines(ScoringConfig())]
    [0.5, 0.125]
    >>> alert_lines(0.4)[0].label
    'threshold 0.4'
    """
    if rule is None:
        rule = ScoringConfig()
    if not isinstance(rule, ScoringConfig):
        return (Threshold(float(rule), f"threshold {float(rule):g}"),)
    raise_score, clear_score = (
        float(s) for s in log_score(np.array([1.0 - rule.threshold, 1.0 - rule.clear_threshold]))
    )
    rule_text = f"likelihood \u2265 {rule.threshold:.12g}"
    if rule.raise_n > 1:
        rule_text += f" in {rule.raise_k} of {rule.raise_n} steps"
    return (
        Threshold(raise_score, f"raise: {rule_text} (score {raise_score:.3g})"),
        Threshold(
            clear_score,
            f"clear: likelihood < {rule.clear_threshold:.12g} for {rule.clear_steps} steps"
            f" (score {clear_score:.3g})",
        ),
    )


@dataclass(frozen=True)
class PlotResult:
    """What :func:`plot_scores` drew; spans are inclusive row ranges of the scores file."""

    path: Path
    rows: int
    features: tuple[str, ...]  # one panel each, in order
    omitted: tuple[str, ...]  # numeric input columns left out (beyond MAX_FEATURES)
    time_axis: str  # the timestamp column, or "row"
    thresholds: tuple[Threshold, ...]  # the raise line first
    alerts: tuple[Event, ...]  # alert periods (alert = 1), shaded on the score panel
    raised: tuple[int, ...]  # rows where an alert is raised, marked
    windows: tuple[Event, ...]  # labelled windows, shaded on every panel
    windows_alerted: int  # labelled windows holding at least one alert row
    size: tuple[int, int]  # the PNG's width and height in pixels


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
    :data:`MAX_FEATURES`). ``threshold``: the alert rule whose lines are drawn, a
    ScoringConfig (default: the defaults) or a number on the anomaly_score axis.
    Labelled windows as inclusive row ranges (``events``) or [start, end] epoch seconds
    (``windows``, placed by the timestamp column).
    """
    require_matplotlib()
    table = load_scores(scores)
    where = table.path
    rows = len(table.rows)
    shown, omitted = _pick_features(table, features)
    score = _numbers(table, "anomaly_score")
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
    lines = alert_lines(threshold)
    found = sum(d is not None for d in event_delays(alert, labelled))

    x, step, time_axis = _time_axis(table)
    size = _draw(
        out_png,
        x=x,
        step=step,
        dates=table.timestamps is not None,
        panels=[(name, _numbers(table, name)) for name in shown],
        score=score,
        lines=lines,
        alerts=alerts,
        raised=raised,
        labelled=labelled,
        xlabel=time_axis if table.timestamps is not None else "row",
        title=title or f"{Path(where).name}: {rows} rows, {len(raised)} alert(s) raised",
    )
    return PlotResult(
        Path(out_png), rows, tuple(shown), tuple(omitted), time_axis, lines, alerts, raised,
        labelled, found, size,
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
    panels: list[tuple[str, np.ndarray]],
    score: np.ndarray,
    lines: tuple[Threshold, ...],
    alerts: tuple[Event, ...],
    raised: tuple[int, ...],
    labelled: tuple[Event, ...],
    xlabel: str,
    title: str,
) -> tuple[int, int]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height_px = MARGIN_PX + FEATURE_PANEL_PX * len(panels) + SCORE_PANEL_PX
    figure = Figure(figsize=(WIDTH_PX / DPI, height_px / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    ratios = [FEATURE_PANEL_PX] * len(panels) + [SCORE_PANEL_PX]
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

    window_label = f"labelled window ({len(labelled)})"
    for ax, (name, values) in zip(axes, panels, strict=False):
        shade(ax, labelled, WINDOW_COLOUR, 0.25, window_label)
        ax.plot(x, values, linewidth=0.7, color="tab:blue")
        ax.text(0.005, 0.92, name, transform=ax.transAxes, va="top", fontsize="small",
                bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})  # fmt: skip
        ax.tick_params(labelsize="small")
        ax.grid(True, alpha=0.3)

    ax = axes[-1]
    shade(ax, labelled, WINDOW_COLOUR, 0.25, window_label)
    shade(ax, alerts, ALERT_COLOUR, 0.3, f"alert active ({len(alerts)} period(s))")
    ax.plot(x, score, linewidth=0.7, color="black", label="anomaly_score")
    for line, style in zip(lines, ("--", ":"), strict=False):
        ax.axhline(line.score, color=ALERT_COLOUR, linestyle=style, linewidth=1, label=line.label)
    if raised:
        rows = np.array(raised)
        ax.plot(x[rows], np.minimum(np.nan_to_num(score[rows]), 1.0) + 0.03, linestyle="none",
                marker="v", color=ALERT_COLOUR, markersize=7,
                label=f"alert raised ({len(raised)})")  # fmt: skip
    ax.set_ylim(-0.02, 1.08)
    ax.set_ylabel("anomaly_score", fontsize="small")
    ax.tick_params(labelsize="small")
    ax.grid(True, alpha=0.3)
    handles, names = ax.get_legend_handles_labels()  # below the time axis: hides no data
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
        help="draw the alert thresholds of this file's [scoring] (default: the"
        " defaults, as replay without --config)",
    )
    rule.add_argument(
        "--threshold",
        type=float,
        metavar="S",
        help="draw this anomaly_score threshold instead, e.g. evaluate's NAB one",
    )
    parser.add_argument("--title", metavar="T", help="title (default: the file and its alerts)")


def summary(result: PlotResult, scores: str | Path) -> str:
    """The one line the commands print."""
    features = ", ".join(result.features) or "none"
    if result.omitted:
        features += f" (+{len(result.omitted)} not drawn)"
    labelled = (
        f", {len(result.windows)} labelled window(s), {result.windows_alerted} alerted"
        if result.windows
        else ""
    )
    return (
        f"plotted {result.rows} rows of {scores} -> {result.path} ({result.size[0]}x"
        f"{result.size[1]}): features {features}; {len(result.raised)} alert(s) raised"
        f"{labelled}; raise line at anomaly_score {result.thresholds[0].score:.3g}"
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
