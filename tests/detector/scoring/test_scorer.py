"""detector.scoring.scorer: the parts composed, against hand computations: likelihood, the
alert state machine, onsets, the input spread as the scorer applies it, its configuration."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from detector.scoring import (
    Scorer,
    ScoringConfig,
    StepScores,
    ewma_alpha,
    gaussian_nll,
    huber_consistency,
    learn_input_var,
    scorer_columns,
    short_average,
    top_features,
)
from detector.scoring.alerts import Alerts
from detector.scoring.calibration import Calibration
from detector.scoring.scorer import FALLBACK_WARMUP

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def phi(u: float) -> float:
    """Standard normal CDF from the stdlib."""
    return 0.5 * math.erfc(-u / math.sqrt(2.0))


def calibration(
    window_mean: float, window_std: float, raw_score: str = "gaussian_nll", window: int = 10
) -> Calibration:
    return Calibration(
        n=1000,
        mean=window_mean,
        std=window_std,
        quantiles={},
        window=window,
        window_mean=window_mean,
        window_std=window_std,
        threshold=0.9999,
        raw_score=raw_score,
    )


def fresh_columns(b: int, f: int = 1) -> dict[str, np.ndarray]:
    """Per-stream scorer columns as the state table would create them."""
    return scorer_columns(b, f)


def test_short_average_is_what_the_scorer_keeps_from_the_end_of_the_warm_up() -> None:
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 1.5, size=(40, 1))
    config = ScoringConfig(short_window=4)
    scorer = Scorer(config, calibration(1.0, 0.5))
    cols = fresh_columns(1)
    kept, raws = [], []
    for t in range(len(z)):
        s = scorer.step_batch(cols, z[t : t + 1], np.zeros((1, 1)), np.zeros((1, 1)),
                              np.ones(1, np.bool_))  # fmt: skip
        raws.append(float(s.raw[0]))
        kept.append(float(cols["short_avg"][0]))
    warm = scorer.warmup  # a calibration without a settling time: the fixed warm-up
    assert warm == FALLBACK_WARMUP and np.isnan(kept[:warm]).all()
    np.testing.assert_allclose(kept[warm:], short_average(np.array(raws[warm:]), 4), rtol=1e-12)


def test_a_stream_parked_at_its_centre_keeps_a_floor_under_its_spread() -> None:
    """Months at the training centre would shrink the spread towards 0 and make the next small
    move enormous to the model; it stops at INPUT_VAR_FLOOR (a tenth of training's spread)."""
    from detector.scoring import INPUT_VAR_FLOOR

    var = np.ones((1, 1))
    for _ in range(2000):
        learn_input_var(var, np.zeros((1, 1)), 0.01, 1.5)  # 0.99 ** 2000 ~ 2e-9 unfloored
    assert var[0, 0] == INPUT_VAR_FLOOR
    scorer = Scorer(ScoringConfig(), calibration(1.0, 1.0))
    cols = fresh_columns(1)
    cols["input_var"][:] = var
    assert scorer.model_inputs(cols, np.array([[0.5]]))[0, 0] == pytest.approx(5.0)


def test_the_model_inputs_are_the_values_over_the_stream_spread() -> None:
    cols = fresh_columns(2, 2)
    cols["input_var"][:] = [[4.0, 1.0], [0.25, 9.0]]
    z = np.array([[2.0, -1.0], [1.0, 3.0]])
    on = Scorer(ScoringConfig(), calibration(1.0, 1.0))
    np.testing.assert_allclose(on.model_inputs(cols, z), [[1.0, -1.0], [2.0, 1.0]])
    off = Scorer(ScoringConfig(input_scale_window=0), calibration(1.0, 1.0))
    assert off.model_inputs(cols, z) is z


def test_the_scorer_learns_the_spread_from_the_training_units() -> None:
    """step_batch moves input_var from z_train (not from the rescaled z), and the range
    check looks at z_train too."""
    scorer = Scorer(ScoringConfig(input_scale_window=1), calibration(1.0, 1.0))
    cols = fresh_columns(1)
    scorer.step_batch(cols, np.array([[0.5]]), np.zeros((1, 1)), np.zeros((1, 1)),
                      np.array([True]), np.array([[3.0]]))  # fmt: skip
    # window 1: alpha 1, so the spread is the last value squared, clipped at 1.5^2 of the
    # spread before (1), over the clip's consistency factor
    assert cols["input_var"][0, 0] == pytest.approx(2.25 / huber_consistency(1.5))
    assert cols["seen_max"][0, 0] == 3.0


def test_top_features_orders_by_magnitude_nan_last() -> None:
    row = np.array([0.5, -4.0, 2.0, np.nan, -2.0, 3.0])
    assert top_features(row, 3) == [1, 5, 2]
    assert top_features(row, 6) == [1, 5, 2, 4, 0, 3]  # ties keep feature order
    assert top_features(row, 10) == [1, 5, 2, 4, 0, 3]
    assert top_features(row, 1) == [1]


# --- config ---


def test_default_scoring_config_is_valid() -> None:
    assert ScoringConfig().validate() == []


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"clear_threshold": 0.999, "threshold": 0.99}, "clear_threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"clear_threshold": 0.0}, "clear_threshold"),
        ({"short_window": 0}, "short_window"),
        ({"long_window": 0}, "long_window"),
        ({"clear_steps": 0}, "clear_steps"),
        ({"top_k": 0}, "top_k"),
        ({"warmup_steps": -2}, "warmup_steps"),
        ({"input_scale_window": -1}, "input_scale_window"),
    ],
)
def test_scoring_config_problems_name_the_field(changes: dict[str, float], word: str) -> None:
    problems = ScoringConfig(**changes).validate()  # type: ignore[arg-type]
    assert len(problems) == 1
    assert word in problems[0]


