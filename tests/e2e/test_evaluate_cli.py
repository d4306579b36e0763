"""`rnnsentry evaluate` on tiny hand-written files: replay-style scores, NAB windows, SKAB labels.

The scores file has 20 rows, one a minute; the labelled window is rows 10..14.
anomaly_score: 0.9 at row 10, 0.5 at row 3, 0 elsewhere; alert: rows 3, 11, 12.
  point-wise: TP 11, 12; FP 3; FN 10, 13, 14; TN 14 rows -> precision 2/3, recall 0.4,
    F1 4 / (4 + 1 + 3) = 0.5, FAR 1/15, MAR 0.6; the alert raised at row 11 catches the
    event 1 row (60 s) after its start.
  NAB (probation: floor(0.15 x 20) = 3 rows): at threshold 0.9 only row 10 is flagged,
    y = -1: raw sigma(-1) = 0.98661 with no false positive; 0.5 adds row 3 (-0.11 or -0.22);
    0 flags every row from 3 on. So 0.9 wins: standard 100 (0.98661 + 1) / 2 = 99.33,
    low FN 100 (0.98661 + 2) / 3 = 99.55.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from detector.errors import DataError
from training.evaluation.evaluate import add_evaluate_arguments, run_evaluate

pytestmark = pytest.mark.e2e
ROWS, WINDOW = 20, (10, 14)
SCORE = {10: 0.9, 3: 0.5}
ALERT = {3, 11, 12}


def stamp(row: int) -> str:
    return f"2024-01-01 00:{row:02d}:00"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    scores = tmp_path / "tiny.csv"
    lines = ["timestamp,value,raw_score,anomaly_score,alert,top_feature"]
    for t in range(ROWS):
        lines.append(f"{stamp(t)},{t % 3},1.0,{SCORE.get(t, 0.0):.9f},{int(t in ALERT)},value")
    scores.write_text("\n".join(lines) + "\n")
    windows = tmp_path / "windows.json"
    doc = {
        "cat/tiny.csv": [[stamp(WINDOW[0]) + ".000000", stamp(WINDOW[1]) + ".000000"]],
        "cat/other.csv": [],
    }
    windows.write_text(json.dumps(doc))
    data = tmp_path / "data.csv"  # SKAB style: ';', datetime, a 0/1 anomaly column
    rows = [f"{stamp(t)};{t % 3};{int(WINDOW[0] <= t <= WINDOW[1])}" for t in range(ROWS)]
    data.write_text("datetime;value;anomaly\n" + "\n".join(rows) + "\n")
    return {"scores": scores, "windows": windows, "data": data}


def evaluate(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    return run_evaluate(parser.parse_args(list(argv)))


def check_report(doc: dict) -> None:
    point, event, nab = doc["point"], doc["event"], doc["nab"]
    assert (point["tp"], point["fp"], point["fn"], point["tn"]) == (2, 1, 3, 14)
    assert point["precision"] == pytest.approx(2 / 3) and point["recall"] == pytest.approx(0.4)
    assert point["f1"] == pytest.approx(0.5)
    assert point["far"] == pytest.approx(1 / 15) and point["mar"] == pytest.approx(0.6)
    assert (event["events"], event["caught"], event["late"], event["missed"]) == (1, 1, 0, 0)
    assert (event["median_delay_steps"], event["mean_delay_steps"]) == (1.0, 1.0)
    assert event["mean_delay_s"] == event["median_delay_s"] == 60.0
    assert nab["standard"]["threshold"] == pytest.approx(0.9)
    assert nab["standard"]["normalised"] == pytest.approx(99.3307, abs=1e-3)
    assert nab["reward_low_FP_rate"]["normalised"] == pytest.approx(99.3307, abs=1e-3)
    assert nab["reward_low_FN_rate"]["normalised"] == pytest.approx(99.5536, abs=1e-3)


def test_windows_json_matched_by_stem(files: dict[str, Path], capsys) -> None:
    assert evaluate("--scores", str(files["scores"]), "--windows", str(files["windows"]),
                    "--json") == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    check_report(doc)
    assert list(doc["event_by_class"]) == ["cat"]  # the key's folder names the class
    assert doc["event_by_class"]["cat"]["caught"] == 1


def test_labels_column_gives_the_same_report(files: dict[str, Path], capsys) -> None:
    assert evaluate("--scores", str(files["scores"]), "--labels", str(files["data"]),
                    "--json") == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    check_report(doc)
    assert doc["event_by_class"] == {}  # a 0/1 column names no class


def test_markdown_table_and_skipped_rows(files: dict[str, Path], capsys) -> None:
    # --skip-rows 5 leaves the false alarm at row 3 out: precision 1, FAR 0 over 15 rows.
    assert evaluate("--scores", str(files["scores"]), "--windows", str(files["windows"]),
                    "--key", "cat/tiny.csv", "--skip-rows", "5") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "1 file(s), 20 rows (15 evaluated), 1 labelled event(s)" in out
    assert "| point-wise | 1.000 | 0.400 | 0.571 | 0.000 | 0.600 |" in out
    assert "| all | 1 | 1 | 0 | 0 | 1.000 | 1.0 / 1.0 | 60 / 60 |" in out
    assert "| cat | 1 | 1 | 0 | 0 | 1.000 | 1.0 / 1.0 | 60 / 60 |" in out
    assert "| standard | 99.3 | 0.9 |" in out


def test_an_alert_raised_after_the_window_is_late(files: dict[str, Path], capsys) -> None:
    # The same file with the alert on rows 3 and 16..17 instead: the window (rows 10..14)
    # ends with no raise inside it; row 16 is 2 rows after its end, within its 5-row grace.
    lines = files["scores"].read_text().splitlines()
    for t in range(ROWS):
        cells = lines[t + 1].split(",")
        cells[4] = str(int(t in (3, 16, 17)))
        lines[t + 1] = ",".join(cells)
    files["scores"].write_text("\n".join(lines) + "\n")
    args = ("--scores", str(files["scores"]), "--windows", str(files["windows"]), "--json")
    assert evaluate(*args) == 0
    event = json.loads(capsys.readouterr().out)["event"]
    assert (event["caught"], event["late"], event["missed"], event["recall"]) == (0, 1, 0, 0.0)
    assert event["mean_delay_steps"] is None  # no caught event: no delay
    assert evaluate(*args, "--grace-rows", "1") == 0
    event = json.loads(capsys.readouterr().out)["event"]
    assert (event["caught"], event["late"], event["missed"]) == (0, 0, 1)
    with pytest.raises(DataError, match="must not be negative"):
        evaluate(*args, "--grace-rows", "-1")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--key", "cat/missing.csv"], "no key 'cat/missing.csv'"),
        (["--key-prefix", "dog/"], "no windows key matches 'tiny'"),
        (["--key", "a", "--key", "b"], "1 scores file(s) but 2 --key value(s)"),
    ],
)
def test_bad_keys_are_one_data_error(
    files: dict[str, Path], extra: list[str], message: str
) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate("--scores", str(files["scores"]), "--windows", str(files["windows"]), *extra)


def test_label_file_of_another_length_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    short = tmp_path / "short.csv"
    short.write_text("\n".join(files["data"].read_text().splitlines()[:5]) + "\n")
    with pytest.raises(DataError, match="rows"):
        evaluate("--scores", str(files["scores"]), "--labels", str(short))


# --- through the real command line (needs `evaluate` registered in detector/cli.py) ---


def rnnsentry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *args], capture_output=True, text=True, timeout=60
    )


def test_command_line_prints_the_report(files: dict[str, Path]) -> None:
    done = rnnsentry("evaluate", "--scores", str(files["scores"]),
                     "--windows", str(files["windows"]), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    check_report(json.loads(done.stdout))


def test_command_line_bad_input_is_one_line_and_exit_2(files: dict[str, Path]) -> None:
    done = rnnsentry("evaluate", "--scores", str(files["scores"]),
                     "--windows", str(files["scores"]))  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not a JSON document" in done.stderr
