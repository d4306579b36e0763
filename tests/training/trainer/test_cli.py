"""`rnnsentry train`: CSV in, model out; every bad input is one DataError line, exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector.artifact import read_artifact
from detector.cli import main
from training.evaluation.synth import generate_fleet, write_csv
from training.trainer.cli import add_train_arguments, run_train

FEATURES = ["flow", "pressure"]
FAST = ["--hidden", "8", "--epochs", "2", "--window", "32", "--burn-in", "4", "--quiet"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def pump_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "pump.csv"
    write_csv(generate_fleet(1, 300, features=FEATURES, seed=2), path)
    return path


def test_train_writes_a_valid_model_and_a_summary(
    tmp_path: Path, pump_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"
    argv = [
        "train",
        "--data",
        str(pump_csv),
        "--out",
        str(out),
        "--cell",
        "lstm",
        "--train-rows",
        "250",
        "--name",
        "p1",
        *FAST[:-1],
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and "lstm" in captured.out and "parity" in captured.out
    assert "epoch   1/2" in captured.err
    _, meta = read_artifact(out)
    assert (meta.name, meta.cell, meta.features) == ("p1", "lstm", FEATURES)
    assert meta.sample_interval_s == 1.0 and meta.training["rows"] == 250
    assert meta.training["options"]["window"] == 32 and meta.training["files"] == [str(pump_csv)]


def test_stream_column_splits_one_file_into_streams(tmp_path: Path) -> None:
    data = tmp_path / "fleet.csv"
    write_csv(generate_fleet(3, 200, features=FEATURES, seed=4, interval_s=5.0), data)
    out = tmp_path / "m.onnx"
    assert (
        run_train(
            parse(
                "--data",
                str(data),
                "--out",
                str(out),
                "--stream-col",
                "stream",
                "--columns",
                "pressure,flow",
                *FAST,
            )
        )
        == 0
    )
    _, meta = read_artifact(out)
    assert meta.features == ["pressure", "flow"] and meta.sample_interval_s == 5.0
    assert meta.training["streams"] == 3 and meta.training["rows"] == 600


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


NAN_ROWS = "".join(f"{t},\n" for t in range(200))  # column b is empty
# case -> (files to write, --data ("{tmp}": the test's folder, "{pump}": a good CSV),
# more flags, what the error line says)
BAD_INPUTS: dict[str, tuple[dict[str, str], list[str], list[str], str]] = {
    "missing file": ({}, ["{tmp}/missing.csv"], [], "no such file"),
    "empty file": ({"empty.csv": ""}, ["{tmp}/empty.csv"], [], "empty"),
    "no numeric column": (
        {"text.csv": "timestamp,name\n1,a\n2,b\n"}, ["{tmp}/text.csv"], [], "no numeric"
    ),
    "too few rows": ({"short.csv": "a,b\n1,2\n2,3\n3,4\n"}, ["{tmp}/short.csv"], [], "too few"),
    "a column of NaN": (
        {"nan.csv": "a,b\n" + NAN_ROWS}, ["{tmp}/nan.csv"], ["--columns", "a,b"],
        "'b' has no numeric",
    ),
    "unknown --columns": ({}, ["{pump}"], ["--columns", "flow,nope"], "no column"),
    "files that differ": (
        {"other.csv": "x,y\n" + NAN_ROWS}, ["{pump}", "{tmp}/other.csv"], [], "differ"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_code_2(
    case: str, tmp_path: Path, pump_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files, data, flags, message = BAD_INPUTS[case]
    for name, text in files.items():
        _write(tmp_path / name, text)
    paths = [d.format(tmp=tmp_path, pump=pump_csv) for d in data]
    out = tmp_path / "m.onnx"
    assert main(["train", "--data", *paths, "--out", str(out), *flags, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rnnsentry: error:"), err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_importing_the_cli_and_synth_does_not_import_torch() -> None:
    code = (
        "import sys, training.trainer.cli, training.evaluation.synth;"
        " assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_train_rows_takes_the_first_rows_of_each_stream(tmp_path: Path) -> None:
    from training.trainer.data import load_csv_streams

    data = tmp_path / "fleet.csv"
    fleet = generate_fleet(2, 120, features=FEATURES, seed=1)
    write_csv(fleet, data)
    loaded = load_csv_streams([data], train_rows=50, stream_col="stream")
    assert [len(s) for s in loaded.streams] == [50, 50]
    np.testing.assert_allclose(loaded.streams[1], fleet.values[1, :50], rtol=1e-6)
    assert loaded.names == [f"{data}:pump-000", f"{data}:pump-001"]
