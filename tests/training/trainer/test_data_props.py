"""Properties of training.trainer.data: gap filling and scaling."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from training.trainer.data import fill_missing, robust_scale

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
