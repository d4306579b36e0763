"""detector.replay through the engine: the samples' own times reach the scorer, and the
output holds the alert's own likelihood (alert_score)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from detector.model import LoadedModel
from detector.replay import replay_csv
from detector.scoring import ScoringConfig, log_score
from training.evaluation.evaluate import raise_rows
from training.evaluation.synth import generate_fleet


def test_alert_score_is_the_likelihood_the_alert_rule_watches(
    tiny_model: Path, tmp_path: Path
) -> None:
    model = LoadedModel.load(tiny_model)
    values = generate_fleet(1, 600, features=model.meta.features, seed=5).values[0]
    values[400:460] += 8.0 / model.inv_scale  # a level shift the model has never seen
    data = tmp_path / "pump.csv"
    lines = [",".join(["timestamp", *model.meta.features])]
    lines += [",".join([str(t), *(f"{v:.6f}" for v in row)]) for t, row in enumerate(values)]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.csv"
    cfg = ScoringConfig()
    result = replay_csv(model, data, out, cfg)
    np.testing.assert_array_equal(result.alert_score, log_score(1.0 - result.likelihood))
    # an alert is raised where the likelihood reaches the threshold: on the alert_score
    # axis, where the raise line lies at log_score(1 - threshold)
    raises = np.flatnonzero(np.diff(np.concatenate(([0], result.alert.astype(int)))) == 1)
    assert result.raised == len(raises) >= 1
    raise_line = float(log_score(np.array([1.0 - cfg.threshold]))[0])
    assert (result.alert_score[raises] >= raise_line).all()
    assert result.likelihood[raises].min() >= cfg.threshold
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[-5:] == ["raw_score", "anomaly_score", "alert", "top_feature",
                                  "alert_score"]  # fmt: skip
    written = np.array([float(r["alert_score"]) for r in rows])
    np.testing.assert_allclose(written, result.alert_score, atol=5e-7)
    assert written[:20].tolist() == [0.0] * 20  # warm-up: likelihood 0


def test_top_feature_is_the_sensor_an_alert_names(tiny_model: Path, tmp_path: Path) -> None:
    """A sensor that sticks at its last reading: its errors stay small, so the largest error
    at the raise is another sensor's, but the stuck run is what raises the alert, and the
    output's top_feature names the stuck sensor, as the alert does."""
    model = LoadedModel.load(tiny_model)
    values = generate_fleet(1, 600, features=model.meta.features, seed=5).values[0]
    values[400:520, 1] = values[399, 1]  # the second sensor stuck
    data = tmp_path / "pump.csv"
    lines = [",".join(["timestamp", *model.meta.features])]
    lines += [",".join([str(t), *(f"{v:.6f}" for v in row)]) for t, row in enumerate(values)]
    data.write_text("\n".join(lines) + "\n")
    result = replay_csv(model, data, tmp_path / "scores.csv")
    raises = raise_rows(result.alert)
    first = int(raises[(raises >= 400) & (raises < 520)][0])
    assert first < 420  # the stuck check, within a few repeats
    assert result.top_feature[first] == model.meta.features[1]
