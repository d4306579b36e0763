"""A building's air-handling unit, trained and replayed as a user would: a process no setting
was chosen on.

Per seed, two weeks of one-minute samples of three sensors: supply-air temperature (held at
13 °C while the building is occupied, 16 °C otherwise, a first-order response with noise),
relative humidity (outdoor moisture, people, lagging occupancy) and fan power (occupancy and
the cooling load). Weekdays are occupied 7:00-19:00, weekends barely; outdoor temperature has
a daily swing and a slow weather walk. ``rnnsentry train`` fits the first week with its
defaults; ``rnnsentry replay`` scores the second, which carries three failures on weekdays:
a 15-minute humidity spike (+8 %RH), the supply-air sensor stuck for two hours, and fan power
drifting to +40 % over six hours. Each is judged as the demo judges: caught (an alert raised
inside it, with the delay), late (within GRACE_ROWS after it) or missed; a raise outside
every failure and its grace is false. The last column is what ``train`` warned of: the
sensors whose held-out rows (the week's last fifth, a weekend) vary far less than the rest.
Not a test.

    .venv/bin/python bench/building.py [--seeds 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import REPO, machine_line
from quality import ENV  # the project's defaults: no RNNSENTRY_* setting of the caller's

from detector.artifact import read_artifact
from training.evaluation.evaluate import first_raise, raise_rows

DAY = 1440  # one-minute rows
DAYS = 14  # the first week trains, the second is scored
FEATURES = ("supply_air", "humidity", "fan_power")
GRACE_ROWS = 60  # after a failure ends: a raise here is late, not false


@dataclass(frozen=True)
class Failure:
    name: str
    start: int  # row of the scored week
    end: int  # exclusive


def occupancy(hour: np.ndarray, weekday: np.ndarray) -> np.ndarray:
    """0..1: ramps up over 6:30-7:30 and down over 19:00-20:00 on weekdays; a little use on
    weekend middays."""
    up = np.clip(hour - 6.5, 0.0, 1.0) * np.clip(19.5 - hour, 0.0, 1.0)
    weekend = 0.15 * np.clip(hour - 9.0, 0.0, 1.0) * np.clip(14.0 - hour, 0.0, 1.0)
    out: np.ndarray = np.where(weekday, up, weekend)
    return out


def building(seed: int) -> tuple[np.ndarray, list[Failure]]:
    """Two weeks of the unit's sensors [rows, 3] (the second week with its failures)."""
    rng = np.random.default_rng(seed)
    n = DAYS * DAY
    t = np.arange(n)
    hour, day = (t / 60.0) % 24.0, t // DAY
    occ = occupancy(hour, (day % 7) < 5)
    weather = np.cumsum(rng.normal(0.0, 0.02, n))
    weather -= np.linspace(0.0, weather[-1], n)  # a walk that ends where it began
    outdoor = 8.0 + 6.0 * np.sin(2.0 * np.pi * (hour - 9.0) / 24.0) + 2.0 * weather
    setpoint = np.where(occ > 0.5, 13.0, 16.0) + 0.05 * (outdoor - 8.0)
    supply = np.empty(n)
    level = 15.0
    for i in range(n):  # the coil's first-order response to its setpoint
        level += 0.15 * (setpoint[i] - level)
        supply[i] = level
    load = np.convolve(np.maximum(outdoor - 10.0, 0.0), np.ones(30) / 30.0, mode="same")
    fan = 1.5 + 6.0 * occ + 0.35 * load * occ
    people = np.convolve(occ, np.ones(45) / 45.0, mode="full")[:n]  # moisture lags people
    humidity = 42.0 + 6.0 * people + 3.0 * weather - 0.3 * (outdoor - 8.0)
    values = np.stack([supply, humidity, fan], axis=1)
    values += rng.normal(0.0, 1.0, values.shape) * np.array([0.15, 0.4, 0.12])
    week = 7 * DAY
    scored = values[week:]
    failures = [
        Failure("humidity spike", 1 * DAY + 11 * 60, 1 * DAY + 11 * 60 + 15),
        Failure("supply air stuck", 2 * DAY + 14 * 60, 2 * DAY + 16 * 60),
        Failure("fan power drift", 4 * DAY + 8 * 60, 4 * DAY + 14 * 60),
    ]
    spike, stuck, drift = failures
    scored[spike.start : spike.end, 1] += 8.0
    scored[stuck.start : stuck.end, 0] = scored[stuck.start - 1, 0]
    ramp = np.arange(drift.end - drift.start) / (drift.end - drift.start)
    scored[drift.start : drift.end, 2] *= 1.0 + 0.4 * ramp
    return values, failures


