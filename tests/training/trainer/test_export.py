"""training.trainer.export / calibrate / pipeline: the one-step ONNX file the daemon loads."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from detector.artifact import (
    METADATA_KEY,
    Normalisation,
    expected_io,
    graph_sha256,
    meta_from_dict,
    read_artifact,
    split_model_bytes,
)
from detector.model import LoadedModel
from detector.replay import replay_table
from detector.scoring import ScoringConfig
from training.evaluation.synth import generate_fleet
from training.trainer import fit_and_export
from training.trainer.calibrate import predictions, stream_errors
from training.trainer.export import (
    PARITY_MIN_STEPS,
    ParityError,
    build_step_graph,
    check_parity,
    make_session,
    parity_sequence,
)
from training.trainer.train import TrainOptions, train

FEATURES = ["flow", "pressure", "temperature"]


@pytest.fixture(scope="module")
def streams() -> list[np.ndarray]:
    fleet = generate_fleet(3, 400, features=FEATURES, seed=5)
    return list(fleet.values)


def dims(args: list[Any]) -> dict[str, list[Any]]:
    """name -> shape of onnxruntime inputs or outputs, a named dimension as "B"."""
    return {a.name: [d if isinstance(d, int) else "B" for d in a.shape] for a in args}


def tiny(cell: str, layers: int = 1, skip: str = "level") -> TrainOptions:
    return TrainOptions(
        cell=cell,
        skip=skip,
        layers=layers,
        hidden_size=8,
        window=32,
        burn_in=4,
        epochs=2,
        batch_size=4,
        dropout=0.1 if layers > 1 else 0.0,
    )


@pytest.mark.parametrize(
    ("cell", "layers", "skip"),
    [("gru", 2, "level"), ("lstm", 2, "level"), ("rnn", 1, "level"), ("gru", 1, "level"),
     ("lstm", 1, "input")],
)  # fmt: skip
def test_each_cell_exports_passes_parity_and_loads(
    tmp_path: Path, streams: list[np.ndarray], cell: str, layers: int, skip: str
) -> None:
    path = tmp_path / f"{cell}.onnx"
    options = tiny(cell, layers, skip)
    meta = fit_and_export(
        streams, FEATURES, path, options, sample_interval_s=1.0, name="pumps", quiet=True
    )
    assert meta.parity_max_abs_diff is not None and meta.parity_max_abs_diff <= 1e-4
    assert (meta.cell, meta.layers, meta.hidden_size, meta.features) == (cell, layers, 8, FEATURES)
    data, read = read_artifact(path)  # re-hashes the graph bytes found in the file
    assert read == meta
    graph_bytes, props = split_model_bytes(data)
    assert set(props) == {METADATA_KEY} and graph_sha256(graph_bytes) == meta.graph_sha256
    assert meta_from_dict(json.loads(props[METADATA_KEY])) == meta  # round trip
    assert json.loads(props[METADATA_KEY]) == json.loads(meta.to_json())

    session = make_session(data)
    want_in, want_out = expected_io(meta)
    assert dims(session.get_inputs()) == want_in and dims(session.get_outputs()) == want_out
    assert session.get_inputs()[0].shape[0] == "B"  # the dynamic axis is named B

    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"MatMul", "Tanh"} <= ops and not ops & {"GRU", "LSTM", "RNN", "Transpose"}

    model = LoadedModel.load(path)  # the daemon's own loader and checks
    out = model.step(np.asarray(streams[0][:5], np.float32), model.zero_states(5))
    cell_states = 2 if cell == "lstm" else 1
    assert meta.skip == skip and len(meta.state_names) == cell_states + (skip == "level")
    assert out.mean.shape == (5, 3)
    assert all(s.shape == (layers, 5, 8) for s in out.states[:cell_states])
    if skip == "level":  # the inputs' smoothed level, normalised: between the values and 0
        level = out.states[-1]
        z = model.normalise(np.asarray(streams[0][:5], np.float64))
        assert level.shape == (1, 5, 3) and np.all(np.abs(level[0]) <= np.abs(z) + 1e-6)
        gains = meta.training["level_gain"]  # what `inspect` shows, one a sensor
        assert len(gains) == 3 and all(0.0 < g < 1.0 for g in gains)
    else:
        assert "level_gain" not in meta.training
    training = meta.training
    assert training["seed"] == 0 and training["rows"] == 1200 and training["val_rows"] == 240
    assert len(training["data_fingerprint"]) == 64 and training["options"]["cell"] == cell
    assert training["epochs_run"] == len(training["history"]) == 2


def test_parity_catches_a_graph_that_differs(streams: list[np.ndarray]) -> None:
    result = train(streams, tiny("gru"), quiet=True)
    proto = build_step_graph(result.model, result.normalisation)
    sequence = parity_sequence(result.val_streams)
    assert len(sequence) >= PARITY_MIN_STEPS
    assert check_parity(proto, result.model, result.normalisation, sequence) <= 1e-4
    with torch.no_grad():
        result.model.head.proj.bias += 1e-3  # the torch model moves, the graph does not
    with pytest.raises(ParityError, match="differs"):
        check_parity(proto, result.model, result.normalisation, sequence)


def test_parity_allows_a_steep_network_its_own_rounding(streams: list[np.ndarray]) -> None:
    """A network that amplifies rounding as it recurs (its recurrent weights ten times
    steeper) parts from torch by more than PARITY_TOLERANCE on float32 rounding alone, which
    the tolerance by itself refused: that passes, an equation off by 1e-2 does not."""
    result = train(streams, tiny("gru"), quiet=True)
    with torch.no_grad():
        result.model.rnn.weight_hh_l0 *= 10.0
    proto = build_step_graph(result.model, result.normalisation)
    sequence = parity_sequence(result.val_streams)
    check_parity(proto, result.model, result.normalisation, sequence)
    with torch.no_grad():
        result.model.head.proj.bias += 1e-2
    with pytest.raises(ParityError, match="float32 error"):
        check_parity(proto, result.model, result.normalisation, sequence)


def test_normalisation_is_inside_the_graph(streams: list[np.ndarray]) -> None:
    result = train(streams, tiny("rnn"), quiet=True)
    proto = build_step_graph(result.model, result.normalisation)
    x = np.asarray(streams[1][:4], np.float32)  # raw units in
    zeros = {"h": np.zeros((1, 4, 8), np.float32), "level": np.zeros((1, 4, 3), np.float32)}
    mean, log_var, h, level = make_session(proto).run(None, {"x": x, **zeros})
    z = (
        torch.from_numpy(x) - torch.tensor(result.normalisation.centre, dtype=torch.float32)
    ) / torch.tensor(result.normalisation.scale, dtype=torch.float32)
    with torch.no_grad():
        t_mean, t_log_var, (t_h, t_level) = result.model.step(z)
    assert np.abs(mean - t_mean.numpy()).max() < 1e-5
    assert np.abs(log_var - t_log_var.numpy()).max() < 1e-5
    assert np.abs(h - t_h.numpy()).max() < 1e-5
    assert np.abs(level - t_level.numpy()).max() < 1e-5


def test_the_daemon_feeds_the_model_each_stream_over_its_own_spread(tiny_model: Path) -> None:
    """The engine's order, done by hand: the value in training units, over the spread so far,
    is what the previous prediction is scored against and, held back past the warm-up where
    it lies beyond the per-step check's tail, what the model steps with; then the spread
    learns from the value. A stream three times as busy as training scores lower with the
    spread (the model sees values in its range) than without. (Without the step check the
    error scale stays the model's own, so the hand's hold-back needs no scale of its own.)"""
    from detector.scoring import ewma_alpha, learn_input_var, student_t_score
    from detector.scoring.inputs import within_tail
    from detector.scoring.scorer import warmup_steps
    from detector.scoring.surprise import standardised_errors

    model = LoadedModel.load(tiny_model)
    cfg = ScoringConfig(input_scale_window=20, step_check=False)
    warmup = warmup_steps(cfg, model.meta.calibration)
    held_count = 0

    def by_hand(values: np.ndarray) -> tuple[list[float], np.ndarray]:
        nonlocal held_count
        f = model.meta.n_features
        var = np.ones((1, f), np.float32)  # as the column keeps it
        states = model.zero_states(1)
        prediction = None
        last = np.full((1, f), np.nan, np.float32)
        raw = []
        for k, x in enumerate(values):
            z_train = model.normalise(x[None])
            z = z_train / np.sqrt(var)
            fed = z
            if prediction is None:
                raw.append(math.nan)
            else:
                raw.append(float(student_t_score(z, *prediction)[0]))
                past = np.array([k - 1 >= warmup])  # the samples scored before this one
                error = standardised_errors(z, *prediction)
                fed = within_tail(z, *prediction, error, last, np.full((1, f), 3.0), past)
                held_count += fed is not z
                last = error.astype(np.float32)
            out = model.step(model.denormalise(fed), states)
            states, prediction = out.states, (out.mean, out.log_var)
            learn_input_var(var, z_train, ewma_alpha(cfg.input_scale_window))
        return raw, var

    values = generate_fleet(1, 300, features=model.meta.features, seed=5).values[0]
    busy = model.centre + 3.0 * (values - model.centre)
    replayed = replay_table(model, busy, None, cfg)
    raw, var = by_hand(busy)
    np.testing.assert_allclose(replayed.raw, raw, rtol=1e-6, atol=1e-9)
    # the spread found the busier stream: nine times the variance, once its start is forgotten
    np.testing.assert_allclose(var, 9.0 * by_hand(values)[1], rtol=1e-6)
    fixed = replay_table(model, busy, None, replace(cfg, input_scale_window=0))
    assert np.nanmean(replayed.raw[100:]) < np.nanmean(fixed.raw[100:])
    assert held_count > 0  # the hand held some value back: the comparison covered it


def test_without_a_validation_split_it_calibrates_on_the_training_tail(
    tmp_path: Path, streams: list[np.ndarray]
) -> None:
    options = replace(tiny("gru"), val_fraction=0.0)
    meta = fit_and_export(streams, FEATURES, tmp_path / "m.onnx", options, quiet=True)
    assert meta.training["val_rows"] == 0 and meta.training["val_loss"] is not None
    assert meta.calibration.n > 0 and meta.parity_max_abs_diff <= 1e-4


def test_calibration_scores_what_the_daemon_scores(tmp_path: Path, tiny_model: Path) -> None:
    """Calibration's streamed raw scores equal the daemon path's (replay) on the same rows,
    the model fed in its training units (a stream's own input spread starts there) and the
    rows as they are: the daemon holds an outlier back only past a stream's warm-up, which
    here lasts the whole file. Past a warm-up, what is held back (the spike) parts them."""
    model = LoadedModel.load(tiny_model)
    meta = model.meta
    values = generate_fleet(1, 150, features=meta.features, seed=9).values[0]
    values[80:82, 0] += 30.0 * meta.normalisation.scale[0]  # a spike of two samples
    proto = onnx.load(tiny_model)
    raw_cal = stream_errors(meta.normalisation, [values], *predictions(proto, [values]))[0][0]
    config = ScoringConfig(input_scale_window=0, warmup_steps=len(values))
    replayed = replay_table(model, values, None, config)
    assert np.isnan(raw_cal[0]) and np.isnan(replayed.raw[0])
    np.testing.assert_allclose(raw_cal[1:], replayed.raw[1:], rtol=1e-9, atol=1e-9)
    held = replay_table(model, values, None, replace(config, warmup_steps=30))
    assert not np.allclose(raw_cal[82:], held.raw[82:], rtol=1e-6)
    cal = meta.calibration
    qs = [cal.quantiles[q] for q in ("0.5", "0.9", "0.99", "0.999")]
    assert qs == sorted(qs) and cal.n > 0 and cal.std > 0 and cal.window_std > 0
    assert cal.window == ScoringConfig().short_window and cal.threshold == 0.9999
    assert cal.raw_score == "student_t"
    rel = cal.relations  # the relations check's prior, of the model's features
    assert rel is not None and rel.window == ScoringConfig().alert_window and rel.steps > 0
    assert np.array(rel.covariance).shape == (2 * len(meta.features),) * 2  # and averages
    assert len(rel.average_var) == len(meta.features) and min(rel.average_var) > 0
    # the step check's tail, per feature, from the same held-out errors
    assert cal.tail_rate is not None and cal.tail_excess is not None
    assert len(cal.tail_rate) == len(cal.tail_excess) == len(meta.features)
    assert 0 < min(cal.tail_rate) <= max(cal.tail_rate) < 1 and min(cal.tail_excess) > 0
    # the errors' lag-one autocorrelation, per feature, that the daemon takes out
    assert cal.error_lag is not None and len(cal.error_lag) == len(meta.features)
    assert max(abs(v) for v in cal.error_lag) <= 0.9 and any(cal.error_lag)
    # how long a cold start takes to settle, within the held-out rows it was measured on
    assert cal.settle_steps is not None and 0 <= cal.settle_steps <= meta.training["val_rows"]


def test_the_relations_prior_is_of_one_streams_sensors_not_of_how_streams_differ() -> None:
    from training.trainer.calibrate import relations_prior

    rng = np.random.default_rng(6)
    norm = Normalisation([0.0, 0.0], [1.0, 1.0])
    # Three machines at different levels; within each, the sensors move together.
    streams = []
    for level in (0.0, 30.0, -10.0):
        load = rng.standard_normal(3000)
        streams.append(np.stack([level + load, -level + load + 0.1 * rng.standard_normal(3000)], 1))
    rel = relations_prior(norm, streams, 0, 50)
    assert rel is not None
    corr = rel.covariance[0][1] / math.sqrt(rel.covariance[0][0] * rel.covariance[1][1])
    assert corr > 0.99  # pooled across machines the levels would say -0.98
    # White residuals: the average's spread is the exponential average's share of one.
    a = 2.0 / 51.0
    assert rel.average_var[1] == pytest.approx(a / (2.0 - a), rel=0.25)
    assert relations_prior(Normalisation([0.0], [1.0]), [streams[0][:, :1]], 0, 50) is None


def test_metadata_changes_do_not_touch_the_graph_fingerprint(
    tmp_path: Path, tiny_model: Path
) -> None:
    data, meta = read_artifact(tiny_model)
    proto = onnx.load_from_string(data)
    edited = replace(meta, name="renamed", extra={"note": "x"})
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: edited.to_json()})
    path = tmp_path / "renamed.onnx"
    onnx.save(proto, path)
    assert read_artifact(path)[1].name == "renamed"
    assert asdict(read_artifact(path)[1])["graph_sha256"] == meta.graph_sha256


def test_within_std_ignores_the_streams_levels() -> None:
    from training.trainer.calibrate import within_std

    rng = np.random.default_rng(3)
    parts = [rng.normal(level, 2.0, 4000) for level in (0.0, 50.0, -20.0)]
    assert within_std(parts) == pytest.approx(2.0, rel=0.05)
    assert float(np.concatenate(parts).std()) > 20.0  # pooled: the levels' spread


def test_the_average_spread_is_measured_but_never_below_independent_steps() -> None:
    from training.trainer.calibrate import summarise

    rng = np.random.default_rng(5)
    window = 20
    a = 2.0 / (window + 1.0)
    # Independent scores: the measured spread of their average is about the floor itself.
    white = [np.r_[np.nan, rng.normal(3.0, 1.0, 20000)]]
    floor = np.sqrt(a / (2.0 - a))
    cal = summarise(white, burn_in=0, window=window)
    assert cal.window_std == pytest.approx(floor, rel=0.05)
    # Scores that follow one another (a slow random wave): the average spreads more than
    # the floor and keeps its measured spread.
    t = np.arange(20000)
    slow = [np.r_[np.nan, 3.0 + np.sin(t / 50.0) + 0.1 * rng.normal(size=t.size)]]
    cal = summarise(slow, burn_in=0, window=window)
    assert cal.window_std > 2.5 * floor
    # A short, flat held-out tail whose average happens to barely move: the floor holds it up.
    flat = [np.r_[np.nan, np.tile([2.0, 4.0], 40)]]
    cal = summarise(flat, burn_in=0, window=window)
    assert cal.window_std == pytest.approx(floor, rel=1e-6)


def test_the_level_spread_is_what_sampling_does_not_explain() -> None:
    from training.trainer.calibrate import summarise

    rng = np.random.default_rng(8)
    # Streams of one level: their means differ by sampling noise alone. Eight streams do not
    # show that a fleet's levels are the same: the spread is what they cannot tell from none,
    # sqrt(sqrt(2 / 7) / 3000), not 0 (which would count the calibration as a full memory).
    alike = [np.r_[np.nan, rng.normal(3.0, 1.0, 3000)] for _ in range(8)]
    resolved = math.sqrt(math.sqrt(2 / 7) / 3000)
    assert summarise(alike, burn_in=0).level_std == pytest.approx(resolved, rel=0.3)
    assert summarise(alike, burn_in=0).level_streams == 8  # what the spread was measured on
    # Streams whose levels are drawn with a spread of 0.5: about that.
    apart = [np.r_[np.nan, rng.normal(3.0 + 0.5 * rng.standard_normal(), 1.0, 3000)]
             for _ in range(40)]  # fmt: skip
    assert summarise(apart, burn_in=0).level_std == pytest.approx(0.5, rel=0.3)
    # One stream: the calibration is of that stream, nothing to compare.
    assert summarise(alike[:1], burn_in=0).level_std == 0.0
    # Scores that follow one another wander more: the same wander is not read as a level.
    t = np.arange(3000)
    slow = [np.r_[np.nan, 3.0 + np.sin(t / 60.0 + k) + 0.1 * rng.normal(size=t.size)]
            for k in range(8)]  # fmt: skip
    assert summarise(slow, burn_in=0).level_std < 0.1


def test_the_settling_time_compares_a_cold_start_with_a_warm_one(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The held-out rows stepped from a zero state beside the same rows at the end of their
    whole stream: once the two agree to a tenth of a spread, the network has settled. Too
    few held-out rows to settle in are counted whole, with a warning; a stream with fewer
    than two held-out rows says nothing."""
    from training.trainer.calibrate import predictions, settle_steps

    model = LoadedModel.load(tiny_model)
    meta = model.meta
    proto = onnx.load(tiny_model)
    values = generate_fleet(2, 400, features=meta.features, seed=4).values
    _, mean, log_var = predictions(proto, list(values))  # the whole streams, warm
    settle = settle_steps(proto, list(values), [200, 200], (mean, log_var))
    assert settle is not None and 0 < settle < 200
    # the same rows, cold against warm, by hand: apart before the settling time, not after
    cold = model.zero_states(2)
    warm = model.zero_states(2)
    for t in range(200):
        warm_out = model.step(values[:, t], warm)
        warm = warm_out.states
    gaps = []
    for t in range(200, 400):
        c, w = model.step(values[:, t], cold), model.step(values[:, t], warm)
        cold, warm = c.states, w.states
        gaps.append(float((((c.mean - w.mean) / np.exp(0.5 * w.log_var)) ** 2).mean(0).max()))
    assert max(gaps[settle:]) <= 0.01 < gaps[settle - 1]
    with caplog.at_level("WARNING"):
        assert settle_steps(proto, list(values), [400 - 3, 400 - 3], (mean, log_var)) == 3
    assert "had not settled" in caplog.text
    assert settle_steps(proto, list(values), [399, 400], (mean, log_var)) is None
