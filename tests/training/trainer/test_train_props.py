"""Properties of training.trainer.train: windows with carried state equal one unbroken run."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.trainer.model import RecurrentForecaster
from training.trainer.train import iter_windows


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
