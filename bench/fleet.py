"""Detection quality in the fleet shape: one model trained on some pumps, served to others.

Per seed: a small GRU is trained on normal history of the training pumps, then a fleet of
other pumps (a third of them with more sensor noise than any training pump) runs through
``Engine.process`` one step per call, every served stream in the batch, as the daemon
batches them. Most of the served pumps stay normal throughout; the others carry one anomaly
of every class each. Printed as markdown tables, per class: the share of anomalies caught
while happening, raised late and missed, and the median delay; then false alerts per
100,000 normal samples, with the wall time. Not a test.

    .venv/bin/python bench/fleet.py [--seeds N] [--config scoring.toml] [--work DIR] [--jobs 2]

Caught: an alert raised on the stream at a step inside the anomaly, ``[start, end)``; the
delay is that step minus ``start``. Late: no such raise, but one within GRACE_STEPS after
the end. A raise outside every anomaly and its grace is a false alert; normal samples are
the steps outside them from each stream's first (its cold start counts), over every served
stream. Another script may call
``run_fleet(seed, scoring, work)`` and print ``fleet_table(results)``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from detector.engine import Engine
from detector.errors import ModelFileError
from detector.model import LoadedModel
from detector.scoring import ScoringConfig
from training.evaluation.evaluate import first_raise
from training.evaluation.synth import ANOMALY_KINDS, Fleet, generate_fleet, inject, noise_sd

# Training: normal history of pumps 0 .. TRAIN_PUMPS - 1.
TRAIN_PUMPS = 8
TRAIN_STEPS = 4000
HIDDEN_SIZE = 32  # a GRU, on the trainer's default schedule (epochs, patience)

# Serving: pumps from SERVED_FIRST_PUMP on, none of them seen in training; the first
# ANOMALY_STREAMS carry anomalies, the next NORMAL_STREAMS stay normal throughout.
SERVED_FIRST_PUMP = 20
ANOMALY_STREAMS = 60
NORMAL_STREAMS = 90
WARMUP_STEPS = 500  # served steps before any anomaly: streams start cold
SLOT_STEPS = 1200  # each anomaly stream: one anomaly of every class, one per slot
LEAD_STEPS = 150  # normal steps at least, in a slot, before its anomaly starts
GRACE_STEPS = 50  # after an anomaly ends: the recovery; a raise here is late, not false
SERVED_STEPS = WARMUP_STEPS + SLOT_STEPS * len(ANOMALY_KINDS)
NOISIER_EVERY = 3  # every third served pump has its sensors' white noise scaled ...
NOISE_SCALE = (1.2, 1.5)  # ... by a factor drawn from this range (the sd, not the variance)

# (min, max) steps per class, closer to real failures than training.evaluation.synth's: a
# level shift or a stuck sensor lasts until someone repairs it, a drift creeps up over hundreds
# of steps.
DURATIONS = {
    "spike": (1, 3),
    "dip": (1, 3),
    "level_shift": (60, 200),
    "drift": (200, 600),
    "stuck": (60, 240),
    "noise_burst": (20, 60),
    "correlation_break": (60, 200),
}
DRIFT_SIZE = (10.0, 20.0)  # final size of a drift's linear ramp, in noise_sd of the sensor
# A correlation break needs a sensor that follows another, so not flow (the driver); a stuck
# sensor is one whose value moves with the load, so not the noise-dominated vibration
# (training.evaluation.synth's choice too).
BANNED_ROLE = {"correlation_break": 0, "stuck": 3}

TARGET_CAUGHT_PCT = 95.0  # every class
TARGET_FALSE_PER_100K = 1.0
_BENCH_TAG = 7_001  # separates this bench's random stream from training.evaluation.synth's


@dataclass(frozen=True)
class Planted:
    """One injected anomaly: served stream row, class, sensor, ``[start, end)`` in steps."""

    stream: int
    kind: str
    feature: int
    start: int
    end: int


@dataclass(frozen=True)
class ServedFleet:
    values: np.ndarray  # [T, S, F] raw units: one engine call per step
    timestamps: np.ndarray  # [T] epoch seconds, shared by every stream
    stream_ids: list[str]
    features: list[str]
    noise_scale: np.ndarray  # [S] 1.0, or the factor on a noisier pump's white noise
    planted: list[Planted]


@dataclass(frozen=True)
class Outcome:
    kind: str
    stream: str
    feature: str
    start: int
    end: int
    verdict: str  # "caught" | "late" | "missed"
    delay_steps: int | None  # first raise inside the anomaly minus its start (caught only)
    noisier: bool


@dataclass(frozen=True)
class FleetResult:
    """One seed's run: every anomaly's outcome and the false alerts around them."""

    seed: int
    outcomes: list[Outcome]
    false_alerts: int
    normal_samples: int
    false_alerts_noisier: int  # of which on the noisier pumps
    normal_samples_noisier: int
    served_streams: int
    served_steps: int
    train_s: float  # 0 when the model came from the work directory
    score_s: float

    def false_per_100k(self, noisier: bool | None = None) -> float:
        """False alerts per 100,000 normal samples: all pumps, or the noisier / nominal ones."""
        if noisier is None:
            alerts, samples = self.false_alerts, self.normal_samples
        elif noisier:
            alerts, samples = self.false_alerts_noisier, self.normal_samples_noisier
        else:
            alerts = self.false_alerts - self.false_alerts_noisier
            samples = self.normal_samples - self.normal_samples_noisier
        return 1e5 * alerts / samples if samples else math.nan


# --- the model ---


def train_model(seed: int, work: Path) -> tuple[Path, float]:
    """The seed's model, trained on normal history of the training pumps, or the one already
    in ``work``; returns its path and the seconds spent training (0 when cached)."""
    path = work / f"gru-h{HIDDEN_SIZE}-t{TRAIN_STEPS}-seed{seed}.onnx"
    if path.exists():
        try:
            LoadedModel.load(path)
            return path, 0.0
        except ModelFileError:
            path.unlink()  # made by an older exporter: train again
    from training.trainer import fit_and_export
    from training.trainer.train import TrainOptions

    began = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    history = generate_fleet(TRAIN_PUMPS, TRAIN_STEPS, seed=seed)
    options = TrainOptions(cell="gru", hidden_size=HIDDEN_SIZE, seed=seed)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fit_and_export(
        list(history.values),
        history.features,
        tmp,
        options,
        sample_interval_s=history.interval_s,
        name=f"fleet-bench-seed{seed}",
        quiet=True,
    )
    tmp.replace(path)  # whole or absent: another run may be reading the cache
    return path, time.perf_counter() - began


# --- the served fleet ---


def ramp_drift(
    values: np.ndarray, start: int, end: int, feature: int, rng: np.random.Generator
) -> np.ndarray:
    """A copy of ``values`` [T, F] with a linear ramp on ``feature`` over the whole of
    ``[start, end)``, reaching DRIFT_SIZE noise_sd at its last step, up or down.

    >>> flat = np.zeros((6, 1))  # noise_sd 1.0
    >>> np.round(ramp_drift(flat, 1, 5, 0, np.random.default_rng(0))[:, 0], 2)
    array([ 0.  ,  3.17,  6.35,  9.52, 12.7 ,  0.  ])
    """
    out = np.array(values, dtype=np.float64, copy=True)
    n = end - start
    size = rng.choice([-1.0, 1.0]) * rng.uniform(*DRIFT_SIZE) * noise_sd(values[:, feature])
    out[start:end, feature] += size * np.arange(1, n + 1) / n
    return out


def _plant(stream: int, n_features: int, rng: np.random.Generator) -> list[Planted]:
    """One anomaly of every class on one stream, in a shuffled order, one per slot."""
    planted = []
    for slot, kind in enumerate(rng.permutation(ANOMALY_KINDS)):
        kind = str(kind)
        length = int(rng.integers(DURATIONS[kind][0], DURATIONS[kind][1] + 1))
        first = WARMUP_STEPS + slot * SLOT_STEPS + LEAD_STEPS
        last = WARMUP_STEPS + (slot + 1) * SLOT_STEPS - GRACE_STEPS - length
        start = int(rng.integers(first, last + 1))
        pool = [f for f in range(n_features) if f % 4 != BANNED_ROLE.get(kind)]
        feature = int(rng.choice(pool))
        planted.append(Planted(stream, kind, feature, start, start + length))
    return planted


def served_fleet(seed: int) -> ServedFleet:
    """The pumps the model serves, continuing in time after its training history."""
    n_served = ANOMALY_STREAMS + NORMAL_STREAMS
    fleet = generate_fleet(
        SERVED_FIRST_PUMP + n_served, SERVED_STEPS, seed=seed, start_step=TRAIN_STEPS
    )
    values = fleet.values[SERVED_FIRST_PUMP:].copy()  # (S, T, F)
    n_features = values.shape[2]
    rng = np.random.default_rng([seed, _BENCH_TAG])
    # More noise than training: independent white noise added on top of the pump's own, so
    # the total white noise is `scale` times the original (variances add).
    noise_scale = np.ones(n_served)
    for s in range(NOISIER_EVERY - 1, n_served, NOISIER_EVERY):
        noise_scale[s] = rng.uniform(*NOISE_SCALE)
        extra_sd = math.sqrt(noise_scale[s] ** 2 - 1.0) * np.array(
            [noise_sd(values[s, :, f]) for f in range(n_features)]
        )
        values[s] += rng.standard_normal(values[s].shape) * extra_sd  # (T, F) * (F,)
    planted = []
    for s in range(ANOMALY_STREAMS):
        for a in _plant(s, n_features, rng):
            if a.kind == "drift":
                values[s] = ramp_drift(values[s], a.start, a.end, a.feature, rng)
            else:
                values[s] = inject(values[s], a.kind, a.start, a.end, (a.feature,), rng)
            planted.append(a)
    return ServedFleet(
        values=np.ascontiguousarray(values.transpose(1, 0, 2)),  # (T, S, F)
        timestamps=fleet.timestamps(),
        stream_ids=[Fleet.stream_name(SERVED_FIRST_PUMP + s) for s in range(n_served)],
        features=list(fleet.features),
        noise_scale=noise_scale,
        planted=planted,
    )


# --- scoring and judging ---


def replay(model_path: Path, scoring: ScoringConfig, served: ServedFleet) -> list[tuple[int, int]]:
    """Every served stream through one Engine, one step per call; the raises as
    (stream row, step)."""
    engine = Engine(LoadedModel.load(model_path), scoring)
    n_steps, n_streams, _ = served.values.shape
    raises = []
    for t in range(n_steps):
        ts = served.timestamps[t]
        result = engine.process(
            served.stream_ids, np.full(n_streams, ts), served.values[t], now=float(ts)
        )
        raises += [(e.index, t) for e in result.events if e.event == "raised"]
    return raises


def judge(served: ServedFleet, raises: list[tuple[int, int]]) -> tuple[list[Outcome], np.ndarray]:
    """Each planted anomaly's outcome, and [S] false alerts per stream."""
    n_steps, n_streams, _ = served.values.shape
    raised = np.zeros((n_streams, n_steps), np.bool_)
    for s, t in raises:
        raised[s, t] = True
    excused = np.zeros_like(raised)  # inside an anomaly or its grace
    outcomes = []
    for a in served.planted:
        excused[a.stream, a.start : a.end + GRACE_STEPS] = True
        last = a.end - 1
        verdict, row = first_raise(np.flatnonzero(raised[a.stream]), a.start, last,
                                   last + GRACE_STEPS)  # fmt: skip
        delay = row - a.start if verdict == "caught" and row is not None else None
        outcomes.append(
            Outcome(
                a.kind, served.stream_ids[a.stream], served.features[a.feature], a.start,
                a.end, verdict, delay, bool(served.noise_scale[a.stream] > 1.0),
            )
        )  # fmt: skip
    return outcomes, (raised & ~excused).sum(axis=1)