# --- the alert state machine ---
#
# With the prior worth 1e12 steps the long-run mean and variance stay at the
# calibration prior (the step size is ~1e-12), and with short_window = 1 the short
# average is the raw score itself. Prior mean = the raw score of z = 0 (mean 0,
# log_var 0) and prior std 1, so the likelihood of an observation z is
# Phi(z**2 / 2): a value we choose by choosing z.

CALM = 0.0  # likelihood Phi(0) = 0.5
MIDDLE = math.sqrt(6.0)  # Phi(3) ~ 0.99865: between clear_threshold and threshold
HIGH = math.sqrt(12.0)  # Phi(6) ~ 1 - 1e-9: above threshold
HUGE = 50.0


def test_the_chosen_levels_sit_where_the_tests_need_them() -> None:
    cfg = ScoringConfig()
    assert phi(CALM**2 / 2) < cfg.clear_threshold
    assert cfg.clear_threshold < phi(MIDDLE**2 / 2) < cfg.threshold
    assert phi(HIGH**2 / 2) >= cfg.threshold


class OneStream:
    """Steps one stream through a Scorer, one observation at a time."""

    def __init__(self, **config: float) -> None:
        # Per-step likelihoods: the alert rule watches the one-step short average.
        base: dict[str, float] = {"short_window": 1, "alert_window": 0, "threshold": 0.9999,
                                  "long_window": 10**15,
                                  "stuck_check": False,
                                  "step_check": False}  # fmt: skip
        cfg = ScoringConfig(**(base | config))  # type: ignore[arg-type]
        self.scorer = Scorer(cfg, calibration(HALF_LOG_2PI, 1.0, window=cfg.short_window))
        self.cols = fresh_columns(1)

    def step(self, z: float, has_pred: bool = True) -> StepScores:
        return self.scorer.step_batch(
            self.cols, np.array([[z]]), np.zeros((1, 1)), np.zeros((1, 1)), np.array([has_pred])
        )

    def run(self, zs: list[float]) -> list[StepScores]:
        return [self.step(z) for z in zs]


def test_likelihood_follows_the_prior_as_designed() -> None:
    s = OneStream(warmup_steps=0)
    for z in (CALM, MIDDLE, 1.0, HIGH):
        out = s.step(z)
        assert float(out.raw[0]) == pytest.approx(HALF_LOG_2PI + z * z / 2, rel=1e-12)
        assert float(out.likelihood[0]) == pytest.approx(phi(z * z / 2), abs=1e-7)


