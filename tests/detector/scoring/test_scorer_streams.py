"""The scorer's parts on small hand-made streams, each failure caught while it happens.

A stream here is an AR(1) series of unit variance, z_t = PHI z_{t-1} + NOISE e_t, and the
"model" is its exact one-step predictor (mean PHI z_{t-1}, variance NOISE^2), so every
surprise comes from what was injected, not from a model's mistakes.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from detector.scoring import Scorer, ScoringConfig, combine_tails, scorer_columns
from detector.scoring.calibration import Calibration
from detector.scoring.likelihood import Likelihood, prior_steps
from detector.scoring.sensors import Stuck
from detector.scoring.surprise import (
    TAIL_PRIOR_STEPS,
    StepTail,
    pooled_excess,
    student_t_score,
    tail_prior,
)

PHI = 0.9
NOISE = math.sqrt(1.0 - PHI**2)  # the stream's variance is 1
F = 2


def normal_stream(steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = np.zeros((steps, F))
    for t in range(1, steps):
        z[t] = PHI * z[t - 1] + NOISE * rng.standard_normal(F)
    return z


def calibration_of(steps: int = 2000, window: int = 20) -> Calibration:
    """What the trainer measures: the raw score of the exact predictor on held-out data."""
    z = normal_stream(steps + 1, seed=99)
    log_var = np.full((steps, F), math.log(NOISE**2))
    raw = student_t_score(z[1:], PHI * z[:-1], log_var)
    avg = np.array([raw[max(0, i - window + 1) : i + 1].mean() for i in range(len(raw))])
    return Calibration(steps, float(raw.mean()), float(raw.std()), {}, window,
                       float(raw.mean()), float(avg.std()), 0.9999, "student_t")  # fmt: skip


def replay(
    z: np.ndarray, config: ScoringConfig | None = None, calibration: Calibration | None = None
) -> list[int]:
    """Step one stream through a Scorer with the exact predictor; the steps that raise."""
    scorer = Scorer(config or ScoringConfig(), calibration or calibration_of())
    cols = scorer_columns(1, F)
    log_var = np.full((1, F), math.log(NOISE**2))
    raised = []
    for t in range(1, len(z)):
        out = scorer.step_batch(cols, z[t : t + 1], PHI * z[t - 1 : t], log_var, np.ones(1, bool))
        if out.raised[0]:
            raised.append(t)
    return raised


START, END = 3000, 3600


def caught_while_happening(raised: list[int], start: int = START, end: int = END) -> bool:
    return any(start <= t < end for t in raised)


def test_a_long_normal_stream_raises_nothing() -> None:
    assert replay(normal_stream(20_000, seed=1)) == []


def test_a_spike_is_caught_at_once() -> None:
    z = normal_stream(4000, seed=2)
    z[START, 0] += 4.0  # ten of the predictor's sigmas, one step
    raised = replay(z)
    assert raised and raised[0] == START


def test_a_level_shift_is_caught_at_once() -> None:
    z = normal_stream(4000, seed=3)
    z[START:, 1] += 4.0
    raised = replay(z)
    assert raised and raised[0] in (START, START + 1)


def replay_held_back(z: np.ndarray, clean: np.ndarray) -> list[int]:
    """``replay``, the predictor working from ``clean``: a model whose outliers were held
    back (``Scorer.model_feed``) predicts from what the stream was doing."""
    scorer = Scorer(ScoringConfig(), calibration_of())
    cols = scorer_columns(1, F)
    log_var = np.full((1, F), math.log(NOISE**2))
    raised = []
    for t in range(1, len(z)):
        out = scorer.step_batch(cols, z[t : t + 1], PHI * clean[t - 1 : t], log_var,
                                np.ones(1, bool))  # fmt: skip
        if out.raised[0]:
            raised.append(t)
    return raised


def test_a_spike_of_two_samples_is_caught_as_a_pair() -> None:
    """Two samples 4.5 spreads out, each well within what one sample's tail lets pass at the
    alert's level (and too few for the average), are caught on the second, as a pair; one
    such sample alone is not."""
    clean = normal_stream(4000, seed=6)
    two, one = clean.copy(), clean.copy()
    for t in (START, START + 1):  # errors of exactly 4.5 against the clean prediction
        two[t, 0] = PHI * clean[t - 1, 0] + 4.5 * NOISE
    one[START, 0] = two[START, 0]
    assert replay_held_back(two, clean) == [START + 1]
    assert replay_held_back(one, clean) == []


def test_a_stuck_sensor_is_caught_while_it_is_stuck() -> None:
    z = normal_stream(4000, seed=4)
    z[START:END, 0] = z[START - 1, 0]  # the sensor repeats its last reading
    raised = replay(z)
    assert caught_while_happening(raised)
    assert raised[0] - START <= 5  # a continuous sensor never repeated before: a few steps
    # one alert for one stuck run, though the average clears it long before the run ends
    assert len([t for t in raised if START <= t < END]) == 1
    assert not caught_while_happening(replay(z, ScoringConfig(stuck_check=False)))


def test_a_slow_ramp_is_caught_while_it_ramps() -> None:
    """A drift of 1/100 of the stream's spread a step: each step looks like the last one, but
    the predictor's errors lean one way as the ramp steepens against its pull to the mean,
    and the alert's average sees them before the ramp ends."""
    z = normal_stream(4000, seed=5)
    z[START:END, 0] += 0.01 * np.arange(1, END - START + 1)
    assert caught_while_happening(replay(z))


