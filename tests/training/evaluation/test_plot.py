"""`rnnsentry plot` and `replay --plot` on small hand-written replay outputs.

The scores file has 60 rows, one a minute from 2024-01-01 00:00; inputs ``flow`` and
``pressure`` and a 0/1 ``anomaly`` column (rows 20..29); ``alert`` is 1 on rows 22..31
and 50..52, so two alerts are raised (rows 22 and 50), the first inside the window.
``alert_score`` (the alert's own likelihood, log-scaled) is 0.7 on the alert rows and 0.1
elsewhere; ``anomaly_score`` is 0.6 at rows 22 and 50 and 0.02 elsewhere. Files written
before replay had ``alert_score`` lack the column (``alert_score=False``).
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
from training.evaluation import plot
from training.evaluation.plot import (
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


def alert_score_at(row: int) -> float:
    return 0.7 if alert_at(row) else 0.1


def write_scores(
    path: Path, timestamps: bool = True, extra: int = 0, alert_score: bool = True
) -> Path:
    extra_names = [f"s{i}" for i in range(extra)]
    header = ["flow", "pressure", *extra_names, "anomaly", "raw_score", "anomaly_score"]
    header = (["timestamp"] if timestamps else []) + header + ["alert", "top_feature"]
    header += ["alert_score"] if alert_score else []
    lines = [",".join(header)]
    for t in range(ROWS):
        label = int(WINDOW[0] <= t <= WINDOW[1])
        score = 0.6 if t in (22, 50) else 0.02
        cells = [f"{np.sin(t / 5):.4f}", f"{3 * label + t % 2}", *(str(i) for i in range(extra))]
        cells += [str(label), "" if t == 0 else "1.5", f"{score}", str(alert_at(t)), "flow"]
        cells += [f"{alert_score_at(t)}"] if alert_score else []
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


SCORE_PANELS_PX = 130 + 260  # anomaly_score, then the alert panel (alert_score)


def test_draws_features_score_alerts_and_windows(scores: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    result = plot_scores(scores, out, events=[WINDOW])
    assert png_size(out) == result.size == (1200, 150 + 2 * 130 + SCORE_PANELS_PX)
    assert result.rows == ROWS and result.time_axis == "timestamp"
    assert result.features == ("flow", "pressure") and result.omitted == ()  # no label column
    assert result.alerts == ALERTS and result.raised == (22, 50)
    assert result.windows == (WINDOW,) and (result.windows_caught, result.windows_late) == (1, 0)
    # The rule's lines are on the alert_score axis: likelihood >= 0.99999999 is a tail of
    # 1e-8, 8/16 = 0.5; the clear threshold 0.99 a tail of 1e-2, 2/16 = 0.125.
    assert result.alert_column == "alert_score" and result.note == ""
    assert [round(t.score, 9) for t in result.thresholds] == [0.5, 0.125]
    assert "likelihood \u2265 0.99999999" in result.thresholds[0].label
    assert "alert_score 0.5" in result.thresholds[0].label
    assert "0.99 for 20 steps" in result.thresholds[1].label


def test_the_alert_panel_draws_the_alert_score_column(
    scores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: dict[str, object] = {}

    def capture(path: Path, **kw: object) -> tuple[int, int]:
        drawn.update(kw)
        return (1, 1)

    monkeypatch.setattr(plot, "_draw", capture)
    plot_scores(scores, tmp_path / "p.png")
    anomaly, alert = drawn["scores"]  # type: ignore[misc]
    assert (anomaly.column, anomaly.alerts, anomaly.lines) == ("anomaly_score", False, ())
    assert (alert.column, alert.alerts) == ("alert_score", True)
    assert alert.values.tolist() == [alert_score_at(t) for t in range(ROWS)]
    assert anomaly.values[22] == 0.6 and anomaly.values[23] == 0.02
    assert [round(line.score, 9) for line in alert.lines] == [0.5, 0.125]


def test_windows_raised_inside_after_or_before(scores: Path, tmp_path: Path) -> None:
    # alerts are raised at rows 22 and 50. (20, 29): raised inside, caught. (15, 19): raised
    # 3 rows after its end, within its 5-row grace: late. (24, 30): the alert was already
    # active from row 22, raised before it, and none is raised in the 7 rows after: missed.
    for events, caught, late in (([(20, 29)], 1, 0), ([(15, 19)], 0, 1), ([(24, 30)], 0, 0)):
        result = plot_scores(scores, tmp_path / "p.png", events=events)
        assert (result.windows_caught, result.windows_late) == (caught, late), events


def test_an_older_output_without_alert_score_falls_back_with_a_note(tmp_path: Path, capsys) -> None:
    old = write_scores(tmp_path / "old.csv", alert_score=False)
    result = plot_scores(old, tmp_path / "old.png", events=[WINDOW])
    assert png_size(tmp_path / "old.png") == result.size == (1200, 150 + 2 * 130 + 260)
    assert result.alert_column == "anomaly_score" and "no alert_score column" in result.note
    assert result.raised == (22, 50) and result.windows_caught == 1
    assert main(["plot", "--scores", str(old), "--out", str(tmp_path / "cli.png")]) == 0
    line = capsys.readouterr().out
    assert "raise line at anomaly_score 0.5" in line and "note: no alert_score column" in line


def test_row_axis_many_features_and_a_number_threshold(tmp_path: Path) -> None:
    scores = write_scores(tmp_path / "wide.csv", timestamps=False, extra=9)
    out = tmp_path / "wide.png"
    result = plot_scores(scores, out, threshold=0.4, title="wide")
    assert result.time_axis == "row"
    assert len(result.features) == MAX_FEATURES and result.features[:2] == ("flow", "pressure")
    assert result.omitted == tuple(f"s{i}" for i in range(MAX_FEATURES - 2, 9))
    assert png_size(out) == result.size == (1200, 150 + MAX_FEATURES * 130 + SCORE_PANELS_PX)
    # a number is an anomaly_score threshold (evaluate's NAB one), not the alert rule
    assert [(t.score, t.label, t.of_rule) for t in result.thresholds] == [
        (0.4, "anomaly_score threshold 0.4", False)
    ]
    assert result.windows == () and result.windows_caught == 0


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
    assert png_size(out) == (1200, 150 + 130 + SCORE_PANELS_PX)
    assert line.count("\n") == 1 and f"-> {out}" in line
    assert "features pressure (+1 not drawn)" in line and "2 alert(s) raised" in line
    assert "1 labelled window(s): 1 caught (alert raised inside), 0 late" in line
    assert "raise line at alert_score 0.5" in line and "note" not in line
    assert main([*argv, "--threshold", "0.3"]) == 0
    assert "; anomaly_score threshold 0.3" in capsys.readouterr().out


def test_config_thresholds_are_the_alert_rule_on_the_score_axis(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text("[scoring]\nthreshold = 0.999\nclear_threshold = 0.9\nclear_steps = 7\n")
    config, problems = load_config(toml, environ={})
    assert not problems
    raise_line, clear_line = alert_lines(config.scoring)
    assert raise_line.score == pytest.approx(3 / 16) and clear_line.score == pytest.approx(1 / 16)
    assert "likelihood \u2265 0.999 " in raise_line.label
    assert "likelihood < 0.9 for 7 steps" in clear_line.label


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
        " bad = [m for m in ('matplotlib', 'torch', 'training.evaluation.plot')"
        "        if m in sys.modules];"
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
    assert png_size(png) == (1200, 150 + len(TINY_FEATURES) * 130 + SCORE_PANELS_PX)
    assert "raise line at alert_score 0.5" in plotted and "note" not in plotted
    header = out.read_text().splitlines()[0]
    assert header.endswith("raw_score,anomaly_score,alert,top_feature,alert_score")
