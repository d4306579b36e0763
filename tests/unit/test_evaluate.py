"""Evaluation maths on small hand-made cases; every expected figure is worked out here.

The NAB reward of a detection at relative position y is sigma(y) = 2 / (1 + e^(5y)) - 1;
values used below, by hand (e^-5 = 0.0067379, e^-4 = 0.0183156, e^-3 = 0.0497871,
e^-2.5 = 0.0820850, e^-0.5 = 0.6065307, e^3 = 20.085537):
  sigma(-1)   = 2 / 1.0067379 - 1 = 0.9866143   (a window's first row)
  sigma(-0.8) = 2 / 1.0183156 - 1 = 0.9640276
  sigma(-0.6) = 2 / 1.0497871 - 1 = 0.9051483
  sigma(-0.5) = 2 / 1.0820850 - 1 = 0.8482836
  sigma(-0.1) = 2 / 1.6065307 - 1 = 0.2449187   (the last row of a 10-row window)
  sigma(+0.6) = 2 / 21.085537 - 1 = -0.9051483  (6 rows after a 10-row window)
"""

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
from training.evaluation.nab import (
    PROFILES,
    nab_corpus,
    nab_file_score,
    nab_probation_rows,
    scaled_sigmoid,
    window_position,
)

STANDARD, LOW_FP, LOW_FN = (PROFILES[n] for n in PROFILES)
SIGMA = {-1.0: 0.9866143, -0.8: 0.9640276, -0.6: 0.9051483, -0.5: 0.8482836, -0.1: 0.2449187}
WINDOW = (10, 19)  # ten rows: first row at y = -1, last row at y = -0.1


def detections(rows: list[int], n: int = 30) -> np.ndarray:
    score = np.zeros(n)
    score[rows] = 1.0
    return score


def raw(rows: list[int], events: tuple[tuple[int, int], ...] = (WINDOW,), profile=STANDARD):
    return nab_file_score(detections(rows), events, 0.5, profile).raw


# --- the scaled sigmoid --------------------------------------------------------------


def test_sigmoid_values_match_the_hand_computed_ones() -> None:
    for y, expected in SIGMA.items():
        assert float(scaled_sigmoid(y)) == pytest.approx(expected, abs=1e-7)
    assert float(scaled_sigmoid(0.6)) == pytest.approx(-0.9051483, abs=1e-7)
    assert float(scaled_sigmoid(0.0)) == 0.0
    assert float(scaled_sigmoid(3.5)) == -1.0  # past the cutoff


def test_positions_run_from_minus_one_at_the_start_to_zero_at_the_end() -> None:
    assert window_position(10, WINDOW) == -1.0
    assert window_position(15, WINDOW) == -0.5
    assert window_position(19, WINDOW) == pytest.approx(-0.1)
    assert window_position(25, WINDOW) == pytest.approx(0.6)


# --- NAB scoring of one file ---------------------------------------------------------


def test_an_early_detection_beats_a_late_one() -> None:
    early, middle, late = raw([10]), raw([15]), raw([19])
    assert early == pytest.approx(SIGMA[-1.0], abs=1e-7)
    assert middle == pytest.approx(SIGMA[-0.5], abs=1e-7)
    assert late == pytest.approx(SIGMA[-0.1], abs=1e-7)
    assert early > middle > late > 0


def test_a_detection_at_the_end_of_a_long_window_scores_about_zero() -> None:
    # y = -1/1000 at the last row of a 1000-row window: sigma = 2 / (1 + e^-0.005) - 1 ~ 0.0025
    score = np.zeros(1100)
    score[1009] = 1.0
    got = nab_file_score(score, ((10, 1009),), 0.5, STANDARD).raw
    assert got == pytest.approx(0.0025, abs=1e-5)


