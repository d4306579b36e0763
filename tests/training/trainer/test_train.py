"""training.trainer.model and .train: shapes, carried state, clipping, stopping, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detector.errors import ConfigError, DataError
from training.trainer.cli import DEFAULTS
from training.trainer.model import (
    LEVEL_CHUNK,
    LOG_VAR_MAX,
    LOG_VAR_MIN,
    RecurrentForecaster,
    level_gain,
    smooth,
)
from training.trainer.train import (
    EpochStats,
    TrainOptions,
    clip_gradients,
    evaluate,
    gaussian_nll,
    iter_windows,
    make_lanes,
    optimise_step,
    pack,
    speed,
    torch_threads,
    train,
)

F = 3


def sine_streams(n_streams: int = 3, steps: int = 300, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    return [
        np.stack(
            [
                np.sin(2 * np.pi * t / 40 + s + j) * (j + 1) + 0.1 * rng.normal(size=steps)
                for j in range(F)
            ],
            axis=1,
        )
        + 10.0 * s
        for s in range(n_streams)
    ]


def tiny(**kw: object) -> TrainOptions:
    base: dict[str, object] = dict(hidden_size=8, window=16, burn_in=4, epochs=2, batch_size=4)
    base.update(kw)
    return TrainOptions(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_forward_shapes_and_log_var_range(cell: str) -> None:
    torch.manual_seed(0)
    model = RecurrentForecaster(F, cell, layers=2, hidden_size=5, dropout=0.1)
    x = torch.randn(4, 7, F) * 100  # extreme inputs push the raw log-variance far out
    with torch.no_grad():
        mean, log_var, state = model(x)
    assert mean.shape == log_var.shape == (4, 7, F)
    cell_states = 2 if cell == "lstm" else 1
    assert len(state) == cell_states + 1  # and the inputs' smoothed level
    assert all(s.shape == (2, 4, 5) for s in state[:cell_states]) and state[-1].shape == (1, 4, F)
    assert float(log_var.min()) >= LOG_VAR_MIN and float(log_var.max()) <= LOG_VAR_MAX
    plain = RecurrentForecaster(F, cell, layers=2, hidden_size=5, skip="input")
    assert len(plain(x)[2]) == cell_states  # no level: the last input is the skip's


def test_the_smoothed_level_is_the_recurrence_written_out() -> None:
    """The closed form over chunks of steps equals l_t = l_(t-1) + g (x_t - l_(t-1)) step by
    step, across chunk boundaries, for gains from slow to nearly persistence."""
    torch.manual_seed(4)
    x = torch.randn(2, 2 * LEVEL_CHUNK + 7, 3, dtype=torch.float64)
    start = torch.randn(2, 3, dtype=torch.float64)
    gain = level_gain(torch.tensor([-2.0, 0.0, 30.0], dtype=torch.float64))  # 0.12, 0.5, ~1
    level, expected = start, []
    for t in range(x.shape[1]):
        level = level + gain * (x[:, t] - level)
        expected.append(level)
    got = smooth(x, start, gain)
    assert torch.allclose(got, torch.stack(expected, dim=1), atol=1e-9)
    assert torch.allclose(got[:, :, 2], x[:, :, 2], atol=1e-5)  # gain ~1: the input itself


def test_single_layer_dropout_does_not_warn() -> None:
    RecurrentForecaster(F, "gru", layers=1, dropout=0.5)  # filterwarnings=error would fail


def test_state_is_carried_from_window_to_window() -> None:
    torch.manual_seed(1)
    model = RecurrentForecaster(F, "lstm", hidden_size=6).eval()
    x = torch.randn(2, 50, F)
    windows = list(iter_windows(model, x, window=16, stride=16))
    assert [w.start for w in windows] == [0, 16, 32, 48]
    for before, after in zip(windows, windows[1:], strict=False):
        for s_out, s_in in zip(before.state_out, after.state_in, strict=True):
            assert torch.equal(s_out, s_in)
            assert not s_in.requires_grad  # detached: truncated BPTT
    # Carrying the state makes the windows one unbroken run, as in streaming inference.
    with torch.no_grad():
        full_mean, _, _ = model(x)
        joined = torch.cat([w.mean for w in windows], dim=1)
    assert torch.allclose(joined, full_mean, atol=1e-6)


def test_overlapping_windows_carry_the_state_after_the_stride() -> None:
    torch.manual_seed(2)
    model = RecurrentForecaster(F, "gru", hidden_size=6).eval()
    x = torch.randn(1, 40, F)
    windows = list(iter_windows(model, x, window=16, stride=8))
    assert [w.start for w in windows] == [0, 8, 16, 24, 32]
    with torch.no_grad():
        full_mean, _, _ = model(x)
    for w in windows:
        assert torch.allclose(w.mean, full_mean[:, w.start : w.stop], atol=1e-6)


def test_clipping_bounds_the_gradient_norm() -> None:
    torch.manual_seed(3)
    model = RecurrentForecaster(F, "rnn", hidden_size=8)
    mean, log_var, _ = model(torch.randn(2, 10, F))
    loss = gaussian_nll(mean, log_var, torch.randn(2, 10, F) * 50).mean()
    before = [p.detach().clone() for p in model.parameters()]
    optimiser = torch.optim.SGD(model.parameters(), lr=1.0)
    norm = optimise_step(model, optimiser, loss, clip=0.01)
    assert norm > 0.01  # the raw gradient was larger than the clip ...
    after = clip_gradients(list(model.parameters()), 0.0)
    assert after <= 0.01 * (1 + 1e-5)  # ... and what the optimiser used was not
    step = torch.sqrt(
        sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert float(step) <= 0.01 * (1 + 1e-4)


def test_same_seed_same_weights_and_another_seed_differs() -> None:
    streams = sine_streams()
    a = train(streams, tiny(seed=7, dropout=0.2, layers=2), quiet=True)
    b = train(streams, tiny(seed=7, dropout=0.2, layers=2), quiet=True)
    c = train(streams, tiny(seed=8, dropout=0.2, layers=2), quiet=True)
    wa, wb, wc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_early_stopping_stops_and_restores_the_best_weights() -> None:
    # Validation data unlike the training data, a high learning rate: it overfits fast.
    rng = np.random.default_rng(0)
    streams = [np.concatenate([s[:240], rng.normal(0, 5, (60, F))]) for s in sine_streams()]
    options = tiny(epochs=40, patience=2, lr=0.03)
    result = train(streams, options, quiet=True)
    assert result.stopped_early and result.epochs_run < options.epochs
    val = [h.val_loss for h in result.history]
    assert result.best_epoch == 1 + int(np.argmin(val))
    assert result.epochs_run == result.best_epoch + options.patience
    from training.trainer.data import normalise

    held_out = [normalise(v, result.normalisation).astype(np.float32) for v in result.val_streams]
    assert evaluate(result.model, held_out, options.burn_in) == pytest.approx(
        result.best_loss, abs=1e-5
    )


def test_what_is_kept_is_the_average_of_the_epochs_weights_not_the_last_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The weights validated and exported are the exponential average over about an epoch
    of optimiser steps (WeightAverage), which a noisy last step does not move far."""
    import training.trainer.train as train_module

    seen: list[train_module.WeightAverage] = []
    last_step: dict[str, torch.Tensor] = {}

    class Watched(train_module.WeightAverage):
        def __init__(self, model: torch.nn.Module, horizon: int) -> None:
            super().__init__(model, horizon)
            seen.append(self)

        def update(self, model: torch.nn.Module) -> None:
            super().update(model)
            last_step.update({k: v.clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(train_module, "WeightAverage", Watched)
    result = train(sine_streams(), tiny(epochs=1, lr=0.03), quiet=True)
    (average,) = seen
    assert average.steps > 1 and average.horizon > 1
    kept = result.model.state_dict()
    averaged = average.model.state_dict()
    assert all(torch.equal(kept[k], averaged[k]) for k in kept)
    assert not all(torch.equal(kept[k], last_step[k]) for k in kept)


def test_training_lowers_the_loss_and_reports_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    result = train(sine_streams(), tiny(epochs=4, patience=0))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch   1/4") and "val" in lines[0]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(math.isfinite(h.val_loss) for h in result.history)


def test_lanes_cut_streams_and_pack_masks_burn_in_and_padding() -> None:
    lanes = make_lanes([np.arange(25.0)[:, None], np.arange(12.0)[:, None]], 10)
    assert [len(lane) for lane in lanes] == [11, 15, 12]  # a short remainder joins its lane
    assert lanes[1][0, 0] == 10.0  # consecutive: lane 2 starts where lane 1's inputs end
    x, y, mask = pack(lanes, burn_in=3)
    assert x.shape == y.shape == (3, 14, 1)
    assert float(x[0, 0, 0]) == 0.0 and float(y[0, 0, 0]) == 1.0  # the target is the next step
    assert mask[0].tolist() == [0.0] * 3 + [1.0] * 7 + [0.0] * 4  # burn-in, scored, padding
    assert float(mask[1].sum()) == 11 and float(mask[2].sum()) == 8


@pytest.mark.parametrize("optimiser", ["rmsprop", "sgd"])
def test_other_optimisers_and_no_validation_split(optimiser: str) -> None:
    result = train(
        sine_streams(2), tiny(optimiser=optimiser, val_fraction=0.0, clip=0.0, lr=1e-3), quiet=True
    )
    assert result.val_streams == [] and math.isnan(result.history[0].val_loss)
    assert math.isfinite(result.best_loss)


def test_missing_values_are_filled_and_an_empty_column_is_named() -> None:
    streams = sine_streams(2)
    streams[0][:5, 1] = np.nan
    streams[0][100:110, 2] = np.nan
    result = train(streams, tiny(epochs=1), features=["a", "b", "c"], quiet=True)
    assert np.isfinite(result.train_streams[0]).all()
    assert (result.train_streams[0][:5, 1] == streams[0][5, 1]).all()  # back-filled
    assert (result.train_streams[0][100:110, 2] == streams[0][99, 2]).all()  # forward-filled
    streams[1][:, 2] = np.nan
    with pytest.raises(DataError, match="'c'"):
        train(streams, tiny(), features=["a", "b", "c"], quiet=True)


def test_bad_inputs_and_options() -> None:
    with pytest.raises(DataError, match="too few .* it needs at least 21 rows"):
        train([np.zeros((20, 2))], tiny(), quiet=True)  # a window of 16 and 20 % held out
    rows = np.random.default_rng(0).normal(size=(21, 2))
    assert len(train([rows], tiny(), quiet=True).train_streams[0]) == 17  # as many as it says
    with pytest.raises(DataError):
        train([], tiny(), quiet=True)
    with pytest.raises(DataError, match="features"):
        train([np.zeros((100, 2)), np.zeros((100, 3))], tiny(), quiet=True)
    with pytest.raises(ConfigError, match="cell"):
        TrainOptions(cell="transformer")
    with pytest.raises(ConfigError, match="val_fraction"):
        TrainOptions(val_fraction=1.0)


def test_cli_defaults_match_train_options() -> None:
    defaults = TrainOptions()
    assert {k: getattr(defaults, k) for k in DEFAULTS} == DEFAULTS
    assert set(DEFAULTS) == set(TrainOptions.__dataclass_fields__)


def test_training_threads_are_set_for_the_run_and_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    with torch_threads(0):  # 0 leaves torch's setting alone
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"):
        TrainOptions(threads=-1)


def test_speed_counts_windows_over_training_time() -> None:
    history = [EpochStats(e, 1.0, 1.0, 1e-3, 1.0, 2.0, 0.5, 300) for e in (1, 2)]
    figures = speed(history)
    assert figures["epoch_s_mean"] == 2.0 and figures["val_s_mean"] == 0.5
    assert figures["windows_per_epoch"] == 300 and figures["windows_per_s"] == 200.0
    assert speed([])["windows_per_s"] is None