def test_no_alert_during_warm_up_even_with_huge_errors() -> None:
    s = OneStream(warmup_steps=5)
    for out in s.run([HUGE] * 5):
        assert float(out.likelihood[0]) == 0.0
        assert not out.raised[0] and not out.active[0]
    assert int(s.cols["warm"][0]) == 5
    after = s.step(HUGE)  # the sixth scored step is past the warm-up
    assert after.raised[0] and after.active[0]
    assert float(after.likelihood[0]) >= 0.9999


def test_the_cold_start_of_the_warm_up_does_not_carry_into_the_averages() -> None:
    """A network's first steps from a zero state miss by far; the calibration skipped them,
    so the averages the alerts watch start past the warm-up, not with those misses in."""
    s = OneStream(warmup_steps=5, short_window=10)
    s.run([HUGE] * 5)
    after = s.step(CALM)
    assert float(s.cols["short_avg"][0]) == pytest.approx(HALF_LOG_2PI)
    assert float(after.likelihood[0]) < 0.99 and not after.raised[0]


def test_steady_stream_then_a_spike_raises_exactly_once_and_holds() -> None:
    s = OneStream(warmup_steps=3, clear_steps=3)
    calm = s.run([CALM] * 10)
    assert not any(o.raised[0] or o.active[0] for o in calm)
    high = s.run([HIGH] * 6)
    assert [bool(o.raised[0]) for o in high] == [True] + [False] * 5
    assert all(o.active[0] and not o.cleared[0] for o in high)
    assert all(int(o.episode[0]) == 1 for o in high)
    assert int(s.cols["episodes"][0]) == 1


def test_clears_only_after_clear_steps_consecutive_calm_steps() -> None:
    s = OneStream(warmup_steps=0, clear_steps=4)
    s.run([CALM] * 3)
    assert s.step(HIGH).raised[0]
    calm = s.run([CALM] * 4)
    assert [bool(o.cleared[0]) for o in calm] == [False, False, False, True]
    assert [bool(o.active[0]) for o in calm] == [True, True, True, False]
    assert not any(o.raised[0] for o in calm)
    assert int(calm[-1].episode[0]) == 1  # the cleared event belongs to the raised episode


def test_an_alert_does_not_clear_while_a_signal_is_at_its_raise_level() -> None:
    """The average calm, but every fourth step a signal at the raise level (a sensor that
    keeps spiking): the alert holds, one episode; once nothing raises, it clears after
    clear_steps calm steps."""
    alerts = Alerts(0.9999, 0.99, clear_steps=5, update_every_steps=0, parts_window=10)
    cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in Alerts.columns(1).items()}
    one, parts = np.ones(1, np.bool_), np.zeros((1, 1))

    def step(t: int, likelihood: float) -> tuple[bool, bool, bool]:
        out = alerts.step(cols, np.array([likelihood]), np.array([0.5]), parts, one, one,
                          np.array([t]))  # fmt: skip
        return bool(out.raised[0]), bool(out.cleared[0]), bool(out.active[0])

    assert step(0, 1.0) == (True, False, True)
    held = [step(t, 1.0 if t % 4 == 0 else 0.5) for t in range(1, 41)]
    assert all(active and not raised and not cleared for raised, cleared, active in held)
    calm = [step(t, 0.5) for t in range(41, 46)]
    assert [cleared for _, cleared, _ in calm] == [False] * 4 + [True]
    assert int(cols["episodes"][0]) == 1


def test_hysteresis_a_value_between_thresholds_neither_clears_nor_raises() -> None:
    s = OneStream(warmup_steps=0, clear_steps=2)
    assert s.step(HIGH).raised[0]
    middle = s.run([MIDDLE] * 20)
    assert all(o.active[0] and not o.cleared[0] and not o.raised[0] for o in middle)


