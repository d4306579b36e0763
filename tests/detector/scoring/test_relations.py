"""The relations check on small hand-made streams: sensors that follow one common load.

Each stream's two sensors are a slow load plus a little noise of their own. The "model"
predicts each sensor's next value as its last one, as a one-step predictor of a slowly
wandering process nearly does, so a sensor that drifts away from the load, or turns against
it, looks like the load moving: each step looks like the last. Only how the sensors stand to
one another shows it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from detector.artifact import Normalisation
from detector.scoring import (
    Scorer,
    ScoringConfig,
    scorer_columns,
    short_average,
    student_t_score,
)
from detector.scoring.alerts import ARMED, raise_once
from detector.scoring.calibration import Calibration, RelationsPrior, measured_weight
from detector.scoring.relations import (
    GATHER_BYTES,
    Relations,
    RelationsStep,
    feature_major,
    packing,
    relation_residuals,
    relations_precision,
)
from detector.scoring.stats import huber_scatter
from training.trainer.calibrate import relations_prior, slow_averages

LOAD_PHI = 0.995  # the load wanders slowly ...
LOAD_NOISE = math.sqrt(1.0 - LOAD_PHI**2)  # ... with a spread of 1
OWN = 0.1  # each sensor's own noise
F = 2
START, END = 3000, 3600


def related_stream(steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load = np.zeros(steps)
    for t in range(1, steps):
        load[t] = LOAD_PHI * load[t - 1] + LOAD_NOISE * rng.standard_normal()
    return load[:, None] * np.array([1.0, 0.8]) + OWN * rng.standard_normal((steps, F))


def fresh_columns(part: Relations | type[Relations], b: int = 1) -> dict[str, np.ndarray]:
    """A relations part's columns for ``b`` new streams, as the state table makes them."""
    return {k: np.full((b, *sh), v, dt) for k, (sh, dt, v) in part.columns(F).items()}


def step(part: Relations, cols: dict[str, np.ndarray], x: np.ndarray, ok: np.ndarray,
         learn: np.ndarray, count: np.ndarray) -> RelationsStep:  # fmt: skip
    """Score one step, then learn it on the rows in ``learn``, as the scorer does."""
    scored = part.score(cols, x, ok, count)
    part.learn(cols, scored, learn)
    return scored


# The last-value predictor's error variance: the load's step and two samples of own noise.
STEP_VAR = LOAD_NOISE**2 + 2 * OWN**2


def calibration_of(steps: int = 4000) -> Calibration:
    """What the trainer measures on held-out data of the same process."""
    x = related_stream(steps + 1, seed=99)
    raw = student_t_score(x[1:], x[:-1], np.full((steps, F), math.log(STEP_VAR)))
    window = 20
    avg = np.array([raw[max(0, i - window + 1) : i + 1].mean() for i in range(len(raw))])
    prior = relations_prior(Normalisation([0.0] * F, [1.0] * F), [x], 8, 50)
    return Calibration(steps, float(raw.mean()), float(raw.std()), {}, window,
                       float(raw.mean()), float(avg.std()), 0.9999, "student_t",
                       relations=prior)  # fmt: skip


CALIBRATION = calibration_of()


def replay(
    x: np.ndarray,
    config: ScoringConfig | None = None,
    calibration: Calibration = CALIBRATION,
    step_var: np.ndarray | float = STEP_VAR,
) -> list[int]:
    """One stream through a Scorer with the last-value predictor; the steps that raise."""
    scorer = Scorer(config or ScoringConfig(), calibration)
    return _steps(scorer, scorer_columns(1, F), x, step_var)


def _steps(
    scorer: Scorer, cols: dict[str, np.ndarray], x: np.ndarray,
    step_var: np.ndarray | float = STEP_VAR,
) -> list[int]:  # fmt: skip
    """``x`` through ``scorer`` on the columns ``cols``, the last-value predictor's
    predictions; the steps that raise."""
    log_var = np.log(np.broadcast_to(step_var, (1, F)))
    raised = []
    for t in range(1, len(x)):
        out = scorer.step_batch(cols, x[t : t + 1], x[t - 1 : t], log_var, np.ones(1, bool))
        if out.raised[0]:
            raised.append(t)
    return raised


