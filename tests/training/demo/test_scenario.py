"""The demo's verdict on each injected anomaly: caught only by an alert raised inside it.

Anomalies are synth's: steps [start, end), the end exclusive. One pump, two anomalies:
a spike on steps 100..102 and a drift on steps 200..259; GRACE_STEPS is 30.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import training.demo.localbroker as localbroker
from detector.cli import main
from training.demo.scenario import GRACE_STEPS, _Seen, _summary, judge

SPIKE = SimpleNamespace(stream=0, kind="spike", start=100, end=103)
DRIFT = SimpleNamespace(stream=0, kind="drift", start=200, end=260)


def raised(*steps: int, stream: str = "pump-01") -> list[_Seen]:
    return [_Seen(stream, "raised", 0.0, step, 1.0, "") for step in steps]


def verdicts(*steps: int) -> list[tuple[str, int | None]]:
    found, _ = judge([SPIKE, DRIFT], raised(*steps))
    return [(v.verdict, v.steps) for v in found]


def test_a_raise_inside_catches_with_the_delay_from_the_start() -> None:
    assert verdicts(100, 230) == [("caught", 0), ("caught", 30)]
    assert verdicts(102, 259) == [("caught", 2), ("caught", 59)]  # each one's last step


def test_a_raise_before_the_start_does_not_catch() -> None:
    # raised at 99 and 195, a step and five steps before each anomaly started: the alerts
    # may well be active through them, but neither was raised by one. Both are false: 99
    # precedes the spike, 195 comes after the spike's grace (steps 103..132).
    found, false_alerts = judge([SPIKE, DRIFT], raised(99, 195))
    assert [v.verdict for v in found] == ["MISSED", "MISSED"]
    assert false_alerts == 2


def test_a_raise_after_the_end_is_late_within_the_grace() -> None:
    # the spike's last step is 102: a raise at 103 is 1 step late, at 132 30 steps late
    assert verdicts(103)[0] == ("late", 1)
    assert verdicts(102 + GRACE_STEPS)[0] == ("late", GRACE_STEPS)
    assert verdicts(103 + GRACE_STEPS)[0] == ("MISSED", None)
    # a raise inside the drift is the drift's, whatever the spike's grace
    assert verdicts(205) == [("MISSED", None), ("caught", 5)]


def test_false_alerts_are_raises_matched_to_no_anomaly() -> None:
    # 50: before everything; 101: the spike (caught); 120: in the spike's grace (not false);
    # 201 and 210: both inside the drift (not false); 300: 40 steps after the drift's end
    found, false_alerts = judge([SPIKE, DRIFT], raised(50, 101, 120, 201, 210, 300))
    assert [v.verdict for v in found] == ["caught", "caught"]
    assert false_alerts == 2
    # another pump's raise inside the spike's steps catches nothing and is false
    found, false_alerts = judge([SPIKE], raised(101, stream="pump-02"))
    assert (found[0].verdict, false_alerts) == ("MISSED", 1)


def test_summary_prints_caught_late_missed_and_false(capsys: pytest.CaptureFixture[str]) -> None:
    # 110: 8 steps after the spike's last step; 204: 4 steps into the drift; 400: false
    live = SimpleNamespace(anomalies=[SPIKE, DRIFT], interval_s=0.1)
    _summary(live, raised(110, 204, 400), 1000, 0, 9108, 12.3)
    out = capsys.readouterr().out
    assert (
        "pump-01  spike              steps  100-102   late    raised 8 steps (0.8 s) after" in out
    )
    assert "pump-01  drift              steps  200-259   caught  delay 4 steps (0.4 s)" in out
    assert "  caught               1 (median delay 4 steps)\n" in out
    assert f"  late                 1 (raised within {GRACE_STEPS} steps after the end)\n" in out
    assert "  missed               0\n" in out
    assert "  false alerts         1\n" in out


def test_without_mosquitto_the_demo_says_what_to_install_in_one_line_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no mosquitto on PATH
    monkeypatch.setattr(localbroker, "SBIN_DIRS", ())
    assert main(["demo", "--duration", "1"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "sudo apt-get install mosquitto" in err
    assert "training" not in out  # said before any work