def test_a_middle_value_restarts_the_calm_count() -> None:
    s = OneStream(warmup_steps=0, clear_steps=3)
    assert s.step(HIGH).raised[0]
    outs = s.run([CALM, CALM, MIDDLE, CALM, CALM, CALM])
    assert [bool(o.cleared[0]) for o in outs] == [False, False, False, False, False, True]


def test_a_middle_value_does_not_raise_a_fresh_alert() -> None:
    s = OneStream(warmup_steps=0)
    assert not any(o.raised[0] or o.active[0] for o in s.run([MIDDLE] * 10))


def test_raises_are_spaced_by_the_clear_a_new_one_may_follow_right_after_it() -> None:
    """An alert clears after clear_steps calm steps, none of them at the raise level, so two
    raises on a stream are at least clear_steps + 1 steps apart; the step after a clear may
    raise again."""
    s = OneStream(warmup_steps=0, clear_steps=2)
    outs = s.run([HIGH, CALM, CALM, HIGH, HIGH, CALM, HIGH])
    assert [bool(o.raised[0]) for o in outs] == [True, False, False, True, False, False, False]
    assert [bool(o.cleared[0]) for o in outs] == [False, False, True, False, False, False, False]
    assert int(outs[-1].episode[0]) == 2


def test_rows_without_a_prediction_give_nan_raw_and_zero_likelihood() -> None:
    scorer = Scorer(ScoringConfig(warmup_steps=0), calibration(1.0, 0.5))
    cols = fresh_columns(3, 2)
    z = np.array([[HUGE, 1.0], [HUGE, 1.0], [0.0, 0.0]])
    has_pred = np.array([False, True, False])
    out = scorer.step_batch(cols, z, np.zeros((3, 2)), np.zeros((3, 2)), has_pred)
    assert math.isnan(out.raw[0]) and math.isnan(out.raw[2])
    assert np.isfinite(out.raw[1])
    assert out.likelihood[0] == 0.0 and out.likelihood[2] == 0.0
    assert np.isnan(out.std_errors[[0, 2]]).all()
    assert np.isfinite(out.std_errors[1]).all()
    assert not out.raised[0] and not out.active[0]
    assert cols["n_scored"].tolist() == [0, 1, 0]
    assert cols["warm"].tolist() == [0, 1, 0]
    assert np.isnan(cols["short_avg"][[0, 2]]).all()
    assert np.isnan(cols["long_mean"][[0, 2]]).all()


def test_non_finite_observation_leaves_the_stream_unchanged() -> None:
    s = OneStream(warmup_steps=0)
    s.run([CALM, 1.0])
    before = {k: v.copy() for k, v in s.cols.items()}
    out = s.step(math.nan)
    assert float(out.likelihood[0]) == 0.0
    for name, value in before.items():
        if name != "error_last":
            np.testing.assert_array_equal(s.cols[name], value, err_msg=name)
    # but the last error is forgotten: the next one has no neighbour to be paired with
    assert np.isfinite(before["error_last"]).all() and np.isnan(s.cols["error_last"]).all()


def test_streams_in_one_batch_keep_their_own_state() -> None:
    scorer = Scorer(
        ScoringConfig(warmup_steps=0, short_window=1, alert_window=0, threshold=0.9999,
                      long_window=10**15),
        calibration(HALF_LOG_2PI, 1.0, window=1),
    )  # fmt: skip
    cols = fresh_columns(2)
    zeros = np.zeros((2, 1))
    ones = np.ones(2, np.bool_)
    scorer.step_batch(cols, np.array([[CALM], [CALM]]), zeros, zeros, ones)
    out = scorer.step_batch(cols, np.array([[HIGH], [CALM]]), zeros, zeros, ones)
    assert out.raised.tolist() == [True, False]
    assert out.active.tolist() == [True, False]
    assert cols["episodes"].tolist() == [1, 0]


def test_update_events_come_every_n_steps_while_active_and_stop_at_clear() -> None:
    s = OneStream(warmup_steps=0, update_every_steps=3, clear_steps=2)
    assert s.step(HIGH).raised[0]
    outs = s.run([HIGH] * 7 + [CALM] * 2 + [HIGH] * 0)
    updates = [k + 1 for k, o in enumerate(outs) if o.updated[0]]
    assert updates == [3, 6]  # steps after the raise, while active
    assert outs[-1].cleared[0] and not outs[-1].updated[0]
    assert all(int(o.episode[0]) == 1 for o in outs)


