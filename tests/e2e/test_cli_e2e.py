"""rnnsentry as a user runs it: train from CSV, run the daemon as a subprocess, replay."""

from __future__ import annotations

import csv
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support import (
    TINY_FEATURES,
    DaemonProcess,
    Listener,
    Publisher,
    poll_until,
    sample_payload,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.e2e


def rnnsentry(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _write_csv(path: Path, values: np.ndarray, start: float = 1_700_000_000.0) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", *TINY_FEATURES, "anomaly"])
        for t, row in enumerate(values):
            writer.writerow([f"{start + t:.0f}", *(f"{v:.5f}" for v in row), 0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model trained through the command line on a CSV of one pump."""
    root = tmp_path_factory.mktemp("e2e")
    fleet = tiny_fleet(n_streams=1, n_steps=800)
    data = root / "pump.csv"
    _write_csv(data, fleet.values[0])
    model = root / "model.onnx"
    done = rnnsentry("train", "--data", str(data), "--out", str(model), "--train-rows", "700",
                     "--hidden", "8", "--epochs", "3", "--window", "32", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert model.exists()
    return data, model


def test_train_writes_metadata_that_inspect_shows(trained: tuple[Path, Path]) -> None:
    _, model = trained
    done = rnnsentry("inspect", str(model))
    assert done.returncode == 0, done.stderr
    assert "lstm" in done.stdout and "flow, pressure, temperature, vibration" in done.stdout
    assert "each sensor's smoothed level (state 'level'), gain flow " in done.stdout
    assert "on: 4 sensors against the others' values and 50-step averages;" in done.stdout
    # a model of one stream: its relations count as the held-out steps they were measured on
    counts = re.search(r"from (\d+) held-out steps; they count as (\d+) of a stream's own",
                       done.stdout)  # fmt: skip
    assert counts is not None and counts[1] == counts[2], done.stdout
    # ... and so do the step check's tail (here at least one Gaussian exceedance's worth)
    # and its error scale
    held_out = re.search(r"over (\d+) steps;", done.stdout)
    tail = re.search(r"it counts as (\d+) of a stream's own steps .*, the model's error scale"
                     r" as (\d+)", done.stdout)  # fmt: skip
    assert held_out is not None and tail is not None, done.stdout
    assert int(tail[1]) == max(370, int(held_out[1])) and tail[2] == held_out[1], done.stdout
    # the mean excess each sensor starts from, pooled across the four sensors
    assert re.search(
        r"its mean excess pooled across the sensors: flow [\d.]+, pressure", done.stdout
    )
    assert "held-out rows" not in done.stdout  # they vary as the training rows do


def test_train_warns_when_the_held_out_rows_are_quieter_than_the_rest(tmp_path: Path) -> None:
    """Data that ends on a quiet stretch of one sensor (a weekend): the calibration would not
    know what the rest shows, and both train and inspect say so."""
    values = tiny_fleet(n_streams=1, n_steps=700).values[0].copy()
    rng = np.random.default_rng(1)
    values[560:, 2] = values[560, 2] + 0.01 * rng.standard_normal(140)  # temperature settles
    data, model = tmp_path / "quiet.csv", tmp_path / "quiet.onnx"
    _write_csv(data, values)
    done = rnnsentry("train", "--data", str(data), "--out", str(model), "--hidden", "8",
                     "--epochs", "1", "--window", "32", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    warning = re.search(r"held-out rows \(the last 20% .* as much as the rest in ([\w, ]+):",
                        done.stderr)  # fmt: skip
    assert warning is not None and warning[1] == "temperature", done.stderr
    shown = rnnsentry("inspect", str(model))
    assert "held-out rows" in shown.stdout and "training rows in temperature:" in shown.stdout


def test_inspect_shows_the_alert_rule_the_daemon_applies(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    _, model = trained
    done = rnnsentry("inspect", str(model))
    assert done.returncode == 0, done.stderr
    assert "raise at likelihood >= 0.99999999 (tail 1e-08" in done.stdout
    assert "clear below 0.99 for 20 steps (the defaults)" in done.stdout
    # the calibration's stored suggestion is shown as what it is: not the rule in force
    assert "not applied" in done.stdout
    toml = tmp_path / "scoring.toml"
    toml.write_text("[scoring]\nthreshold = 0.999\nclear_threshold = 0.9\nclear_steps = 5\n")
    done = rnnsentry("inspect", str(model), "--config", str(toml))
    assert done.returncode == 0, done.stderr
    assert "raise at likelihood >= 0.999 " in done.stdout
    assert f"clear below 0.9 for 5 steps ([scoring] of {toml})" in done.stdout
    done = rnnsentry("inspect", str(model), "--config", str(toml), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["alerts"] == {
        "threshold": 0.999, "clear_threshold": 0.9, "clear_steps": 5,
        "source": f"[scoring] of {toml}",
    }  # fmt: skip
    toml.write_text("[scoring]\nthreshold = 2.0\n")
    done = rnnsentry("inspect", str(model), "--config", str(toml))
    assert done.returncode == 2 and "threshold" in done.stderr


def test_replay_writes_one_row_per_input_row(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = trained
    out = tmp_path / "scores.csv"
    done = rnnsentry("replay", "--model", str(model), "--data", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 800
    assert {"raw_score", "anomaly_score", "alert"} <= set(rows[0])
    likelihoods = [float(r["anomaly_score"]) for r in rows]
    assert all(0.0 <= v <= 1.0 for v in likelihoods)
    assert likelihoods[:20] == [0.0] * 20  # warm-up


def test_replay_and_run_refuse_a_model_without_metadata(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["mean"])], "bare",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["B", 1])],
    )  # fmt: skip
    bare = tmp_path / "bare.onnx"
    onnx.save(helper.make_model(graph), bare)
    data = tmp_path / "d.csv"
    data.write_text("value\n1\n2\n")
    replay = rnnsentry("replay", "--model", str(bare), "--data", str(data), "--out", "x.csv")
    run = rnnsentry("run", "--model", str(bare), "--broker", "mqtt://127.0.0.1:1")
    for done in (replay, run):
        assert done.returncode == 2
        assert "no rnnsentry metadata" in done.stderr
        assert "Traceback" not in done.stderr


def test_bad_training_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    done = rnnsentry("train", "--data", str(empty), "--out", str(tmp_path / "m.onnx"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "empty" in done.stderr


def test_daemon_command_line_imports_no_torch() -> None:
    code = ("import sys, detector, detector.daemon, detector.cli\n"
            "try:\n    detector.cli.main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def daemon_process(
    trained: tuple[Path, Path], mosquitto: Mosquitto, tmp_path: Path
) -> Iterator[DaemonProcess]:
    _, model = trained
    daemon = DaemonProcess(model, mosquitto.url, tmp_path, instance="e2e",
                           extra_args=["--topic", "plant/{site}/{stream}/telemetry"],
                           env={"RNNSENTRY_SCORING__WARMUP_STEPS": "20"})  # fmt: skip
    try:
        yield daemon
    finally:
        daemon.stop(signal.SIGKILL)


def test_daemon_alerts_on_a_spike_counts_it_and_stops_cleanly(
    daemon_process: DaemonProcess, mosquitto: Mosquitto
) -> None:
    listener = Listener(mosquitto.port, ["rnnsentry/alerts/#"])
    publisher = Publisher(mosquitto.port)
    fleet = tiny_fleet(n_streams=1, n_steps=100, seed=11, start_step=800)
    values = fleet.values[0].copy()
    values[70, 0] += 40.0 * values[:60, 0].std()  # a flow spike
    for t, row in enumerate(values[:80]):
        publisher.send("plant/north/pump-9/telemetry", sample_payload(TINY_FEATURES, row, 50.0 + t))
    alert = listener.json_on("rnnsentry/alerts/north/pump-9", lambda d: d["event"] == "raised")
    assert alert["stream"] == "north/pump-9" and alert["ts"] in (120.0, 121.0)
    assert alert["top_features"][0]["feature"] == "flow"

    scored = {"outcome": "scored"}
    poll_until(lambda: daemon_process.metric("rnnsentry_messages_total", scored) == 80)
    publisher.close()
    listener.close()
    assert daemon_process.stop(signal.SIGTERM) == 0


def test_check_config_prints_every_problem_with_its_key(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[mqtt]\nbrokr = "mqtt://x:1"\nqos = 2\n'
        '[batch]\nmax = "big"\n'
        "[scoring]\nthreshold = 0.5\nclear_threshold = 0.9\n"
        '[[models]]\npath = "m.onnx"\ntopics = ["sensors/+"]\n'
    )
    done = rnnsentry("run", "--config", str(bad), "--check-config")
    assert done.returncode == 1
    for key in ("mqtt.brokr: unknown key", "mqtt.qos", "batch.max", "scoring:", "models[0].topics"):
        assert key in done.stdout, (key, done.stdout)

    good = tmp_path / "good.toml"
    good.write_text(f'[metrics]\nport = 0\n[[models]]\npath = "{tiny_model}"\n')
    done = rnnsentry("run", "--config", str(good), "--check-config")
    assert done.returncode == 0, done.stdout


def test_check_config_finds_what_run_would_stop_on(tiny_model: Path, tmp_path: Path) -> None:
    """The files, the secret, the port, the names: every problem a start would meet, one
    line each; and run itself stops on each with one line and exit 2."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    cases = {
        "models[0]": f'[metrics]\nport = 0\n[[models]]\npath = "{broken}"\n',
        "mqtt.password_file": f'[mqtt]\nusername = "u"\npassword_file = "{tmp_path / "none"}"\n'
        f'[metrics]\nport = 0\n[[models]]\npath = "{tiny_model}"\n',
        "metrics.port": f'[metrics]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[[models]]\npath = "{tiny_model}"\n',
        "mqtt.status_topic": '[mqtt]\nstatus_topic = "status/{stream}"\n[metrics]\nport = 0\n'
        f'[[models]]\npath = "{tiny_model}"\n',
        "daemon.instance": '[daemon]\ninstance = "x/#"\n[metrics]\nport = 0\n'
        f'[[models]]\npath = "{tiny_model}"\n',
    }
    try:
        for key, text in cases.items():
            config = tmp_path / f"{key}.toml"
            config.write_text(text)
            checked = rnnsentry("run", "--config", str(config), "--check-config")
            assert checked.returncode == 1 and key in checked.stdout, (key, checked.stdout)
            ran = rnnsentry("run", "--config", str(config), timeout=60)
            errors = [line for line in ran.stderr.splitlines() if "error" in line.lower()]
            assert ran.returncode == 2 and "Traceback" not in ran.stderr, (key, ran.stderr)
            assert len(errors) == 1 and errors[0].startswith("rnnsentry: error: "), ran.stderr
            assert key in errors[0], (key, errors)
    finally:
        busy.close()


def test_the_documented_example_config_is_valid(tiny_model: Path) -> None:
    """As written, with a model file that exists and a port of the system's choosing."""
    example = Path(__file__).resolve().parents[2] / "deploy" / "rnnsentry.toml"
    done = rnnsentry("run", "--config", str(example), "--model", str(tiny_model),
                     "--metrics-port", "0", "--check-config")  # fmt: skip
    assert done.returncode == 0, done.stdout


def test_log_level_before_the_command_is_honoured(tiny_model: Path, tmp_path: Path) -> None:
    """``--log-level`` goes before the command; its value is not taken for the command, and
    for ``run`` it wins over the config's ``log_level``."""
    made = rnnsentry("--log-level", "DEBUG", "synth", "--out", str(tmp_path / "fleet"),
                     "--streams", "2", "--steps", "50")  # fmt: skip
    assert made.returncode == 0, made.stderr
    config = tmp_path / "quiet.toml"
    config.write_text('[daemon]\nlog_level = "INFO"\nworkers = 1\n[metrics]\nport = 0\n'
                      '[mqtt]\nbroker = "mqtt://127.0.0.1:1"\n'
                      f'[[models]]\npath = "{tiny_model}"\n')  # fmt: skip
    command = [sys.executable, "-m", "detector", "--log-level", "WARNING", "run", "--config",
               str(config)]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # loads the model, tries the broker that is not there
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "INFO" not in err and "WARNING" in err, err  # the failed connection, said as such