def test_combine_tails_corrects_for_looking_at_several() -> None:
    tails = combine_tails(np.array([1e-9, 0.3]), np.array([0.5, 0.4]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(tails, [3e-9, 0.9])


def test_the_likelihood_prior_fades_as_the_streams_evidence_grows() -> None:
    """A stream whose average sits at another level than the calibration's: its long-run
    mean moves to its own level at a rate set by the calibration's own evidence."""
    cal = calibration_of()
    light = Likelihood(("a", "m", "v"), 20, cal, 8000, float(cal.n))
    heavy = Likelihood(("a", "m", "v"), 20, cal, 8000, 8000.0)
    means = []
    for part in (light, heavy):
        cols = {k: np.full(1, np.nan) for k in ("a", "m", "v")}
        n = np.zeros(1, np.int64)
        ok = np.ones(1, bool)
        for _ in range(cal.n):
            _, delta = part.score(cols, np.array([cal.window_mean + 1.0]), ok, n)
            part.learn(cols, ok, delta, n)
            n += 1
        means.append(float(cols["m"][0]) - cal.window_mean)
    # after as many steps as the calibration rests on, about half-way to its own level
    assert means[0] == pytest.approx(0.5, abs=0.05)
    assert means[1] < 0.3


def test_a_fleet_calibration_lets_a_stream_find_its_own_level() -> None:
    """A model that served unlike streams at training says so (level_std), and a stream whose
    errors run at another level than the calibration's learns it before it looks anomalous;
    a calibration of one stream is trusted for the stream's whole memory, and the same
    stream alerts."""
    one = calibration_of()
    fleet = replace(one, level_std=0.3 * one.std)
    assert prior_steps(one, 8000) == 8000.0
    assert prior_steps(fleet, 8000) == pytest.approx(1 / 0.09 - 1)
    z = normal_stream(4000, seed=9)
    rng = np.random.default_rng(10)
    z[1:] += 0.8 * NOISE * rng.standard_normal((len(z) - 1, F))  # a noisier machine
    assert replay(z, calibration=fleet) == []
    assert replay(z, calibration=one) != []


def test_a_fleet_calibration_lets_a_noisier_stream_learn_its_own_error_scale() -> None:
    """The per-step check's error scale: a fleet's model, measured over machines of unlike
    noise, counts its variance as the weakest proper prior and gives way to a noisier
    machine's own scale from its first samples; a model of one stream keeps the held-out
    steps it was measured on."""
    one = calibration_of()
    fleet = replace(one, level_std=0.3 * one.std)  # a likelihoods' weight of about 10 steps
    z = normal_stream(600, seed=11)
    z[1:] += math.sqrt(1.25) * NOISE * np.random.default_rng(12).standard_normal((599, F))
    scales = {}
    for name, cal in (("one", one), ("fleet", fleet)):
        scorer = Scorer(ScoringConfig(), cal)
        assert scorer.step.prior_steps == (2.0 if cal is fleet else float(cal.n))
        cols = scorer_columns(1, F)
        log_var = np.full((1, F), math.log(NOISE**2))
        for t in range(1, len(z)):
            scorer.step_batch(cols, z[t : t + 1], PHI * z[t - 1 : t], log_var, np.ones(1, bool))
        scales[name] = cols["error_var"][0]
    # its own: about 3.3 times the model's variance (the extra noise is in the last value the
    # prediction starts from, too)
    assert (scales["fleet"] > 2.0).all()
    assert (scales["one"] < 1.4).all()  # 2,000 held-out steps outweigh 600 of its own


def test_a_new_stream_far_from_a_few_calibration_streams_is_not_yet_anomalous() -> None:
    """A stream's first steps say little about its own level. Where the calibration's spread
    of levels came from a few streams, a level several of those spreads away is what such a
    population allows (a Student t), not a near-impossible Gaussian deviation; once the
    stream's own evidence outweighs the calibration, its level is judged on that evidence."""
    cal = replace(calibration_of(), level_std=0.2 * calibration_of().std)
    config = ScoringConfig()
    weight = prior_steps(cal, config.long_window)
    tails = {}
    for streams in (0, 8):
        part = Likelihood(("a", "m", "v"), 50, replace(cal, level_streams=streams),
                          config.long_window, weight)  # fmt: skip
        cols = {k: np.full(1, np.nan) for k in "amv"}
        cols["n_scored"] = np.array([30])
        ok = np.ones(1, bool)
        level = cal.mean + 8.0 * cal.level_std  # eight spreads above the population's
        for count in range(30):
            part.score(cols, np.array([level]), ok, np.array([count]))
        young, _ = part.score(cols, np.array([level]), ok, np.array([30]))
        cols["n_scored"] = np.array([100_000])  # as if its own steps had taught it nothing
        old, _ = part.score(cols, np.array([level]), ok, np.array([31]))
        tails[streams] = float(young[0]), float(old[0])
    assert tails[8][0] > 1e3 * tails[0][0]  # measured on a few streams: far likelier
    assert tails[8][1] == pytest.approx(tails[0][1], rel=1e-3)  # much evidence: a Gaussian


def test_the_step_tail_learns_each_streams_own_error_scale() -> None:
    part = StepTail(prior_steps=10.0, long_window=1000, cluster_gap=20)
    cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in part.columns(F).items()}
    rng = np.random.default_rng(6)
    ok = np.ones(1, bool)
    for n in range(500):  # a stream whose errors spread twice as wide as the model says
        errors = 2.0 * rng.standard_normal((1, F))
        part.learn(cols, part.spread(cols, errors), ok, np.array([n]))
    assert cols["error_var"][0] == pytest.approx([4.0, 4.0], rel=0.2)
    # an error of 8 is 4 of this stream's spreads: not remarkable on its own
    assert part.score(cols, part.spread(cols, np.array([[8.0, 0.0]])))[0] > 1e-6


def tail_after_a_burst(cluster_gap: int) -> float:
    """The tail of a 7-spread error, 500 steps after a noise burst of 30 steps at five times
    the usual errors, on a stream 3,000 steps old."""
    part = StepTail(prior_steps=10.0, long_window=8000, cluster_gap=cluster_gap)
    cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in part.columns(F).items()}
    rng = np.random.default_rng(8)
    ok = np.ones(1, bool)
    for n in range(3530):
        scale = 5.0 if 3000 <= n < 3030 else 1.0
        errors = scale * rng.standard_normal((1, F))
        part.learn(cols, part.spread(cols, errors), ok, np.array([n]))
    return float(part.score(cols, part.spread(cols, np.array([[7.0, 0.0]])))[0])