def run_fleet(seed: int, scoring: ScoringConfig, work: Path) -> FleetResult:
    """Train (or reuse from ``work``) the seed's model, serve the seed's fleet with
    ``scoring`` and judge every alert."""
    model_path, train_s = train_model(seed, work)
    began = time.perf_counter()
    served = served_fleet(seed)
    raises = replay(model_path, scoring, served)
    outcomes, false_per_stream = judge(served, raises)
    score_s = time.perf_counter() - began
    n_steps, n_streams, _ = served.values.shape
    normal = np.full(n_streams, n_steps)  # from each stream's first step: its cold start counts
    for a in served.planted:
        normal[a.stream] -= a.end + GRACE_STEPS - a.start
    noisier = served.noise_scale > 1.0
    return FleetResult(
        seed=seed,
        outcomes=outcomes,
        false_alerts=int(false_per_stream.sum()),
        normal_samples=int(normal.sum()),
        false_alerts_noisier=int(false_per_stream[noisier].sum()),
        normal_samples_noisier=int(normal[noisier].sum()),
        served_streams=n_streams,
        served_steps=n_steps,
        train_s=train_s,
        score_s=score_s,
    )


# --- tables ---


def _class_figures(result: FleetResult, kind: str) -> tuple[int, float, float, float, float]:
    """(anomalies, caught %, late %, missed %, median delay) of one class in one run."""
    mine = [o for o in result.outcomes if o.kind == kind]
    caught, late, missed = (100.0 * sum(o.verdict == v for o in mine) / len(mine)
                            for v in ("caught", "late", "missed"))  # fmt: skip
    delays = [o.delay_steps for o in mine if o.delay_steps is not None]
    median = float(np.median(delays)) if delays else math.nan
    return len(mine), caught, late, missed, median