def caught_while_happening(raised: list[int], start: int = START, end: int = END) -> bool:
    return any(start <= t < end for t in raised)


OFF = ScoringConfig(relations_check=False)


def test_a_long_normal_stream_of_related_sensors_raises_nothing() -> None:
    assert replay(related_stream(20_000, seed=1)) == []


def test_a_sensor_drifting_away_from_the_others_is_caught_while_it_drifts() -> None:
    """A ramp of 1/600 of the load's spread a step on one sensor: 15 times its own noise at
    the end, never beyond the range the load gives it. Without the check it goes unseen."""
    x = related_stream(4000, seed=2)
    x[START:END, 1] += 1.5 * np.arange(1, END - START + 1) / (END - START)
    assert caught_while_happening(replay(x))
    assert not caught_while_happening(replay(x, OFF))


def test_a_sensor_that_stops_following_the_others_is_caught() -> None:
    """The second sensor mirrors its own course from the break on: it moves against the load."""
    x = related_stream(4000, seed=3)
    x[START:END, 1] = 2.0 * x[START, 1] - x[START:END, 1]
    assert caught_while_happening(replay(x))
    assert not caught_while_happening(replay(x, OFF))


def test_a_machine_left_in_a_new_state_raises_once() -> None:
    """The second sensor ramps to a new offset and stays there: one alert, not one every
    time the average lets the last one clear."""
    x = related_stream(9000, seed=4)
    x[START:END, 1] += 1.5 * np.arange(1, END - START + 1) / (END - START)
    x[END:, 1] += 1.5
    raised = replay(x)
    assert caught_while_happening(raised)
    assert len(raised) == 1


def test_the_precision_follows_the_streams_own_covariance() -> None:
    """The rank-one updates of P keep it the inverse of the stream's weighted covariance,
    each step weighted as the Huber rule says: against the same recursion on the covariance
    itself, in float64 (and the mean with the location's weight, the square root of the
    scatter's). A stream whose sensors move against each other turns the prior's
    (they move together) around, and ends near its own covariance."""
    prior = RelationsPrior([[1.0, 0.9], [0.9, 1.0]], 50, [0.1, 0.1], 4000)
    part = Relations(prior, 50, prior_steps=10.0, long_window=8000, calm=0.01, level=2.5e-9)
    cols = fresh_columns(Relations)
    rng = np.random.default_rng(5)
    a = rng.standard_normal(3000)
    x = np.stack([a, -0.5 * a + 0.3 * rng.standard_normal(3000)], axis=1)
    y = np.concatenate([x, slow_averages(x, 50)], axis=1)  # the values and their averages
    bound, consistency = huber_scatter(2 * F)
    cov, mean = np.linalg.inv(part.prior_prec), y[0].copy()
    ok, count = np.ones(1, np.bool_), np.zeros(1)
    for t in range(len(x)):
        step(part, cols, x[t : t + 1], ok, ok, count)
        count += 1
        d = y[t] - mean
        b = 1.0 / max(min(part.prior_steps + t + 1.0, 8000.0), 2.0)
        held = min(1.0, bound / max(float(d @ np.linalg.solve(cov, d)), 1e-12))
        cov = (1.0 - b) * cov + b * held / consistency * np.outer(d, d)
        mean += d * math.sqrt(held) / min(t + 1.0, 8000.0)  # location: Huber's weight
    packed = cols["rel_prec"][0].astype(np.float64)  # the precision's upper triangle
    learnt = np.linalg.inv(packed[packing(2 * F)[0]])
    np.testing.assert_allclose(learnt, cov, rtol=0.01, atol=1e-4)
    np.testing.assert_allclose(cols["rel_mean"][0], mean, atol=1e-4)
    own = np.cov(y.T)
    assert np.all(np.abs(learnt[:2, :2] - own[:2, :2]) < 0.15 * own[0, 0])