def test_an_onset_keeps_the_first_high_score_and_caps_the_ones_after_it() -> None:
    from detector.scoring import ONSET_YELLOW, log_score

    s = OneStream(warmup_steps=0, onset_hold_steps=0)
    s.run([CALM] * 3)
    first, second, third = (float(s.step(HIGH).score[0]) for _ in range(3))
    capped = float(log_score(np.array([ONSET_YELLOW]))[0])  # 3/16
    assert first > 0.5 and second == third == pytest.approx(capped)
    s.step(CALM)
    assert float(s.step(HIGH).score[0]) == pytest.approx(first)  # a new onset shows in full


def test_onset_hold_caps_the_scores_of_the_steps_after_an_onset_then_lets_go() -> None:
    from detector.scoring import ONSET_YELLOW, log_score

    capped = float(log_score(np.array([ONSET_YELLOW]))[0])
    s = OneStream(warmup_steps=0, onset_hold_steps=4)
    s.run([CALM] * 3)
    first = float(s.step(HIGH).score[0])
    # the next 4 steps are held, calm or not: a flapping sensor shows one onset
    held = [float(s.step(z).score[0]) for z in (CALM, HIGH, CALM, HIGH)]
    assert first > 0.5 and all(v <= capped + 1e-12 for v in held)
    assert held[1] == pytest.approx(capped) and held[3] == pytest.approx(capped)
    s.step(CALM)
    assert float(s.step(HIGH).score[0]) == pytest.approx(first)  # after the hold: in full
    # alerts do not depend on the hold: the same steps without a hold raise the same
    plain = OneStream(warmup_steps=0, onset_hold_steps=0, clear_steps=1)
    held_run = OneStream(warmup_steps=0, onset_hold_steps=4, clear_steps=1)
    steps = [CALM] * 3 + [HIGH, CALM, HIGH, CALM, HIGH, CALM, HIGH]
    assert [bool(r.raised[0]) for r in plain.run(steps)] == [
        bool(r.raised[0]) for r in held_run.run(steps)
    ]


def test_the_scorer_computes_the_raw_score_its_calibration_names() -> None:
    from detector.scoring import student_t_score

    z, mean, log_var = np.array([[3.0, -1.0]]), np.zeros((1, 2)), np.zeros((1, 2))
    for kind, expected in (("student_t", student_t_score(z, mean, log_var)),
                           ("gaussian_nll", gaussian_nll(z, mean, log_var))):  # fmt: skip
        scorer = Scorer(ScoringConfig(), calibration(1.0, 1.0, kind))
        out = scorer.step_batch(fresh_columns(1, 2), z, mean, log_var, np.array([True]))
        assert float(out.raw[0]) == pytest.approx(float(expected[0]))


def test_the_prior_spread_follows_the_short_window_in_use() -> None:
    """A calibration of 10-step averages, used with another short window: the prior's
    variance scales like that of an exponential average of independent scores."""
    cal = calibration(1.0, 0.5)  # window 10
    same = Scorer(ScoringConfig(short_window=10), cal)
    assert same.short.prior_var == pytest.approx(0.25)
    for window in (1, 20, 50):
        a_cal, a = ewma_alpha(10), ewma_alpha(window)
        expected = 0.25 * (a / (2 - a)) / (a_cal / (2 - a_cal))
        assert Scorer(ScoringConfig(short_window=window), cal).short.prior_var == pytest.approx(
            expected
        )
    # a longer average of the same scores spreads less, a shorter one more
    assert Scorer(ScoringConfig(short_window=20), cal).short.prior_var < 0.25
    assert Scorer(ScoringConfig(short_window=1), cal).short.prior_var > 0.25


