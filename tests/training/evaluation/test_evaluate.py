"""training.evaluation.evaluate: point-wise and event metrics, the report, the readers; every
expected figure is worked out here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from detector.errors import DataError
from training.evaluation.evaluate import (
    EventOutcome,
    Labelled,
    evaluate,
    event_metrics,
    event_outcomes,
    key_class,
    label_runs,
    match_key,
    pointwise,
    raise_rows,
    read_label_column,
    read_scores,
    read_windows,
    report_markdown,
    windows_to_events,
)

# --- point-wise and event metrics ----------------------------------------------------


def test_pointwise_metrics_on_a_small_case() -> None:
    pred = np.array([1, 1, 0, 0, 1, 0])
    labels = np.array([1, 0, 1, 0, 1, 1])
    m = pointwise(pred, labels)  # TP rows 0, 4; FP row 1; FN rows 2, 5; TN row 3
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 2, 1)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == 0.5
    assert m.f1 == pytest.approx(4 / 7)  # 2 TP / (2 TP + FP + FN)
    assert m.far == 0.5  # FP / (FP + TN) = 1 / 2
    assert m.mar == 0.5  # FN / (FN + TP) = 2 / 4


def test_undefined_rates_are_nan_not_zero() -> None:
    m = pointwise(np.zeros(4), np.zeros(4))
    assert math.isnan(m.precision) and math.isnan(m.recall) and math.isnan(m.f1)
    assert m.far == 0.0
    with pytest.raises(DataError):
        pointwise(np.zeros(3), np.zeros(4))


def alert_rows(rows: list[int], n: int = 20) -> np.ndarray:
    alert = np.zeros(n, bool)
    alert[rows] = True
    return alert


def verdicts(alert: np.ndarray, events, grace_rows=None) -> list[tuple[str, int | None]]:
    return [(o.verdict, o.steps) for o in event_outcomes(alert, events, None, grace_rows)]


def test_raises_are_the_rows_where_alert_goes_from_0_to_1() -> None:
    assert raise_rows(alert_rows([2, 3, 4, 7, 9, 10], 12)).tolist() == [2, 7, 9]
    assert raise_rows(np.ones(3)).tolist() == [0]
    assert raise_rows(np.zeros(3)).tolist() == []


def test_an_alert_raised_inside_the_event_catches_it_with_the_delay_from_its_start() -> None:
    # event rows 5..9; the alert is raised at row 7 and stays on past the end
    assert verdicts(alert_rows([7, 8, 9, 10, 11]), ((5, 9),)) == [("caught", 2)]
    assert verdicts(alert_rows([5]), ((5, 9),)) == [("caught", 0)]  # its first row
    assert verdicts(alert_rows([9]), ((5, 9),)) == [("caught", 4)]  # its last row


def test_an_alert_active_from_before_the_event_does_not_catch_it() -> None:
    # raised at row 3, still on through the event: once counted as caught at delay 0
    assert verdicts(alert_rows([3, 4, 5, 6, 7]), ((5, 9),)) == [("missed", None)]
    # ... but a second raise inside it does, after the first alert cleared at row 7
    assert verdicts(alert_rows([3, 4, 5, 6, 8, 9]), ((5, 9),)) == [("caught", 3)]


def test_a_raise_after_the_event_is_late_not_caught() -> None:
    # event rows 5..9 (5 rows): a raise up to 5 rows after its end is late, by rows after it
    assert verdicts(alert_rows([11, 12]), ((5, 9),)) == [("late", 2)]
    assert verdicts(alert_rows([14]), ((5, 9),)) == [("late", 5)]
    assert verdicts(alert_rows([15]), ((5, 9),)) == [("missed", None)]  # past the grace
    assert verdicts(alert_rows([15]), ((5, 9),), grace_rows=10) == [("late", 6)]
    # a raise inside the next event is that event's, not late for this one
    assert verdicts(alert_rows([12]), ((5, 9), (12, 13))) == [("missed", None), ("caught", 0)]


def test_event_metrics_count_caught_late_missed_and_delays_in_seconds() -> None:
    labels = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0])
    # raises: row 3 (inside event 1..3), row 8 (after 6..7), none for 10..13
    alert = np.array([0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    events = label_runs(labels)
    assert events == ((1, 3), (6, 7), (10, 13))
    outcomes = event_outcomes(alert, events, np.arange(16) * 10.0)
    assert outcomes[:2] == [EventOutcome("caught", 3, 2, 20.0), EventOutcome("late", 8, 1, 10.0)]
    assert (outcomes[2].verdict, outcomes[2].row, outcomes[2].steps) == ("missed", None, None)
    m = event_metrics(outcomes)
    assert (m.events, m.caught, m.late, m.missed) == (3, 1, 1, 1)
    assert m.recall == pytest.approx(1 / 3) and m.detected == 1
    assert (m.median_delay_steps, m.mean_delay_steps, m.median_delay_s, m.mean_delay_s) == (
        2.0, 2.0, 20.0, 20.0,
    )  # fmt: skip
    # median and mean part: delays 0, 1 and 8 steps
    spread = event_metrics([EventOutcome("caught", 0, d, math.nan) for d in (0, 1, 8)])
    assert (spread.median_delay_steps, spread.mean_delay_steps) == (1.0, 3.0)
    assert math.isnan(spread.median_delay_s)
    none = event_metrics([])
    assert none.events == 0 and math.isnan(none.recall) and math.isnan(none.mean_delay_steps)


def test_an_event_clipped_by_skip_rows_is_caught_only_by_a_raise_after_the_skip() -> None:
    # event rows 2..8, skip 4: it starts at row 4 for the event metrics. An alert raised at
    # row 1 and on through row 8 does not catch it; one raised at row 6 does, 2 rows in.
    before = Labelled("f", np.zeros(12), alert_rows(list(range(1, 9)), 12), ((2, 8),))
    assert evaluate([before], skip_rows=4, nab_probation=0).event.missed == 1
    inside = Labelled("f", np.zeros(12), alert_rows([1, 2, 6, 7], 12), ((2, 8),))
    event = evaluate([inside], skip_rows=4, nab_probation=0).event
    assert (event.caught, event.mean_delay_steps) == (1, 2.0)


def test_evaluate_reports_events_per_class() -> None:
    # file a: events (2, 4) caught at row 3, (10, 12) missed; file b: (5, 6) late at row 8
    a = Labelled("a", np.zeros(20), alert_rows([3, 4]), ((2, 4), (10, 12)),
                 classes=("spike", "drift"))  # fmt: skip
    b = Labelled("b", np.zeros(20), alert_rows([8]), ((5, 6),), classes=("spike",))
    report = evaluate([a, b], nab_probation=0)
    assert (report.event.caught, report.event.late, report.event.missed) == (1, 1, 1)
    assert list(report.event_by_class) == ["drift", "spike"]
    spike, drift = report.event_by_class["spike"], report.event_by_class["drift"]
    assert (spike.events, spike.caught, spike.late, spike.mean_delay_steps) == (2, 1, 1, 1.0)
    assert (drift.events, drift.missed) == (1, 1)
    table = report_markdown(report)
    assert "| all | 3 | 1 | 1 | 1 | 0.333 | 1.0 / 1.0 | - / - |" in table
    assert "| spike | 2 | 1 | 1 | 0 | 0.500 |" in table
    with pytest.raises(DataError, match="classes"):
        Labelled("c", np.zeros(20), alert_rows([]), ((1, 2),), classes=("x", "y"))
    assert key_class("realKnownCause/x.csv", 1) == ("realKnownCause",)
    assert key_class("x.csv", 1) is None


def test_evaluate_pools_files_and_skips_the_training_rows() -> None:
    # File 1: rows 0..3 are training rows (skipped); labels rows 5..7; alert rows 1, 6, 7, 9.
    # Evaluated rows 4..9: TP 6, 7; FP 9; FN 5; TN 4, 8. File 2: no event, alert row 8 (FP),
    # evaluated rows 4..9 otherwise TN (5). Pooled: TP 2, FP 2, FN 1, TN 7.
    alert1 = np.zeros(10, bool)
    alert1[[1, 6, 7, 9]] = True
    alert2 = np.zeros(10, bool)
    alert2[8] = True
    files = [
        Labelled("one", np.zeros(10), alert1, ((5, 7),), np.arange(10) * 60.0),
        Labelled("two", np.zeros(10), alert2, ()),
    ]
    report = evaluate(files, skip_rows=4, nab_probation=0)
    p = report.point
    assert (p.tp, p.fp, p.fn, p.tn) == (2, 2, 1, 7)
    assert p.far == pytest.approx(2 / 9) and p.mar == pytest.approx(1 / 3)
    assert (report.event.caught, report.event.mean_delay_steps) == (1, 1.0)
    assert report.event.mean_delay_s == 60.0
    assert report.rows == 20 and report.rows_evaluated == 12
    assert set(report.nab) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    # anomaly_score is 0 everywhere, so the best threshold, 0, flags every row: file one
    # gains sigma(-1) at row 5 and pays 0.11 for rows 0..4 and 0.11 x -sigma(y) for rows 8
    # and 9 (y = 1/3, 2/3: sigma = -0.68226, -0.93111); file two pays 0.11 for each of its
    # 10 rows: 0.98661 - 0.55 - 0.17747 - 1.1 = -0.84086 against null -1 and perfect 1.
    nab = report.nab["standard"]
    assert (nab.threshold, nab.tp, nab.fp, nab.fn) == (0.0, 1, 17, 0)
    assert nab.raw == pytest.approx(-0.84086, abs=1e-5)
    assert nab.normalised == pytest.approx(100 * (1 - 0.84086) / 2, abs=1e-3)


def test_labelled_refuses_overlapping_or_outside_windows() -> None:
    with pytest.raises(DataError, match="overlap"):
        Labelled("f", np.zeros(10), np.zeros(10), ((1, 4), (4, 6)))
    with pytest.raises(DataError, match="outside"):
        Labelled("f", np.zeros(10), np.zeros(10), ((8, 10),))


# --- readers -------------------------------------------------------------------------


def test_windows_json_becomes_row_ranges(tmp_path: Path) -> None:
    path = tmp_path / "windows.json"
    doc = {"cat/a.csv": [["2024-01-01 00:02:00.000000", "2024-01-01 00:04:00.000000"]]}
    path.write_text(json.dumps(doc))
    windows = read_windows(path)
    stamps = 1704067200.0 + 60.0 * np.arange(10)  # 2024-01-01 00:00 UTC, one row a minute
    assert windows_to_events(windows["cat/a.csv"], stamps) == ((2, 4),)
    assert windows_to_events([(0.0, 1.0)], stamps) == ()  # no row inside: dropped
    with pytest.raises(DataError, match="timestamp"):
        windows_to_events(windows["cat/a.csv"], None)
    # time steps back after row 3 (as in one NAB file): the window spans rows 2..5
    back = np.array([0.0, 60.0, 120.0, 180.0, 150.0, 210.0, 300.0]) + 1704067200.0
    assert windows_to_events(windows["cat/a.csv"], back) == ((2, 5),)


@pytest.mark.parametrize(
    "text", ["not json", "[1, 2]", '{"a.csv": [["2024-01-01", "yesterday"]]}', '{"a.csv": [1]}']
)
def test_bad_windows_files_are_one_data_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(DataError):
        read_windows(path)


def test_keys_are_matched_by_stem() -> None:
    keys = ["a/nyc_taxi.csv", "a/nyc.csv", "b/x.csv", "c/x.csv"]
    assert match_key("nyc_taxi", keys) == "a/nyc_taxi.csv"
    assert match_key("nyc_taxi.scores", keys) == "a/nyc_taxi.csv"  # longest stem prefix
    assert match_key("x", keys, prefix="c/") == "c/x.csv"
    with pytest.raises(DataError, match="more than one"):
        match_key("x", keys)
    with pytest.raises(DataError, match="no windows key"):
        match_key("taxi", keys)


def test_scores_and_label_columns_are_read(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "datetime;a;anomaly;raw_score;anomaly_score;alert;top_feature\n"
        "2020-03-09 10:14:33;1.0;0;;0.0;0;\n"
        "2020-03-09 10:14:34;1.5;1;2.5;0.75;1;a\n"
    )
    scores = read_scores(path)
    assert scores.score[0] == 0.0
    assert scores.score[1] == 0.75 and scores.alert.tolist() == [False, True]
    assert scores.timestamps is not None and scores.timestamps[1] - scores.timestamps[0] == 1.0
    assert read_label_column(path).tolist() == [False, True]
    with pytest.raises(DataError, match="no column"):
        read_label_column(path, "label")
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,value,anomaly_score,alert\n1,2,0.5,7\n")
    with pytest.raises(DataError, match="alert"):
        read_scores(bad)
