"""`rnnsentry train --report DIR`: the loss plot, the JSON of every figure, the options kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from detector.artifact import read_artifact
from detector.cli import main
from training.evaluation.synth import generate_fleet, write_csv
from training.trainer.cli import DEFAULTS
from training.trainer.report import plot_losses
from training.trainer.train import EpochStats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--hidden", "8", "--epochs", "3", "--patience", "0", "--window", "32", "--burn-in", "4"]


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny training run through the command line with --report; (model, report dir)."""
    work = tmp_path_factory.mktemp("report")
    data = work / "pump.csv"
    write_csv(generate_fleet(1, 300, features=["flow", "pressure"], seed=3, interval_s=5.0), data)
    model, report = work / "m.onnx", work / "report" / "run1"  # parents are created
    argv = ["train", "--data", str(data), "--out", str(model), "--report", str(report)]
    assert main([*argv, *TINY, "--quiet"]) == 0
    return model, report


def test_report_writes_a_png_and_a_json_of_every_epoch(reported: tuple[Path, Path]) -> None:
    model, report = reported
    assert (report / "training.png").read_bytes()[:8] == PNG_SIGNATURE
    doc = json.loads((report / "training.json").read_text(encoding="utf-8"))
    _, meta = read_artifact(model)
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2, 3] == list(range(1, doc["epochs_run"] + 1))
    for row in doc["epochs"]:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
        assert row["lr"] > 0 and row["grad_norm_max"] > 0 and row["windows"] > 0
    assert [e["best"] for e in doc["epochs"]].count(True) == 1
    assert doc["epochs"][doc["best_epoch"] - 1]["val_loss"] == pytest.approx(doc["best_loss"])
    assert doc["parity_max_abs_diff"] == meta.parity_max_abs_diff
    assert doc["calibration"]["quantiles"] == meta.calibration.quantiles
    assert doc["data_fingerprint"] == meta.training["data_fingerprint"]
    assert doc["model"]["fingerprint"] == meta.fingerprint and doc["artifact"] == str(model)
    assert doc["options"]["hidden_size"] == 8 and doc["options"]["epochs"] == 3
    timings = doc["timings"]
    assert 0 < timings["train_s"] <= timings["fit_and_export_s"] and timings["windows_per_s"] > 0


def test_every_option_is_in_the_model_metadata(reported: tuple[Path, Path]) -> None:
    model, report = reported
    _, meta = read_artifact(model)
    t = meta.training
    assert set(t["options"]) == set(DEFAULTS)
    assert t["options"]["hidden_size"] == 8 and t["options"]["stride"] == 32
    assert t["timestamp_col"] == "timestamp" and t["timestamp_col_given"] is None  # detected
    assert t["sample_interval_s"] == 5.0 == meta.sample_interval_s  # inferred
    assert t["report_dir"] == str(report) and t["out"] == str(model)
    assert t["features"] == ["flow", "pressure"] and t["columns"] is None
    for key in ("files", "train_rows_per_stream", "stream_col", "name", "export_s"):
        assert key in t


def test_a_report_dir_that_cannot_be_made_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    data = tmp_path / "pump.csv"
    write_csv(generate_fleet(1, 300, features=["flow"], seed=1), data)
    out = tmp_path / "m.onnx"
    argv = ["train", "--data", str(data), "--out", str(out), "--report", str(blocker / "r")]
    assert main([*argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "report directory" in err and "epoch" not in err
    assert not out.exists()


def test_the_plot_copes_without_a_validation_split(tmp_path: Path) -> None:
    history = [EpochStats(e, 2.0 / e, math.nan, 1e-3, 1.0, 0.1) for e in range(1, 5)]
    plot_losses(history, best_epoch=4, path=tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE
