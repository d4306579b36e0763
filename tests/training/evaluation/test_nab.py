"""training.evaluation.nab on small hand-made cases; every expected figure is worked out here.

The NAB reward of a detection at relative position y is sigma(y) = 2 / (1 + e^(5y)) - 1;
values used below, by hand (e^-5 = 0.0067379, e^-4 = 0.0183156, e^-3 = 0.0497871,
e^-2.5 = 0.0820850, e^-0.5 = 0.6065307, e^3 = 20.085537):
  sigma(-1)   = 2 / 1.0067379 - 1 = 0.9866143   (a window's first row)
  sigma(-0.8) = 2 / 1.0183156 - 1 = 0.9640276
  sigma(-0.6) = 2 / 1.0497871 - 1 = 0.9051483
  sigma(-0.5) = 2 / 1.0820850 - 1 = 0.8482836
  sigma(-0.1) = 2 / 1.6065307 - 1 = 0.2449187   (the last row of a 10-row window)
  sigma(+0.6) = 2 / 21.085537 - 1 = -0.9051483  (6 rows after a 10-row window)"""

from __future__ import annotations

import math

import numpy as np
import pytest

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