def conditional_sd(x: np.ndarray, prior: RelationsPrior | None = None,
                   prior_steps: float = 10.0) -> float:  # fmt: skip
    """How closely the second sensor is tied to the first (its value and average) and its
    own average, by the precision a stream learns over ``x``."""
    prior = prior or CALIBRATION.relations
    assert prior is not None
    part = Relations(prior, 50, prior_steps=prior_steps, long_window=8000, calm=0.01, level=2.5e-9)
    cols = fresh_columns(Relations)
    ok, count = np.ones(1, np.bool_), np.zeros(1)
    for t in range(len(x)):
        step(part, cols, x[t : t + 1], ok, ok, count)
        count += 1
    return second_given_first(cols["rel_prec"][0].astype(np.float64)[packing(2 * F)[0]])


def second_given_first(prec: np.ndarray) -> float:
    """The second sensor's spread given the first (value and average), its own average
    marginalised out, from a precision [2F, 2F] over the values and their averages."""
    return float(1.0 / math.sqrt(prec[1, 1] - prec[1, 3] ** 2 / prec[3, 3]))


def test_a_fleets_covariance_gives_way_to_the_streams_own_relations() -> None:
    """A fleet's covariance (a weight under the full memory) is the weakest proper prior,
    2F + 1 samples: a stream whose second sensor follows the first ten times more closely
    than the fleet's average says learns so within a few hundred samples. A model of one
    stream counts its calibration as the samples it was measured on (here 4,000)."""
    x = related_stream(600, seed=8)
    cov = np.cov(np.concatenate([x, slow_averages(x, 50)], axis=1).T)
    # the fleet's: the second sensor's relation blurred by ten times its own noise
    loose = RelationsPrior(cov + np.diag([0.0, 100.0, 0.0, 100.0]) * OWN**2, 50, [0.1, 0.1], 4000)
    own = second_given_first(relations_precision(cov))
    assert measured_weight(263.0, 8000, 4000.0, 2 * F) == 2 * F + 1
    assert measured_weight(8000.0, 8000, 341.0, 2 * F) == 341.0
    assert conditional_sd(x, loose, prior_steps=263.0) < 1.5 * own
    assert conditional_sd(x, loose, prior_steps=8000.0) > 5.0 * own


def test_a_streams_own_anomalies_do_not_loosen_its_relations() -> None:
    """The precision is Huber-robust: a stream whose second sensor once broke away for a
    while keeps the relation it had (a plain covariance would take the incident in as
    ten times the spread), and a later, slower departure still shows."""
    clean = related_stream(4000, seed=6)
    broken = clean.copy()
    broken[1000:1200, 1] += 40.0 * OWN  # an earlier incident, over by step 1200
    assert conditional_sd(broken[:2500]) < 1.2 * conditional_sd(clean[:2500])
    broken[START:END, 1] += 8.0 * OWN * np.arange(1, END - START + 1) / (END - START)
    assert caught_while_happening(replay(broken))


