"""Properties of the training data path: gap filling, scaling, windows, synthetic time."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from training.evaluation.synth import generate_fleet
from training.trainer.data import fill_missing, robust_scale
from training.trainer.model import RecurrentForecaster
from training.trainer.train import iter_windows

PROPS = settings(
    database=None, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)

cells = st.one_of(st.just(np.nan), st.floats(-1e6, 1e6, allow_nan=False))
columns = hnp.arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 4)), elements=cells)


@PROPS
@given(columns)
def test_fill_missing_keeps_values_and_fills_from_the_last_one_seen(values: np.ndarray) -> None:
    values[0, :] = np.where(np.isnan(values).all(axis=0), 1.0, values[0, :])  # one value per col
    out = fill_missing(values)
    assert np.isfinite(out).all()
    seen = np.isfinite(values)
    assert np.array_equal(out[seen], values[seen])
    for j in range(values.shape[1]):
        first = np.flatnonzero(seen[:, j])[0]
        for t in range(len(values)):
            source = max((k for k in range(t + 1) if seen[k, j]), default=first)
            assert out[t, j] == values[source, j]


@PROPS
@given(hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e9, 1e9)))
def test_robust_scale_is_always_positive_and_finite(column: np.ndarray) -> None:
    scale = robust_scale(column)
    assert scale > 0 and np.isfinite(scale)


@settings(database=None, deadline=None, max_examples=15)
@given(st.integers(1, 60), st.integers(1, 20), st.integers(1, 20), st.sampled_from(["gru", "lstm"]))
def test_windows_with_carried_state_equal_one_unbroken_run(
    steps: int, window: int, stride: int, cell: str
) -> None:
    stride = min(stride, window)  # overlapping or back to back: every step is covered
    torch.manual_seed(0)
    model = RecurrentForecaster(2, cell, hidden_size=4).eval()
    x = torch.randn(2, steps, 2)
    with torch.no_grad():
        full, _, _ = model(x)
        for w in iter_windows(model, x, window, stride):
            assert torch.allclose(w.mean, full[:, w.start : w.stop], atol=1e-5)


@settings(database=None, deadline=None, max_examples=20)
@given(st.integers(0, 3000), st.integers(2, 400), st.integers(0, 50))
def test_a_fleet_generated_later_continues_the_earlier_one(start: int, n: int, seed: int) -> None:
    later = generate_fleet(2, n, seed=seed, start_step=start, features=("a", "b", "c"))
    whole = generate_fleet(2, start + n, seed=seed, features=("a", "b", "c"))
    assert np.array_equal(later.values, whole.values[:, start:])