def write_csv(path: Path, values: np.ndarray, first_row: int) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", *FEATURES])
        for i, row in enumerate(values):
            out.writerow([1_700_000_000 + 60 * (first_row + i), *(f"{v:.4f}" for v in row)])


def rnnsentry(*argv: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "detector", *argv], cwd=REPO, env=ENV, capture_output=True,
        text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"rnnsentry {argv[0]}: {done.stderr.strip()}")


def run_seed(
    seed: int, work: Path
) -> tuple[list[tuple[str, str, int | None]], list[int], list[str] | None]:
    """Train and replay one seed; each failure's (name, verdict, minutes: from its start when
    caught, after its end when late), the rows of the false raises, and the sensors train
    warned were quiet in the held-out rows (None: a model from before the warning)."""
    values, failures = building(seed)
    train, test = work / f"train-{seed}.csv", work / f"scored-{seed}.csv"
    model, scores = work / f"unit-{seed}.onnx", work / f"scores-{seed}.csv"
    write_csv(train, values[: 7 * DAY], 0)
    write_csv(test, values[7 * DAY :], 7 * DAY)
    if not model.exists():
        rnnsentry("train", "--data", str(train), "--out", str(model), "--seed", str(seed),
                  "--quiet")  # fmt: skip
    rnnsentry("replay", "--model", str(model), "--data", str(test), "--out", str(scores))
    with scores.open() as f:
        alert = np.array([int(row["alert"]) for row in csv.DictReader(f)])
    raises = raise_rows(alert)
    outcomes: list[tuple[str, str, int | None]] = []
    judged = np.zeros(len(raises), bool)
    for failure in failures:
        verdict, row = first_raise(raises, failure.start, failure.end - 1,
                                   failure.end - 1 + GRACE_ROWS)  # fmt: skip
        since = failure.start if verdict == "caught" else failure.end - 1
        outcomes.append((failure.name, verdict, None if row is None else row - since))
        judged |= (raises >= failure.start) & (raises < failure.end + GRACE_ROWS)
    quiet = read_artifact(model)[1].training.get("held_out_quiet")
    return outcomes, [int(r) for r in raises[~judged]], quiet


def cell(verdict: str, minutes: int | None) -> str:
    """A failure's verdict with its delay: from its start when caught, after its end when
    late."""
    if minutes is None:
        return verdict
    return f"{verdict} ({minutes} min{' after its end' if verdict == 'late' else ''})"


def when(row: int) -> str:
    """A scored row as its day of the scored week and time of day."""
    return f"day {row // DAY + 1} {row % DAY // 60:02d}:{row % 60:02d}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (5)")
    parser.add_argument("--work", type=Path, help="keep the data and models here (reused)")
    args = parser.parse_args()
    began = time.perf_counter()
    print(f"building: {machine_line()}\n")
    print("| seed | " + " | ".join(f.name for f in building(0)[1])
          + " | false raises | held-out rows quiet in |")  # fmt: skip
    print("|---" * 6 + "|")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in range(args.seeds):
            outcomes, false, quiet = run_seed(seed, work)
            cells = [cell(verdict, minutes) for _, verdict, minutes in outcomes]
            shown = ", ".join(when(r) for r in false[:6]) + (" ..." if len(false) > 6 else "")
            warned = "-" if quiet is None else ", ".join(quiet) or "none"
            print(f"| {seed} | " + " | ".join(cells) + f" | {len(false)}: {shown} | {warned} |")
    print(f"\n**wall time {time.perf_counter() - began:.0f} s**")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