def fleet_stream_tails(
    x: np.ndarray, calm: float = 0.01, level: float = 1e-8 / 4
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` through the check as a fleet's model gives it (the weakest prior, 2F + 1
    samples), the alert's level for one of four signals: each step's tail [T], and the
    stream's own spread of its averages [T, F]."""
    assert CALIBRATION.relations is not None
    part = Relations(CALIBRATION.relations, 50, 2 * F + 1, 8000, calm=calm, level=level)
    cols = fresh_columns(Relations)
    ok, count = np.ones(1, np.bool_), np.zeros(1)
    tails, spread = np.ones(len(x)), np.ones((len(x), F))
    for t in range(len(x)):
        tails[t] = step(part, cols, x[t : t + 1], ok, ok, count).tail[0]
        spread[t] = cols["rel_var"][0]
        count += 1
    return tails, spread


RAISE = 1e-8 / 4


def raises(tails: np.ndarray) -> list[int]:
    """The steps the check raises at, once per departure (``alerts.raise_once``)."""
    run, ok, out = np.full(1, ARMED, np.int16), np.ones(1, np.bool_), []
    for t, tail in enumerate(tails):
        if run[0] >= 20 and tail < RAISE:
            out.append(t)
        raise_once(run, np.array([tail]), RAISE, 0.01, 20, ok)
    return out


def test_a_drift_the_check_watches_does_not_widen_the_spread_it_is_judged_against() -> None:
    """A young stream's second sensor ramps away over 800 steps. Its averages' spread learns
    from the calm steps only, so it ends the drift where it began (every step learnt, it
    would end two and a half times as wide), and the drift is caught while it lasts."""
    x = related_stream(1800, seed=20)
    x[1000:, 1] += np.arange(1, 801) / 800
    tails, spread = fleet_stream_tails(x)
    assert np.all(spread[-1] < 1.25 * spread[1000])
    assert tails[1000:].min() < RAISE
    every_step = fleet_stream_tails(x, calm=-1.0)[1]
    assert np.all(every_step[-1] > 2.0 * every_step[1000])


def test_a_slow_drift_shows_first_in_the_residuals_slow_average() -> None:
    """A ramp of half the load's spread over 3,000 steps on the second sensor (five times its
    own noise at the end). The residuals' 400-sample average, on its share of the check's
    level, reaches it more than a hundred steps before the 50-sample average reaches its own,
    while the drift goes on; before the drift, neither comes near."""
    assert CALIBRATION.relations is not None
    x = related_stream(7000, seed=2)
    x[3000:6000, 1] += 0.5 * np.arange(1, 3001) / 3000
    part = Relations(CALIBRATION.relations, 50, 8000.0, 8000, calm=0.01, level=RAISE)
    fast_share, slow_share = part.weights
    assert part.slow_window == 400 and 0.85 < fast_share < 0.9
    assert fast_share + slow_share == pytest.approx(1.0)
    cols = fresh_columns(Relations)
    ok, count = np.ones(1, np.bool_), np.zeros(1)
    fast, slow = np.ones(len(x)), np.ones(len(x))
    for t in range(len(x)):
        scored = step(part, cols, x[t : t + 1], ok, ok, count)
        fast[t], slow[t] = scored.tail[0] / fast_share, scored.slow_tail[0] / slow_share
        count += 1
    assert fast[500:3000].min() > 1e3 * RAISE and slow[500:3000].min() > 1e3 * RAISE
    first_slow = 3000 + int(np.argmax(slow[3000:] < RAISE))
    first_fast = 3000 + int(np.argmax(fast[3000:] < RAISE))
    assert slow[first_slow] < RAISE and first_slow + 100 < min(first_fast, 6000)


def test_a_departure_that_passes_is_not_learnt_so_its_end_raises_nothing() -> None:
    """A young stream's second sensor is off by four of its own noise spreads for 1,200
    steps, then back. The check raises once, at the start. Its covariance takes in none of
    the steps it raises at, so the return is where the stream belongs; learning them (a
    level no step is below) the covariance takes the departure in, the check is calm again
    before it ends, and the return raises a second time."""
    x = related_stream(4000, seed=31)
    x[800:2000, 1] += 0.4
    assert raises(fleet_stream_tails(x)[0]) == [813]
    learnt = raises(fleet_stream_tails(x, level=0.0)[0])
    assert learnt[0] == 813 and len(learnt) == 2 and 2000 <= learnt[1] < 2200


def test_a_machine_left_in_a_new_state_is_learnt_once_the_move_is_most_of_what_it_knows() -> None:
    """The second sensor moves to a new offset for good. Held back from the covariance, the
    move is taken in once it has lasted as long as what the covariance knew before it
    began: the check is calm again, 20 steps in a row, and may raise at the next one."""
    x = related_stream(20_000, seed=20)[:9000]
    x[1000:1800, 1] += np.arange(1, 801) / 800
    x[1800:, 1] += 1.0
    tails = fleet_stream_tails(x)[0]
    assert raises(tails[:1800]) != []
    calm = np.convolve(tails[1800:] > 0.01, np.ones(20), "valid") >= 20
    assert not calm[:1000].any()
    assert calm.any()


def test_a_stream_restored_without_the_checks_state_learns_it_as_a_new_one() -> None:
    """A snapshot from before the check restores a stream long in service with the check's
    columns new: its mean and covariance are learnt from the samples they take in, not
    from the stream's age (which would freeze the mean at its first value)."""
    scorer = Scorer(ScoringConfig(), CALIBRATION)
    cols = scorer_columns(1, F)
    cols["n_scored"][:] = 100_000  # an old stream ...
    cols["warm"][:] = 100_000
    x = related_stream(6000, seed=6) + np.array([3.0, -2.0])  # ... far from the first sample
    log_var = np.full((1, F), math.log(STEP_VAR))
    for t in range(1, len(x)):
        out = scorer.step_batch(cols, x[t : t + 1], x[t - 1 : t], log_var, np.ones(1, bool))
        assert not out.raised[0], t
    np.testing.assert_allclose(cols["rel_mean"][0][:F], x[1:].mean(axis=0), atol=0.05)


def test_residuals_are_each_sensor_given_the_others_values_and_averages() -> None:
    """A sensor's residual is its regression on every other variable but its own average,
    over that regression's spread: the Gaussian conditional, not the precision's shortcut."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 6))
    cov = a @ a.T + np.eye(6)  # three sensors, their three averages
    d = rng.standard_normal(6)
    r = relation_residuals(relations_precision(cov), d[None])[0]
    full = cov + 1e-3 * np.eye(6)  # the ridge the precision takes
    for f in range(3):
        given = [j for j in range(6) if j not in (f, f + 3)]
        beta = np.linalg.solve(full[np.ix_(given, given)], full[given, f])
        spread = math.sqrt(full[f, f] - full[f, given] @ beta)
        assert r[f] == pytest.approx((d[f] - d[given] @ beta) / spread, rel=1e-9)


def test_a_file_that_measured_the_values_alone_still_has_the_check() -> None:
    """A model file from before the averages joined carries an F x F covariance: the check
    takes the averages as unrelated to the values until the stream has learnt them."""
    old = RelationsPrior([[1.0, 0.9], [0.9, 1.0]], 50, [0.1, 0.1], 4000)
    part = Relations(old, 50, prior_steps=10.0, long_window=8000, calm=0.01, level=2.5e-9)
    assert part.prior_prec.shape == (4, 4) and part.prior_prec[0, 2] == 0.0
    x = related_stream(4000, seed=2)
    x[START:END, 1] += 1.5 * np.arange(1, END - START + 1) / (END - START)
    calibration = dataclasses.replace(CALIBRATION, relations=old)
    assert caught_while_happening(replay(x, calibration=calibration))


def test_one_sensor_or_a_file_without_relations_has_no_check() -> None:
    assert Relations.columns(1) == {}
    assert "rel_prec" not in scorer_columns(1, 1)
    plain = Calibration(100, 2.0, 1.0, {}, 20, 2.0, 0.5, 0.9999, "student_t")
    assert Scorer(ScoringConfig(), plain).relations is None
    assert Scorer(OFF, CALIBRATION).relations is None
    assert Scorer(ScoringConfig(), CALIBRATION).relations is not None


LAG_PHI = 0.95  # a load that moves within tens of steps ...
LAG = 20  # ... and a sensor that follows it with a lag of about as many (a temperature)


def lagging_stream(steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load, lagged = np.zeros(steps), np.zeros(steps)
    for t in range(1, steps):
        load[t] = LAG_PHI * load[t - 1] + math.sqrt(1.0 - LAG_PHI**2) * rng.standard_normal()
        lagged[t] = lagged[t - 1] + (load[t] - lagged[t - 1]) / LAG
    return np.stack([load, lagged], axis=1) + OWN * rng.standard_normal((steps, F))


def values_alone(prior: RelationsPrior, x: np.ndarray) -> RelationsPrior:
    """The prior a file from before the averages joined would carry: the values' covariance
    and how the average of their same-step residuals strays on ``x``."""
    cov = np.array(prior.covariance)[:F, :F]
    y = np.concatenate([x, x], axis=1)  # the averages' half does not enter the residuals
    running = np.cumsum(y, axis=0) / np.arange(1, len(y) + 1)[:, None]
    r = relation_residuals(relations_precision(np.kron(np.eye(2), cov)), y[1:] - running[:-1])
    avg = np.stack([short_average(r[:, f], 50) for f in range(F)], axis=1)[50:]
    return RelationsPrior(cov.tolist(), 50, np.mean(avg**2, axis=0).tolist(), len(avg))


def test_a_lagging_sensor_drifting_is_caught_against_the_others_averages() -> None:
    """The second sensor follows the load with a lag: at the same step it is loosely tied to
    the first, so a slow drift of it hides in that slack until it ends; against the first's
    average it is tightly tied, and the drift shows a third of the way in."""
    held_out = lagging_stream(4001, seed=99)
    both = relations_prior(Normalisation([0.0] * F, [1.0] * F), [held_out], 8, 50)
    assert both is not None
    step_var = np.var(np.diff(held_out, axis=0), axis=0)
    raw = student_t_score(held_out[1:], held_out[:-1], np.log(step_var)[None])
    avg = short_average(raw, 20)
    calibration = Calibration(4000, float(raw.mean()), float(raw.std()), {}, 20,
                              float(raw.mean()), float(avg[20:].std()), 0.9999, "student_t",
                              relations=both)  # fmt: skip
    x = lagging_stream(4000, seed=10)
    x[START:END, 1] += np.arange(1, END - START + 1) / (END - START)  # 10 own noises

    def raised(prior: RelationsPrior) -> list[int]:
        with_prior = dataclasses.replace(calibration, relations=prior)
        return replay(x, calibration=with_prior, step_var=step_var)

    assert caught_while_happening(raised(both))
    assert not caught_while_happening(raised(values_alone(both, held_out)))


def test_a_batch_learns_as_one_stream_does_and_a_row_that_does_not_learn_is_left_alone() -> None:
    """The precisions are updated feature-major, 128 streams in a row one element longer
    (``feature_major``): the same numbers as one stream alone; and a row that does not learn
    (here, the first on every step) keeps its precision to the bit."""
    prior = RelationsPrior([[1.0, 0.9], [0.9, 1.0]], 50, [0.1, 0.1], 4000)
    part = Relations(prior, 50, prior_steps=10.0, long_window=8000, calm=0.01, level=2.5e-9)
    x = related_stream(300, seed=12)
    precisions = []
    for b in (1, 128):
        cols = fresh_columns(part, b)
        ok, count = np.ones(b, np.bool_), np.zeros(b)
        learn = ok.copy()
        learn[0] = b == 1
        for t in range(len(x)):
            step(part, cols, np.repeat(x[t : t + 1], b, axis=0), ok, learn, count)
            count += 1
        precisions.append(cols["rel_prec"][-1])
        if b > 1:
            assert np.array_equal(cols["rel_prec"][0], part.prior_prec[np.triu_indices(2 * F)]
                                  .astype(np.float32))  # fmt: skip
    np.testing.assert_allclose(precisions[0], precisions[1], rtol=1e-5)


WARMUP = 50


def _after_a_start_up_transient(steps: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A stream whose sensors are both 5 spreads off for its WARMUP samples, scored: the
    scorer's columns after it, and the values."""
    scorer = Scorer(ScoringConfig(warmup_steps=WARMUP), CALIBRATION)
    cols = scorer_columns(1, F)
    x = related_stream(steps, seed=21)
    x[:WARMUP] += 5.0
    _steps(scorer, cols, x)
    return cols, x


def test_the_mean_is_learnt_past_the_warm_up_as_the_calibration_learns_it() -> None:
    """A start-up transient in the warm-up (both sensors 5 spreads off for 50 samples) does
    not become the relations' mean: it is learnt from the samples the covariance learns, as
    the calibration learns it past the network's burn-in. A running mean from the first
    sample took the transient in as its start, and its robust steps kept it there (4.8
    against 0.7 after 1,100 samples)."""
    cols, x = _after_a_start_up_transient(1100)
    assert np.all(np.abs(cols["rel_mean"][0][:F] - x[WARMUP:].mean(axis=0)) < 0.5)
    assert cols["rel_learnt"][0] == len(x) - 1 - WARMUP
    assert cols["rel_n"][0] == len(x) - 1  # the covariance's evidence counts every sample


def test_a_mean_that_starts_far_from_the_values_comes_back() -> None:
    """The values' averages carry a warm-up's transient past it, so the mean of the averages
    starts 4 spreads off. Its Huber weight for location bounds each sample's pull; the
    scatter's weight (min(1, k / q), falling as 1 / distance squared) left it 1.6 off after
    6,000 samples. (It is 0.5 off: the covariance takes in none of the transient's steps the
    check raises at, so the mean's weight stays small longer; 0.3 where it took them in.)"""
    cols, x = _after_a_start_up_transient(6000)
    after = np.tile(x[WARMUP:].mean(axis=0), 2)
    assert np.all(np.abs(cols["rel_mean"][0] - after) < 0.6)


def test_a_gap_keeps_the_mean_and_its_count_through_the_warm_up_that_follows() -> None:
    """After a gap the averages start again and the scorer warms up once more: the mean it
    had learnt is neither restarted nor moved by the warm-up's samples."""
    warmup = 50
    scorer = Scorer(ScoringConfig(warmup_steps=warmup), CALIBRATION)
    cols = scorer_columns(1, F)
    x = related_stream(1200, seed=22)
    _steps(scorer, cols, x[:1000])
    mean, learnt = cols["rel_mean"].copy(), float(cols["rel_learnt"][0])
    for name in scorer.gap_reset:
        cols[name][...] = scorer_columns(1, F)[name]
    _steps(scorer, cols, x[1000 : 1000 + warmup] + 5.0)  # the warm-up after the gap
    assert np.array_equal(cols["rel_mean"], mean)
    assert cols["rel_learnt"][0] == learnt


def test_a_state_kept_before_the_means_count_takes_the_samples_it_took_in() -> None:
    """A snapshot from before ``rel_learnt`` restores it as NaN: that mean learnt every
    sample taken in, and counts on from there."""
    scorer = Scorer(ScoringConfig(warmup_steps=50), CALIBRATION)
    cols = scorer_columns(1, F)
    x = related_stream(700, seed=23)
    _steps(scorer, cols, x[:600])
    taken = float(cols["rel_n"][0])
    cols["rel_learnt"][...] = np.nan
    _steps(scorer, cols, x[599:])
    assert cols["rel_learnt"][0] == taken + 100


def test_a_wide_models_p_d_is_taken_a_block_of_streams_at_a_time_to_the_same_bits() -> None:
    """32 sensors: a batch of 300 streams' full precisions would be 4.9 MiB, so P d is taken
    over blocks of 256 streams (``GATHER_BYTES``), the same numbers as the whole batch at once."""
    f, b = 32, 300
    cov = 0.5 * np.ones((2 * f, 2 * f)) + 0.5 * np.eye(2 * f)
    prior = RelationsPrior(cov.tolist(), 50, [0.1] * f, 4000)
    part = Relations(prior, 50, prior_steps=10.0, long_window=8000, calm=0.01, level=2.5e-9)
    rng = np.random.default_rng(32)
    packed = rng.normal(size=(b, f * (2 * f + 1))).astype(np.float32)
    prec_t = feature_major(packed)
    d_t = rng.normal(size=(2 * f, b)).astype(np.float32)
    assert GATHER_BYTES // ((2 * f) ** 2 * prec_t.itemsize) < b  # more than one block
    whole = np.einsum("ijb,jb->ib", prec_t[packing(2 * f)[0]], d_t)
    assert part._times_deviations(prec_t, d_t).tobytes() == whole.tobytes()
