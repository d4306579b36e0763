"""Scoring a stream does not depend on which other streams share its batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.scoring import (
    Scorer,
    ScoringConfig,
    StepScores,
    scorer_column_specs,
    scorer_columns,
)
from detector.scoring.calibration import Calibration
from detector.state import Column, StateTable

PROPS = settings(
    database=None, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
F = 2  # features


@dataclass(frozen=True)
class Obs:
    """One step of one stream: observation, the prediction made for it, and whether it exists."""

    z: tuple[float, ...]
    mean: tuple[float, ...]
    log_var: tuple[float, ...]
    has_pred: bool


@dataclass(frozen=True)
class Out:
    """One stream's share of a StepScores, comparable exactly (NaN equal to NaN)."""

    raw: float
    likelihood: float
    score: float
    std_errors: tuple[float, ...]
    raised: bool
    cleared: bool
    active: bool
    episode: int

    def key(self) -> tuple[object, ...]:
        def same(v: float) -> object:
            return "nan" if math.isnan(v) else v

        return (same(self.raw), self.likelihood, self.score,
                tuple(same(v) for v in self.std_errors),
                self.raised, self.cleared, self.active, self.episode)  # fmt: skip


def pick(scores: StepScores, k: int) -> Out:
    return Out(
        raw=float(scores.raw[k]),
        likelihood=float(scores.likelihood[k]),
        score=float(scores.score[k]),
        std_errors=tuple(float(v) for v in scores.std_errors[k]),
        raised=bool(scores.raised[k]),
        cleared=bool(scores.cleared[k]),
        active=bool(scores.active[k]),
        episode=int(scores.episode[k]),
    )


calm = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False)
spike = st.floats(min_value=-80.0, max_value=80.0, allow_nan=False)
observations = st.builds(
    Obs,
    z=st.tuples(*[st.one_of(calm, calm, calm, spike)] * F),
    mean=st.tuples(*[st.floats(min_value=-1.0, max_value=1.0)] * F),
    log_var=st.tuples(*[st.floats(min_value=-2.0, max_value=2.0)] * F),
    has_pred=st.sampled_from([True, True, True, True, False]),
)
configs = st.builds(
    ScoringConfig,
    warmup_steps=st.integers(0, 4),
    short_window=st.integers(1, 5),
    long_window=st.integers(3, 60),
    threshold=st.sampled_from([0.9, 0.99, 0.9999]),
    clear_threshold=st.sampled_from([0.5, 0.8, 0.9]),
    clear_steps=st.integers(1, 3),
    onset_hold_steps=st.integers(0, 3),
    stuck_check=st.booleans(),
    step_check=st.booleans(),
)
CALIBRATION = Calibration(
    n=1000, mean=2.0, std=1.0, quantiles={}, window=10, window_mean=2.0, window_std=0.5,
    threshold=0.9999,
)  # fmt: skip


def fresh_columns(b: int) -> dict[str, np.ndarray]:
    return scorer_columns(b, F)


def step(
    scorer: Scorer, cols: dict[str, np.ndarray], batch: list[Obs], ts: list[float]
) -> StepScores:
    return scorer.step_batch(
        cols,
        np.array([o.z for o in batch], dtype=np.float64).reshape(len(batch), F),
        np.array([o.mean for o in batch], dtype=np.float64).reshape(len(batch), F),
        np.array([o.log_var for o in batch], dtype=np.float64).reshape(len(batch), F),
        np.array([o.has_pred for o in batch], dtype=np.bool_),
    )


def alone(config: ScoringConfig, sequence: list[Obs]) -> list[Out]:
    """The reference: one stream, stepped one observation at a time, nobody else around."""
    scorer = Scorer(config, CALIBRATION)
    cols = fresh_columns(1)
    return [pick(step(scorer, cols, [obs], [float(t)]), 0) for t, obs in enumerate(sequence)]


def assert_same(got: list[Out], expected: list[Out], stream: int) -> None:
    assert len(got) == len(expected)
    for t, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.key() == e.key(), (stream, t, g, e)


@PROPS
@given(
    config=configs,
    sequences=st.integers(1, 5).flatmap(
        lambda t: st.lists(st.lists(observations, min_size=t, max_size=t), min_size=1, max_size=4)
    ),
)
def test_batched_steps_agree_with_one_at_a_time(
    config: ScoringConfig, sequences: list[list[Obs]]
) -> None:
    # Equal-length sequences, all streams stepped together: one step_batch per time step.
    scorer = Scorer(config, CALIBRATION)
    b = len(sequences)
    cols = fresh_columns(b)
    got: list[list[Out]] = [[] for _ in range(b)]
    for t in range(len(sequences[0])):
        scores = step(scorer, cols, [seq[t] for seq in sequences], [float(t)] * b)
        for k in range(b):
            got[k].append(pick(scores, k))
    for k, seq in enumerate(sequences):
        assert_same(got[k], alone(config, seq), k)


@PROPS
@given(
    config=configs,
    sequences=st.lists(st.lists(observations, min_size=1, max_size=25), min_size=2, max_size=4),
    data=st.data(),
)
def test_interleaving_other_streams_never_changes_a_stream(
    config: ScoringConfig, sequences: list[list[Obs]], data: st.DataObject
) -> None:
    # Streams arrive in batches of varying make-up and order, their columns kept in a
    # StateTable the way the engine keeps them (gather, step, scatter).
    table = StateTable(
        {
            name: Column(shape, dtype, fill)
            for name, (shape, dtype, fill) in scorer_column_specs(F).items()
        },  # fmt: skip
        max_streams=16,
        initial_capacity=1,
    )
    scorer = Scorer(config, CALIBRATION)
    ids = [f"stream-{k}" for k in range(len(sequences))]
    position = [0] * len(sequences)
    got: list[list[Out]] = [[] for _ in sequences]
    clock = 0.0
    while True:
        waiting = [k for k, seq in enumerate(sequences) if position[k] < len(seq)]
        if not waiting:
            break
        members = data.draw(st.permutations(waiting).flatmap(
            lambda p: st.integers(1, len(p)).map(lambda n: p[:n])  # noqa: B023
        ))  # fmt: skip
        clock += 1.0
        rows = table.rows_for([ids[k] for k in members], now=clock)
        cols = table.gather(rows)
        scores = step(
            scorer, cols, [sequences[k][position[k]] for k in members],
            [float(position[k]) for k in members],
        )  # fmt: skip
        table.scatter(rows, cols)
        for j, k in enumerate(members):
            got[k].append(pick(scores, j))
            position[k] += 1
    for k, seq in enumerate(sequences):
        assert_same(got[k], alone(config, seq), k)


@PROPS
@given(config=configs, sequence=st.lists(observations, min_size=1, max_size=40))
def test_scores_stay_in_range_and_events_alternate(
    config: ScoringConfig, sequence: list[Obs]
) -> None:
    outs = alone(config, sequence)
    active = False
    for out, obs in zip(outs, sequence, strict=True):
        assert 0.0 <= out.likelihood <= 1.0
        assert math.isnan(out.raw) == (not obs.has_pred)
        assert not (out.raised and out.cleared)
        if out.raised:
            assert not active
        if out.cleared:
            assert active
        active = (active or out.raised) and not out.cleared
        assert out.active == active