def _cell(values: Sequence[float], spec: str) -> str:
    """One figure, or mean ± sd over seeds (NaN left out: a seed that caught none has no
    delay)."""
    have = [v for v in values if not math.isnan(v)]
    if not have:
        return "-"
    if len(values) == 1:
        return format(have[0], spec)
    sd = float(np.std(have, ddof=1)) if len(have) > 1 else math.nan
    return f"{np.mean(have):{spec}} ± {'-' if math.isnan(sd) else format(sd, spec)}"


def fleet_table(results: Sequence[FleetResult]) -> list[str]:
    """Markdown lines: per class caught / late / missed and the median delay, then false
    alerts per 100k normal samples; one run's figures, or mean ± sd over several."""
    several = len(results) > 1
    out = [
        "| class | length (steps) | anomalies | caught % | late % | missed % |"
        " median delay (steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    caught_by_kind = {}
    for kind in ANOMALY_KINDS:
        figures = np.array([_class_figures(r, kind) for r in results])  # (seeds, 5)
        caught_by_kind[kind] = float(figures[:, 1].mean())
        low, high = DURATIONS[kind]
        count = f"{int(figures[:, 0].sum())}" + (f" ({len(results)} seeds)" if several else "")
        out.append(
            f"| {kind} | {low}-{high} | {count} | {_cell(figures[:, 1], '.1f')} |"
            f" {_cell(figures[:, 2], '.1f')} | {_cell(figures[:, 3], '.1f')} |"
            f" {_cell(figures[:, 4], '.0f')} |"
        )
    alerts = [r.false_alerts for r in results]
    samples = [r.normal_samples for r in results]
    out += [
        "",
        "| false alerts / 100k normal samples | all served pumps | nominal noise |"
        f" {NOISE_SCALE[0]}-{NOISE_SCALE[1]} x noise | false alerts / normal samples |",
        "|---|---|---|---|---|",
        f"| {'mean ± sd' if several else 'this run'} |"
        f" {_cell([r.false_per_100k() for r in results], '.2f')} |"
        f" {_cell([r.false_per_100k(False) for r in results], '.2f')} |"
        f" {_cell([r.false_per_100k(True) for r in results], '.2f')} |"
        f" {sum(alerts)} / {sum(samples):,} |",
        "",
    ]
    short = [f"{k} {v:.1f} %" for k, v in caught_by_kind.items() if v < TARGET_CAUGHT_PCT]
    false_rate = 1e5 * sum(alerts) / sum(samples) if sum(samples) else math.nan
    out.append(
        f"targets: caught >= {TARGET_CAUGHT_PCT:.0f} % in every class:"
        f" {'yes' if not short else 'no (' + ', '.join(short) + ')'};"
        f" false alerts <= {TARGET_FALSE_PER_100K:g} / 100k normal samples:"
        f" {'yes' if false_rate <= TARGET_FALSE_PER_100K else 'no'} ({false_rate:.2f})"
    )
    return out


# --- the command ---


def load_scoring(path: str | None) -> ScoringConfig:
    """ScoringConfig() defaults, or built from the ``[scoring]`` table of a TOML file."""
    if path is None:
        return ScoringConfig()
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh).get("scoring", {})
        if not isinstance(table, dict):
            raise TypeError("[scoring] must be a table")
        return ScoringConfig(**table)
    except (OSError, tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
        raise SystemExit(f"fleet: {path}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 (%(default)s)"
    )
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="scoring settings from the file's [scoring] table (default: ScoringConfig())",
    )
    parser.add_argument(
        "--work",
        metavar="DIR",
        help="keep the trained models here and reuse them in later runs"
        " (default: a temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="seeds at once, one process each (%(default)s)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    scoring = load_scoring(args.config)
    seeds = list(range(args.seeds))
    print(
        f"fleet bench: train on pumps 0-{TRAIN_PUMPS - 1} x {TRAIN_STEPS} steps (gru"
        f" {HIDDEN_SIZE}, the default schedule); serve pumps {SERVED_FIRST_PUMP}-"
        f"{SERVED_FIRST_PUMP + ANOMALY_STREAMS + NORMAL_STREAMS - 1} x {SERVED_STEPS} steps"
        f" ({ANOMALY_STREAMS} with one anomaly of each class, {NORMAL_STREAMS} normal; one"
        f" in {NOISIER_EVERY} with {NOISE_SCALE[0]}-{NOISE_SCALE[1]} x noise; warm-up"
        f" {WARMUP_STEPS}, grace {GRACE_STEPS} steps); scoring: {args.config or 'defaults'};"
        f" seeds {seeds[0]}..{seeds[-1]}, {min(args.jobs, len(seeds))} at a time;"
        f" {os.cpu_count()} CPU(s), Python {platform.python_version()}\n"
    )
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.work:
            work = Path(args.work)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rnnsentry-fleet-")))
        if args.jobs > 1 and len(seeds) > 1:
            spawn = mp.get_context("spawn")  # no fork of a process holding torch threads
            with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=spawn) as pool:
                results = list(pool.map(run_fleet, seeds, repeat(scoring), repeat(work)))
        else:
            results = [run_fleet(seed, scoring, work) for seed in seeds]
    wall_s = time.perf_counter() - began
    lines = []
    for r in results:
        lines += [f"## Seed {r.seed}", "", *fleet_table([r]), ""]
    if len(results) > 1:
        lines += [f"## Mean ± sd over {len(results)} seeds", "", *fleet_table(results), ""]
    lines += [
        "| seed | train s | score s (fleet + replay + judging) |",
        "|---|---|---|",
        *(f"| {r.seed} | {r.train_s:.1f} | {r.score_s:.1f} |" for r in results),
        "",
        f"**wall time {wall_s:.0f} s**",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
