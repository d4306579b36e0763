"""Each part that learns keeps scoring apart from learning: ``score`` judges a step by what
the part has learnt so far and moves none of it; ``learn`` moves it, on the rows it is given.

Every part runs a few hundred steps of a small hand-made stream (two related sensors, one
of them quantised so that it repeats), then scores one more step, a value beyond all seen:
what the part learns is the same to the bit. Learning that step moves it, and learning it
on no row does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from detector.scoring.calibration import Calibration, RelationsPrior
from detector.scoring.inputs import InputScale
from detector.scoring.likelihood import Likelihood
from detector.scoring.relations import Relations
from detector.scoring.sensors import Range, Stuck
from detector.scoring.surprise import StepTail

F = 2
B = 3  # streams in the batch; each learns
OK = np.ones(B, np.bool_)  # every row scored
STEPS = 400


def stream(steps: int, seed: int) -> np.ndarray:
    """[steps, B, F]: a slow load each sensor follows, the second rounded to 0.5 (it
    repeats itself), and now and then a value beyond all seen."""
    rng = np.random.default_rng(seed)
    load = np.cumsum(rng.normal(0.0, 0.1, (steps, B)), axis=0)
    x = np.stack([load, 0.8 * load], axis=-1) + rng.normal(0.0, 0.1, (steps, B, F))
    x[..., 1] = np.round(x[..., 1] * 2.0) / 2.0
    x[steps // 2 :: 97, :, 0] += 20.0
    return x


def columns(specs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.full((B, *sh), v, dt) for k, (sh, dt, v) in specs.items()}


def snapshot(cols: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: cols[name].tobytes() for name in names}


PRIOR = RelationsPrior([[1.0, 0.8], [0.8, 1.0]], 50, [0.1, 0.1], 4000)
CALIBRATION = Calibration(1000, 2.0, 1.0, {}, 20, 2.0, 0.5, 0.9999)


class Case:
    """A part, its columns, and how to score and learn one step of it (``learn``: the
    rows that learn)."""

    def __init__(
        self,
        specs: dict[str, Any],
        learnt: tuple[str, ...],
        score: Callable[[dict[str, np.ndarray], np.ndarray, int], Any],
        learn: Callable[[dict[str, np.ndarray], Any, np.ndarray, np.ndarray], None],
    ) -> None:
        self.specs, self.learnt, self.score, self.learn = specs, learnt, score, learn


def stuck_case() -> Case:
    part = Stuck(long_window=200)
    return Case(
        part.columns(F),
        ("repeats", "compared"),
        lambda cols, x, t: part.score(cols, x, OK),
        lambda cols, scored, x, rows: part.learn(cols, scored) if rows.all() else None,
    )


def range_case() -> Case:
    part = Range(tolerance=0.01)
    return Case(
        part.columns(F),
        ("seen_min", "seen_max"),
        lambda cols, x, t: part.score(cols, x, OK),
        lambda cols, scored, x, rows: part.learn(cols, x) if rows.all() else None,
    )


def relations_case() -> Case:
    part = Relations(PRIOR, 50, prior_steps=10.0, long_window=8000, calm=0.01, level=2.5e-9)
    return Case(
        part.columns(F),
        ("rel_mean", "rel_prec", "rel_var", "rel_learnt"),
        lambda cols, x, t: part.score(cols, x, OK, np.full(B, float(t))),
        lambda cols, scored, x, rows: part.learn(cols, scored, rows),
    )


def likelihood_case() -> Case:
    names = ("avg", "mean", "var")
    part = Likelihood(names, 20, CALIBRATION, 8000, 100.0)
    specs = {name: ((), np.float64, np.nan) for name in names} | {"n_scored": ((), np.int64, 0)}

    def score(cols: dict[str, np.ndarray], x: np.ndarray, t: int) -> Any:
        cols["n_scored"][:] = t
        return part.score(cols, np.abs(x).sum(axis=1), OK, np.full(B, t))[1]

    def learn(cols: dict[str, np.ndarray], delta: Any, x: np.ndarray, rows: np.ndarray) -> None:
        part.learn(cols, rows, delta, cols["n_scored"])

    return Case(specs, ("mean", "var"), score, learn)


def step_tail_case() -> Case:
    part = StepTail(100.0, 8000, 20)  # the values stand in for the errors

    def score(cols: dict[str, np.ndarray], x: np.ndarray, t: int) -> Any:
        spread = StepTail.spread(cols, x)
        part.score(cols, spread)
        return spread

    def learn(cols: dict[str, np.ndarray], spread: Any, x: np.ndarray, rows: np.ndarray) -> None:
        part.learn(cols, spread, rows, np.full(B, 400))

    learnt = ("error_var", "tail_rate", "tail_excess_sq", "tail_peak", "tail_calm")
    return Case(part.columns(F), learnt, score, learn)


def input_scale_case() -> Case:
    part = InputScale(16000)
    return Case(
        part.columns(F),
        ("input_var",),
        lambda cols, x, t: part.model_inputs(cols, x),
        lambda cols, scored, x, rows: part.learn(cols, x) if rows.all() else None,
    )


CASES = {
    "stuck": stuck_case,
    "range": range_case,
    "relations": relations_case,
    "likelihood": likelihood_case,
    "step_tail": step_tail_case,
    "input_scale": input_scale_case,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scoring_moves_nothing_a_part_has_learnt(name: str) -> None:
    case = CASES[name]()
    cols = columns(case.specs)
    x = stream(STEPS + 1, seed=3)
    x[STEPS, :, 0] += 50.0  # the step judged last: beyond all seen, far from the relations
    every = np.ones(B, np.bool_)
    for t in range(STEPS):
        case.learn(cols, case.score(cols, x[t], t), x[t], every)
    before = snapshot(cols, case.learnt)
    scored = case.score(cols, x[STEPS], STEPS)
    assert snapshot(cols, case.learnt) == before  # scoring: nothing learnt moved
    case.learn(cols, scored, x[STEPS], np.zeros(B, np.bool_))
    assert snapshot(cols, case.learnt) == before  # learning on no row: nothing moved
    case.learn(cols, scored, x[STEPS], every)
    after = snapshot(cols, case.learnt)
    assert any(after[k] != before[k] for k in case.learnt)  # learning it: it moved