def test_a_noise_burst_teaches_the_step_tail_once() -> None:
    """Runs declustering: the burst's exceedances are one cluster, and its peak alone moves
    the tail's mean excess, so a spike after it still passes the alert level (2.5e-9 with
    four signals); a cluster that ends at its first calm step lets the burst teach it
    many times."""
    assert tail_after_a_burst(cluster_gap=20) < 1e-9
    assert tail_after_a_burst(cluster_gap=1) > 2.5e-8


def test_a_sensor_that_jumps_by_habit_starts_from_the_models_tail() -> None:
    """A reading that jumps by quanta: 50 spreads in one step of ten in held-out errors. Its
    tail starts there, so its usual jump does not alert a new stream; a Gaussian's would."""
    rng = np.random.default_rng(9)
    held_out = rng.standard_normal((2000, F))
    held_out[rng.random(2000) < 0.1, 1] = 50.0
    rate, excess = tail_prior(held_out)
    assert rate[1] == pytest.approx(0.1, rel=0.2) and excess[1] > 1000.0
    assert rate[0] < 0.01 and excess[0] < 2.0  # the Gaussian feature: near a Gaussian's
    jump = np.array([[0.0, 50.0]])
    tails = []
    for prior in ((rate, excess), None):
        part = StepTail(prior_steps=10.0, long_window=8000, cluster_gap=20, prior=prior)
        cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in part.columns(F).items()}
        part.start(cols, np.ones(1, bool))
        tails.append(float(part.score(cols, part.spread(cols, jump))[0]))
    assert tails[0] > 1e-3 and tails[1] < 1e-100