def test_a_value_beyond_everything_seen_shows_as_an_onset_in_the_score_only() -> None:
    """HTM's spatial check: past warm-up, a value outside the stream's range so far by more
    than spatial_tolerance of it scores as an onset, even when the model predicted it."""
    from detector.scoring import SPATIAL_TAIL, log_score

    def run(tolerance: float, values: list[float]) -> list[StepScores]:
        scorer = Scorer(ScoringConfig(warmup_steps=2, spatial_tolerance=tolerance,
                                      onset_hold_steps=3), calibration(1.0, 0.5))  # fmt: skip
        cols = fresh_columns(1)
        # the prediction always equals the value: the raw score alone would never flag it
        return [scorer.step_batch(cols, np.array([[v]]), np.array([[v]]), np.zeros((1, 1)),
                                  np.array([True])) for v in values]  # fmt: skip

    seen = [0.0, 1.0, 0.5, 0.2, 0.8]
    spatial = float(log_score(np.array([SPATIAL_TAIL]))[0])
    out = run(0.05, [*seen, 1.04, 1.2, 0.5, 0.5, 0.5, 1.5, -0.2])
    scores = [float(o.score[0]) for o in out]
    assert max(scores[:6]) < spatial  # in range, or within 5 % of it (1.04)
    assert scores[6] == pytest.approx(spatial)  # 1.2: beyond 1.0 + 5 % of the range
    assert max(scores[7:10]) < spatial  # the hold after an onset
    assert scores[10] == pytest.approx(spatial)  # 1.5: beyond the range, which took in 1.2
    assert scores[11] < spatial  # held again
    assert not any(bool(o.raised[0]) for o in out)  # alerts do not use it
    off = run(-1.0, [*seen, 1.2, 5.0])
    assert max(float(o.score[0]) for o in off) < spatial


def test_the_alert_watches_its_own_longer_average_and_the_score_the_short_one() -> None:
    """One wild step: anomaly_score marks the onset from the short average, while the
    alert's 50-step average moves by 2/51 of it (1.6 of its spreads) and stays calm; a
    lasting shift alerts."""
    cal = calibration(HALF_LOG_2PI, 1.0, window=1)
    cfg = ScoringConfig(warmup_steps=0, short_window=1, alert_window=50,
                        long_window=10**15, step_check=False,
                        stuck_check=False)  # fmt: skip
    s = Scorer(cfg, cal)
    # The alert average's prior spread follows its window: var * share(50) / share(1).
    assert s.alert is not None
    assert s.alert.prior_var == pytest.approx(ewma_alpha(50) / (2 - ewma_alpha(50)))
    cols = fresh_columns(1)
    zeros = np.zeros((1, 1))
    ok = np.array([True])
    calm = [s.step_batch(cols, np.array([[0.0]]), zeros, zeros, ok) for _ in range(5)]
    spike = s.step_batch(cols, np.array([[4.0]]), zeros, zeros, ok)
    assert all(float(o.likelihood[0]) < 0.99 for o in calm)
    assert float(spike.score[0]) >= 6 / 16  # the short average's tail: an onset
    assert float(spike.likelihood[0]) < cfg.threshold and not spike.raised[0]
    # The alert average: its first value is the first raw score, then an EWMA of 50 steps.
    raw = HALF_LOG_2PI + np.array([0.0] * 5 + [8.0])
    assert float(cols["alert_avg"][0]) == pytest.approx(short_average(raw, 50)[-1])
    assert float(cols["short_avg"][0]) == pytest.approx(raw[-1])
    shifted = [s.step_batch(cols, np.array([[4.0]]), zeros, zeros, ok) for _ in range(40)]
    assert any(o.raised[0] for o in shifted)
    # With alert_window 0 the same spike raises at once: the alert watches the short average.
    s0 = Scorer(replace(cfg, alert_window=0), cal)
    cols0 = fresh_columns(1)
    for _ in range(5):
        s0.step_batch(cols0, np.array([[0.0]]), zeros, zeros, ok)
    assert s0.step_batch(cols0, np.array([[4.0]]), zeros, zeros, ok).raised[0]
    assert np.isnan(cols0["alert_avg"][0])  # not kept when unused