def test_only_the_first_detection_in_a_window_counts() -> None:
    assert raw([12, 13, 19]) == pytest.approx(raw([12]))
    assert raw([12]) == pytest.approx(SIGMA[-0.8], abs=1e-7)  # y = -(19 - 12 + 1) / 10
    counts = nab_file_score(detections([12, 13, 19]), (WINDOW,), 0.5, STANDARD)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 0)


def test_a_false_positive_costs_exactly_the_profiles_weight() -> None:
    # row 2 comes before every window: -1 x A_FP, on top of the detected window's reward
    for profile, a_fp in ((STANDARD, 0.11), (LOW_FP, 0.22), (LOW_FN, 0.11)):
        assert raw([2, 10], profile=profile) - raw([10], profile=profile) == pytest.approx(-a_fp)
    # far after a window (y = 17 / 2 > 3): -1 x A_FP too
    assert raw([20], events=((2, 3),)) - raw([], events=((2, 3),)) == pytest.approx(-0.11)


def test_a_false_positive_just_after_a_window_is_discounted_by_the_sigmoid() -> None:
    extra = raw([10, 25]) - raw([10])  # y = (25 - 19) / 10 = 0.6
    assert extra == pytest.approx(0.11 * -0.9051483, abs=1e-7)
    assert -0.11 < extra < 0


def test_a_missed_window_costs_a_fn() -> None:
    assert raw([]) == -1.0
    assert raw([], profile=LOW_FN) == -2.0
    counts = nab_file_score(detections([]), (WINDOW, (25, 27)), 0.5, STANDARD)
    assert (counts.raw, counts.tp, counts.fn) == (-2.0, 0, 2)


def test_detections_in_the_probationary_period_are_ignored() -> None:
    score = detections([2, 10])
    assert nab_file_score(score, (WINDOW,), 0.5, STANDARD, probation_rows=5).raw == pytest.approx(
        SIGMA[-1.0], abs=1e-7
    )
    assert nab_probation_rows(4032) == 604 and nab_probation_rows(22695) == 750


def test_unscored_rows_are_never_detections() -> None:
    score = detections([10])
    score[11:] = np.nan
    assert nab_file_score(score, (WINDOW,), 0.0, STANDARD).raw == pytest.approx(
        SIGMA[-1.0] - 0.11 * 10, abs=1e-7
    )  # threshold 0: rows 0..9 are false positives before the window; NaN rows are not


# --- NAB over a corpus: normalisation and the threshold ------------------------------


def corpus_of(scores: list[np.ndarray], events: list[tuple[tuple[int, int], ...]]):
    return [(s, e, 0) for s, e in zip(scores, events, strict=True)]


def test_the_null_detector_scores_zero_and_the_perfect_one_hundred() -> None:
    events = [(WINDOW,), ((3, 5), (20, 24))]
    # NaN: rows never scored, so no threshold makes a detection (a constant 0 would be
    # flagged everywhere at threshold 0, which on so short a corpus beats flagging nothing).
    null = corpus_of([np.full(30, np.nan), np.full(30, np.nan)], events)
    perfect = corpus_of([detections([10]), detections([3, 20])], events)
    for profile in PROFILES.values():
        result = nab_corpus(null, profile)
        assert result.normalised == 0.0 and result.raw == result.null == -3 * profile.a_fn
        assert math.isinf(result.threshold)  # flagging nothing is the best it can do
        best = nab_corpus(perfect, profile, perfect="first_row")
        assert best.normalised == pytest.approx(100.0)
        assert (best.tp, best.fp, best.fn) == (3, 0, 0)


def test_the_published_normalisation_counts_a_tp_per_window() -> None:
    # NAB's and the dataset README's: perfect = A_TP x windows, so flagging every first row
    # scores 100 (3 sigma(-1) + 3 A_FN) / (3 + 3 A_FN): 99.331 (standard), 99.554 (low FN).
    events = [(WINDOW,), ((3, 5), (20, 24))]
    first_rows = corpus_of([detections([10]), detections([3, 20])], events)
    assert nab_corpus(first_rows, STANDARD).normalised == pytest.approx(99.3307, abs=1e-3)
    assert nab_corpus(first_rows, LOW_FN).normalised == pytest.approx(99.5536, abs=1e-3)
    half = corpus_of([detections([10]), np.zeros(30)], events)  # one window of three
    # standard: 100 (sigma(-1) - 2 + 3) / 6 = 33.11
    assert nab_corpus(half, STANDARD).normalised == pytest.approx(33.1102, abs=1e-3)