def far_tails(tail_steps: float, streams: int = 12) -> list[float]:
    """The tail of a 6.5-spread error on streams of Gaussian errors 3,000 steps old, each
    having learnt its tail from a model's (the Gaussian's) counted as ``tail_steps``."""
    gaussian = tail_prior(np.zeros((0, F)))  # no held-out errors: the Gaussian's
    ok = np.ones(1, bool)
    out = []
    for seed in range(streams):
        part = StepTail(10.0, 8000, 20, prior=gaussian, tail_steps=tail_steps)
        cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in part.columns(F).items()}
        part.start(cols, ok)
        rng = np.random.default_rng(100 + seed)
        for n in range(3000):
            part.learn(cols, part.spread(cols, rng.standard_normal((1, F))), ok, np.array([n]))
        out.append(float(part.score(cols, part.spread(cols, np.array([[6.5, 0.0]])))[0]))
    return out


def test_the_models_tail_counts_as_the_steps_it_was_measured_on() -> None:
    """A tail learnt from a stream's own few exceedances beyond 3 spreads, taken out to 6.5,
    strays by orders of magnitude from one stream to the next, both ways, though every
    stream's errors are alike (here over seven decades); counted as the 6,400 held-out
    steps it was measured on, the model's tail holds them to under half that spread."""
    sd = {}
    for steps in (TAIL_PRIOR_STEPS, 6400.0):
        sd[steps] = float(np.std(np.log10(far_tails(steps))))  # in decades
    assert sd[TAIL_PRIOR_STEPS] > 1.5
    assert sd[6400.0] < sd[TAIL_PRIOR_STEPS] / 2.0


def test_a_models_tail_is_one_across_its_sensors_where_they_are_alike() -> None:
    """Eight sensors of Gaussian errors, 6,400 held-out steps: each one's mean excess, from
    its 17 or so exceedances, strays from the Gaussian's by a sixth on average; pooled
    across the sensors, by under half that, on every draw. A sensor with heavy-tailed
    (Laplace) errors among them keeps its own tail, heavier than any of the others'. The
    step check starts every stream from the pooled tail."""
    gaussian = tail_prior(np.zeros((0, 1)))[1][0]
    own, pooled = [], []
    for seed in range(5):
        rng = np.random.default_rng(40 + seed)
        errors = rng.standard_normal((6400, 8))
        rate, excess = tail_prior(errors)
        shared = pooled_excess(rate, excess, 6400.0)
        own.append(float(np.abs(np.log(np.array(excess) / gaussian)).mean()))
        pooled.append(float(np.abs(np.log(np.array(shared) / gaussian)).mean()))
        assert pooled[-1] < own[-1]
        errors[:, 3] = rng.laplace(scale=1.0 / math.sqrt(2.0), size=6400)  # variance 1
        rate, excess = tail_prior(errors)
        heavy = pooled_excess(rate, excess, 6400.0)
        assert heavy[3] > 0.9 * excess[3] and heavy[3] > 1.5 * max(heavy[:3] + heavy[4:])
    assert np.mean(pooled) < np.mean(own) / 2.0
    assert pooled_excess([0.003], [2.0], 6400.0) == [2.0]  # one sensor: its own
    part = StepTail(2.0, 8000, 20, prior=(rate, excess), tail_steps=6400.0)
    cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in part.columns(8).items()}
    part.start(cols, np.ones(1, bool))
    assert cols["tail_excess_sq"][0] == pytest.approx(heavy, rel=1e-6)
    assert cols["tail_rate"][0] == pytest.approx(rate, rel=1e-6)


