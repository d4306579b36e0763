"""Properties of training.evaluation.synth: a fleet generated later continues the earlier one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from training.evaluation.synth import generate_fleet


@settings(database=None, deadline=None, max_examples=20)
@given(st.integers(0, 3000), st.integers(2, 400), st.integers(0, 50))
def test_a_fleet_generated_later_continues_the_earlier_one(start: int, n: int, seed: int) -> None:
    later = generate_fleet(2, n, seed=seed, start_step=start, features=("a", "b", "c"))
    whole = generate_fleet(2, start + n, seed=seed, features=("a", "b", "c"))
    assert np.array_equal(later.values, whole.values[:, start:])