def test_the_threshold_is_chosen_to_maximise_the_corpus_score() -> None:
    # One 20-row file, window rows 10..14 (5 rows). Scores: row 12 = 0.9 (y = -0.6),
    # row 3 = 0.8 (before the window), row 11 = 0.7 (y = -0.8), the rest 0.
    # Raw score by threshold (standard): > 0.9: -1 (null); 0.9: 0.9051; 0.8: 0.9051 - 0.11
    # = 0.7951; 0.7: 0.9640 - 0.11 = 0.8540; 0: worse (every other row a false positive).
    score = np.zeros(20)
    score[[12, 3, 11]] = (0.9, 0.8, 0.7)
    result = nab_corpus([(score, ((10, 14),), 0)], STANDARD)
    assert result.threshold == 0.9
    assert result.raw == pytest.approx(SIGMA[-0.6], abs=1e-7)
    assert result.normalised == pytest.approx(100 * (SIGMA[-0.6] + 1) / 2, abs=1e-5)
    assert (result.tp, result.fp, result.fn) == (1, 0, 0)
    # Make the early row worth the false positive: row 10 = 0.7 (y = -1) instead of row 11.
    # 0.7: 0.9866 - 0.11 = 0.8766 < 0.9051, still 0.9; with A_FP 0.01 it would flip.
    score[11], score[10] = 0.0, 0.7
    assert nab_corpus([(score, ((10, 14),), 0)], STANDARD).threshold == 0.9


def test_one_threshold_serves_the_whole_corpus() -> None:
    # File A is caught at 0.9 only; file B's window peaks at 0.6 and its false positive at
    # 0.5. At 0.6: both windows caught, no FP: sigma(-1) x 2. Any per-file choice would be
    # the same here, but a threshold of 0.9 would miss B: the corpus optimum is 0.6.
    a, b = np.zeros(30), np.zeros(30)
    a[10], b[10], b[2] = 0.9, 0.6, 0.5
    result = nab_corpus(corpus_of([a, b], [(WINDOW,), (WINDOW,)]), STANDARD)
    assert result.threshold == 0.6
    assert result.raw == pytest.approx(2 * SIGMA[-1.0], abs=1e-6)


def test_the_sweep_agrees_with_scoring_each_threshold_directly() -> None:
    rng = np.random.default_rng(7)
    files = []
    for n in (120, 200, 90):
        score = np.round(rng.random(n) ** 3, 2)  # many ties
        score[rng.random(n) < 0.05] = np.nan
        starts = np.sort(rng.choice(np.arange(10, n - 20, 25), size=2, replace=False))
        events = tuple((int(s), int(s) + int(rng.integers(1, 15))) for s in starts)
        files.append((score, events, int(rng.integers(0, 15))))
    thresholds = np.unique(np.concatenate([f[0][~np.isnan(f[0])] for f in files]))
    for profile in PROFILES.values():
        direct = {
            float(t): sum(nab_file_score(s, e, t, profile, p).raw for s, e, p in files)
            for t in thresholds
        }
        best_t = max(direct, key=lambda t: (direct[t], t))
        result = nab_corpus(files, profile)
        assert result.raw == pytest.approx(max(max(direct.values()), result.null), abs=1e-9)
        if result.raw > result.null:
            assert result.threshold == best_t
            parts = [nab_file_score(s, e, best_t, profile, p) for s, e, p in files]
            assert result.tp == sum(c.tp for c in parts) and result.fp == sum(c.fp for c in parts)


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
