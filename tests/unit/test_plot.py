"""`rnnsentry plot` and `replay --plot` on small hand-written replay outputs.

The scores file has 60 rows, one a minute from 2024-01-01 00:00; inputs ``flow`` and
``pressure`` and a 0/1 ``anomaly`` column (rows 20..29); ``alert`` is 1 on rows 22..31
and 50..52, so two alerts are raised (rows 22 and 50), the first inside the window.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector.cli import main
from detector.config import load_config
from detector.errors import DataError, RnnsentryError
from tests.support import TINY_FEATURES
from training.plot import (
    MAX_FEATURES,
    alert_lines,
    load_labels,
    plot_scores,
    plot_with_labels,
)

ROWS = 60
WINDOW = (20, 29)
ALERTS = ((22, 31), (50, 52))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stamp(row: int) -> str:
    return f"2024-01-01T{row // 60:02d}:{row % 60:02d}:00Z"


def alert_at(row: int) -> int:
    return int(any(a <= row <= b for a, b in ALERTS))


def write_scores(path: Path, timestamps: bool = True, extra: int = 0) -> Path:
    extra_names = [f"s{i}" for i in range(extra)]
    header = ["flow", "pressure", *extra_names, "anomaly", "raw_score", "anomaly_score"]
    header = (["timestamp"] if timestamps else []) + header + ["alert", "top_feature"]
    lines = [",".join(header)]
    for t in range(ROWS):
        label = int(WINDOW[0] <= t <= WINDOW[1])
        score = 0.6 if t in (22, 50) else 0.02
        cells = [f"{np.sin(t / 5):.4f}", f"{3 * label + t % 2}", *(str(i) for i in range(extra))]
        cells += [str(label), "" if t == 0 else "1.5", f"{score}", str(alert_at(t)), "flow"]
        lines.append(",".join(([stamp(t)] if timestamps else []) + cells))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, checking the signature on the way."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.fixture
def scores(tmp_path: Path) -> Path:
    return write_scores(tmp_path / "pump.scores.csv")


def test_draws_features_score_alerts_and_windows(scores: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    result = plot_scores(scores, out, events=[WINDOW])
    assert png_size(out) == result.size == (1200, 150 + 2 * 130 + 260)
    assert result.rows == ROWS and result.time_axis == "timestamp"
    assert result.features == ("flow", "pressure") and result.omitted == ()  # no label column
    assert result.alerts == ALERTS and result.raised == (22, 50)
    assert result.windows == (WINDOW,) and result.windows_alerted == 1
    # The raise rule of the defaults, likelihood >= 0.99999999, is a tail of 1e-8: 8/16 = 0.5.
    assert [round(t.score, 9) for t in result.thresholds] == [0.5, 0.125]
    assert "0.99999999" in result.thresholds[0].label


def test_row_axis_many_features_and_a_number_threshold(tmp_path: Path) -> None:
    scores = write_scores(tmp_path / "wide.csv", timestamps=False, extra=9)
    out = tmp_path / "wide.png"
    result = plot_scores(scores, out, threshold=0.4, title="wide")
    assert result.time_axis == "row"
    assert len(result.features) == MAX_FEATURES and result.features[:2] == ("flow", "pressure")
    assert result.omitted == tuple(f"s{i}" for i in range(MAX_FEATURES - 2, 9))
    assert png_size(out) == result.size == (1200, 150 + MAX_FEATURES * 130 + 260)
    assert [(t.score, t.label) for t in result.thresholds] == [(0.4, "threshold 0.4")]
    assert result.windows == () and result.windows_alerted == 0


def test_windows_json_and_label_column_place_the_same_rows(scores: Path, tmp_path: Path) -> None:
    windows = tmp_path / "windows.json"
    start, end = stamp(WINDOW[0]).replace("T", " ")[:-1], stamp(WINDOW[1])
    windows.write_text(json.dumps({"cat/pump.csv": [[start, end]], "cat/other.csv": []}))
    from detector.csvdata import read_csv

    table = read_csv(scores)
    by_time = load_labels(windows=str(windows), stem=scores.stem)  # "pump.scores" -> pump
    by_flag = load_labels(labels=str(scores), label_col="anomaly")
    assert by_time is not None and by_flag is not None
    assert by_time.events(table) == by_flag.events(table) == (WINDOW,)
    assert load_labels() is None
    with pytest.raises(DataError, match="--key"):
        load_labels(key="cat/pump.csv")
    with pytest.raises(DataError, match="no windows key"):
        load_labels(windows=str(windows), stem="elsewhere")


def test_command_line_writes_the_png(scores: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.png"
    windows = tmp_path / "w.json"
    windows.write_text(json.dumps({"pump.csv": [[stamp(20), stamp(29)]]}))
    argv = ["plot", "--scores", str(scores), "--out", str(out), "--windows", str(windows),
            "--features", "pressure", "--title", "pump 7"]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert png_size(out) == (1200, 150 + 130 + 260)
    assert line.count("\n") == 1 and f"-> {out}" in line
    assert "features pressure (+1 not drawn)" in line and "2 alert(s) raised" in line
    assert "1 labelled window(s), 1 alerted" in line and "anomaly_score 0.5" in line


def test_config_thresholds_are_the_alert_rule_on_the_score_axis(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text("[scoring]\nthreshold = 0.999\nclear_threshold = 0.9\nraise_k = 2\n"
                    "raise_n = 3\n")  # fmt: skip
    config, problems = load_config(toml, environ={})
    assert not problems
    raise_line, clear_line = alert_lines(config.scoring)
    assert raise_line.score == pytest.approx(3 / 16) and clear_line.score == pytest.approx(1 / 16)
    assert "0.999 in 2 of 3 steps" in raise_line.label and "0.9 for 20 steps" in clear_line.label


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("timestamp,flow\n2024-01-01T00:00:00Z,1\n", "not an output of rnnsentry replay"),
        ("flow,anomaly_score,alert\n1,0.1,2\n", "other than 0 and 1"),
        ("", "empty"),
    ],
)
def test_bad_scores_file_is_a_data_error(
    tmp_path: Path, content: str | None, message: str, capsys
) -> None:
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        plot_scores(path, tmp_path / "x.png")
    assert main(["plot", "--scores", str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_bad_labels_are_data_errors(scores: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="outside the file's 60 rows"):
        plot_scores(scores, tmp_path / "x.png", events=[(55, 60)])
    short = tmp_path / "short.csv"
    short.write_text("anomaly\n0\n1\n")
    labels = load_labels(labels=str(short))
    with pytest.raises(DataError, match="has 60 rows but"):
        plot_with_labels(scores, tmp_path / "x.png", labels)
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_is_one_clear_error(
    scores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RnnsentryError, match=r"pip install 'rnnsentry\[train\]'"):
        plot_scores(scores, tmp_path / "x.png")
    assert main(["plot", "--scores", str(scores), "--out", str(tmp_path / "x.png")]) == 2
    assert "rnnsentry plot needs matplotlib" in capsys.readouterr().err
    # replay says so before it loads the model (there is none here) or replays anything
    argv = ["replay", "--model", str(tmp_path / "none.onnx"), "--data", str(scores),
            "--out", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "x.png")]  # fmt: skip
    assert main(argv) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_replay_label_flags_need_plot(scores: Path, tmp_path: Path, capsys) -> None:
    argv = ["replay", "--model", "m.onnx", "--data", str(scores), "--out", str(tmp_path / "s"),
            "--labels", str(scores)]  # fmt: skip
    assert main(argv) == 2
    assert "go with --plot" in capsys.readouterr().err


def test_daemon_commands_do_not_load_matplotlib() -> None:
    code = (
        "import sys, detector.cli, detector.daemon, detector.replay;"
        " detector.cli.build_parser('replay');"
        " bad = [m for m in ('matplotlib', 'torch', 'training.plot') if m in sys.modules];"
        " sys.exit(str(bad) if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_replay_with_plot(tiny_model: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    rows = 120
    values = rng.normal(size=(rows, len(TINY_FEATURES)))
    values[80:90] += 8.0  # a step the model has never seen
    data = tmp_path / "pump.csv"
    lines = [",".join(["timestamp", *TINY_FEATURES, "anomaly"])]
    for t in range(rows):
        cells = [f"{v:.4f}" for v in values[t]]
        lines.append(",".join([str(1_700_000_000 + 10 * t), *cells, str(int(80 <= t < 90))]))
    data.write_text("\n".join(lines) + "\n")
    out, png = tmp_path / "scores.csv", tmp_path / "replay.png"
    argv = ["replay", "--model", str(tiny_model), "--data", str(data), "--out", str(out),
            "--plot", str(png), "--labels", str(data)]  # fmt: skip
    assert main(argv) == 0
    replayed, plotted = capsys.readouterr().out.splitlines()
    assert replayed.startswith(f"replayed {rows} rows") and plotted.startswith(f"plotted {rows}")
    assert f"features {', '.join(TINY_FEATURES)};" in plotted
    assert "1 labelled window(s)" in plotted
    assert png_size(png) == (1200, 150 + len(TINY_FEATURES) * 130 + 260)
    assert out.read_text().splitlines()[0].endswith("raw_score,anomaly_score,alert,top_feature")