def test_a_sensor_that_jumps_by_habit_unlike_the_models_is_learnt_in_time() -> None:
    """A machine whose sensor jumps 20 spreads every 50 steps, where the model's held-out
    errors (6,400 steps of them) showed none: its first jumps raise, then the tail learns
    them as a habit and the rest pass; the model's count sets how many repeats that takes
    (a stream's own count, 370 steps, takes fewer)."""
    gaussian = tail_prior(np.zeros((0, 4)))
    raised = {}
    for steps in (TAIL_PRIOR_STEPS, 6400.0):
        part = StepTail(2.0, 8000, 20, prior=gaussian, tail_steps=steps)
        cols = {k: np.full((1, *sh), v, dt) for k, (sh, dt, v) in part.columns(4).items()}
        ok = np.ones(1, bool)
        part.start(cols, ok)
        rng = np.random.default_rng(3)
        raised[steps] = []
        for n in range(6000):
            errors = rng.standard_normal((1, 4))
            if n % 50 == 25:
                errors[0, 1] = 20.0
            x = part.spread(cols, errors)
            if n % 50 == 25 and float(part.score(cols, x)[0]) < 2.5e-9:  # an alert's level
                raised[steps].append(n)
            part.learn(cols, x, ok, np.array([n]))
    assert 0 < len(raised[TAIL_PRIOR_STEPS]) < len(raised[6400.0])
    assert max(raised[6400.0]) < 3000  # of 6,000 steps: the second half raises nothing


def test_a_fleets_error_scale_is_each_streams_own_its_tail_the_models() -> None:
    """A fleet's machines differ in noise: its model's variance counts as the weakest proper
    prior of a stream's error scale (2 samples); a model of one stream counts its own as the
    held-out steps it was measured on. The tail's shape counts as those steps either way; a
    file without one has the Gaussian's, counted as one exceedance's worth."""
    tail = {"tail_rate": [0.003] * F, "tail_excess": [0.9] * F}
    one = replace(calibration_of(), n=6400, **tail)
    fleet = replace(one, level_std=0.3 * one.std, level_streams=8)  # a weight of about 10
    bare = replace(one, tail_rate=None, tail_excess=None)
    steps = {
        name: (
            Scorer(ScoringConfig(), cal).step.prior_steps,
            Scorer(ScoringConfig(), cal).step.tail_steps,
        )
        for name, cal in (("one", one), ("fleet", fleet), ("bare", bare))
    }
    assert steps["one"] == (6400.0, 6400.0)
    assert steps["fleet"] == (2.0, 6400.0)
    assert steps["bare"] == (6400.0, TAIL_PRIOR_STEPS)


def test_stuck_needs_a_longer_run_on_a_sensor_that_often_repeats() -> None:
    """A coarse sensor that repeats half the time is not stuck after a few repeats."""
    part = Stuck(long_window=10_000)
    cols = {
        k: np.full((1, *shape), fill, dtype) for k, (shape, dtype, fill) in part.columns(1).items()
    }
    ok = np.ones(1, bool)
    rng = np.random.default_rng(7)
    value = 0.0
    for _ in range(2000):
        if rng.random() < 0.5:
            value += 1.0
        part.learn(cols, part.score(cols, np.array([[value]]), ok))
    while True:
        scored = part.score(cols, np.array([[value]]), ok)
        part.learn(cols, scored)
        if float(scored.tail[0]) <= 1e-8:
            break
    assert cols["repeat_run"][0, 0] > 20


def test_an_alert_names_the_sensor_of_the_signal_that_raised_it() -> None:
    """A spike on sensor 1 and, later, a stuck sensor 0: each alert names its own sensor."""
    z = normal_stream(4000, seed=8)
    z[2000, 1] += 4.0
    z[START:END, 0] = z[START - 1, 0]
    scorer = Scorer(ScoringConfig(), calibration_of())
    cols = scorer_columns(1, F)
    log_var = np.full((1, F), math.log(NOISE**2))
    named = {}
    for t in range(1, len(z)):
        out = scorer.step_batch(cols, z[t : t + 1], PHI * z[t - 1 : t], log_var, np.ones(1, bool))
        if out.raised[0]:
            named[t] = int(np.argmax(out.contributions[0]))
    assert named.get(2000) == 1
    stuck = [t for t in named if START <= t < END]
    assert stuck and named[stuck[0]] == 0
