"""`rnnsentry train` as a subprocess: plain progress lines in a pipe, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training.evaluation.synth import generate_fleet, write_csv

pytestmark = pytest.mark.e2e
TIMEOUT_S = 300


def rnnsentry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *args],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip


def test_train_in_a_pipe_prints_one_plain_line_per_epoch_and_a_report(tmp_path: Path) -> None:
    data, model, report = tmp_path / "pump.csv", tmp_path / "m.onnx", tmp_path / "report"
    write_csv(generate_fleet(1, 300, features=["flow", "pressure"], seed=6), data)
    done = rnnsentry(
        "train", "--data", str(data), "--out", str(model), "--report", str(report),
        "--hidden", "8", "--epochs", "2", "--patience", "0", "--window", "32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    epochs = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert "\r" not in done.stderr and len(epochs) == 2
    assert epochs[1].startswith("epoch   2/2 [##########] 100% train ")
    assert f"report in {report}" in done.stdout
    assert (report / "training.png").is_file() and (report / "training.json").is_file()


def test_bad_input_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    done = rnnsentry("train", "--data", str(empty), "--out", str(tmp_path / "m.onnx"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("rnnsentry: error:")