def test_an_alert_names_the_features_of_its_own_average_not_of_the_raising_step() -> None:
    """The Student-t parts averaged like the alert sum to the alert's average. A spike on
    feature 0 raises the alert a few steps later, when feature 1 has the larger error of that
    step (two high steps raise): the averaged parts still put feature 0 first."""
    from detector.scoring import error_parts

    cal = calibration(1.0, 0.3, "student_t", window=1)
    cfg = ScoringConfig(
        warmup_steps=0,
        short_window=1,
        alert_window=5,
        long_window=10**15,
        threshold=0.999999,
        stuck_check=False,
        step_check=False,
    )
    s = Scorer(cfg, cal)
    cols = fresh_columns(1, 2)
    zeros = np.zeros((1, 2))
    ok = np.array([True])
    rng = np.random.default_rng(4)
    for _ in range(20):
        out = s.step_batch(cols, rng.normal(0.0, 0.5, (1, 2)), zeros, zeros, ok)
        np.testing.assert_allclose(out.contributions.sum(axis=1), cols["alert_avg"])
    steps = [np.array([[40.0, 0.0]]), np.array([[0.0, 2.5]]), np.array([[0.0, 2.5]])]
    outs = [s.step_batch(cols, x, zeros, zeros, ok) for x in steps]
    assert outs[0].raised[0] and outs[-1].active[0]
    at = outs[-1]  # the alert still on, two steps after the spike
    assert top_features(at.std_errors[0], 1) == [1]  # the step's own largest error
    assert top_features(at.contributions[0], 2) == [0, 1]  # the alert's average's
    np.testing.assert_allclose(outs[-1].contributions.sum(axis=1), cols["alert_avg"])
    # The Gaussian NLL's parts are the squared errors' halves; parts grow with |e|.
    np.testing.assert_allclose(error_parts(np.array([[3.0, -1.0]]), "gaussian_nll"), [[4.5, 0.5]])
    t = error_parts(np.array([[0.0, 1.0, -2.0, 4.0]]), "student_t")[0]
    assert t[0] == 0.0 and t[1] < t[2] < t[3]


def test_the_model_is_fed_outliers_held_back_only_past_the_warm_up() -> None:
    """Before a stream's warm-up ends its predictions are the network's cold start, and
    without a prediction there is nothing to hold a value back against."""
    scorer = Scorer(ScoringConfig(warmup_steps=10), calibration(1.0, 0.5))
    cols = fresh_columns(3, 1)
    cols["mean"], cols["log_var"] = np.zeros((3, 1)), np.zeros((3, 1))
    cols["has_pred"] = np.array([True, True, False])
    cols["warm"][:] = [10, 9, 10]
    z = np.full((3, 1), 50.0)
    np.testing.assert_allclose(scorer.model_feed(cols, z)[:, 0], [3.0, 50.0, 50.0], rtol=1e-6)


def test_a_stream_whose_large_errors_are_a_habit_is_held_back_further_out() -> None:
    """Where a stream's learnt tail is heavier than the Gaussian's (a sensor that jumps by
    quanta, a routine step), a value is held back only where that tail makes it as rare as a
    Gaussian error beyond 3 spreads: its routine jumps are followed as they come."""
    scorer = Scorer(ScoringConfig(warmup_steps=0), calibration(1.0, 0.5))
    cols = fresh_columns(2, 1)
    cols["mean"], cols["log_var"] = np.zeros((2, 1)), np.zeros((2, 1))
    cols["has_pred"] = np.ones(2, bool)
    cols["tail_rate"][1] = cols["tail_rate"][0] * math.exp(8.0)  # jumps 3,000 times as often
    cols["tail_excess_sq"][1] = 4.5  # and far: the tail starts 9 spreads out
    z = np.full((2, 1), 8.0)
    np.testing.assert_allclose(scorer.model_feed(cols, z)[:, 0], [3.0, 8.0], rtol=1e-6)
    np.testing.assert_allclose(scorer.model_feed(cols, z + 10.0)[:, 0], [3.0, 9.0], rtol=1e-5)
