"""A synthetic fleet of pumps with labelled anomalies, as arrays or CSV files (numpy only).

Every normal value is a function of (seed, pump, feature, absolute step): the same
pump at the same step reads the same whatever ``n_steps`` or ``start_step``, so a
fleet generated later continues the earlier one. Anomalies are injected on top by
:func:`inject`, from their own random stream, and labelled ``[start, end)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from detector.errors import DataError

log = logging.getLogger(__name__)

ANOMALY_KINDS = (
    "spike",
    "dip",
    "level_shift",
    "drift",
    "stuck",
    "noise_burst",
    "correlation_break",
)
DEFAULT_FEATURES = ("flow", "pressure", "temperature", "vibration")
EPOCH0 = datetime(2024, 1, 1, tzinfo=UTC)  # absolute step 0
BLOCK = 1024  # noise is drawn per block of absolute steps, keyed by the block index
_BLOCK_OFFSET = 2**40  # SeedSequence wants non-negative words; blocks may be negative
_PARAMS, _NOISE, _ANOMALIES = 1, 2, 3  # tags separating the random streams
LOAD_AR = 0.97  # slow load wander: AR(1) coefficient (truncated to LOAD_TAPS)
LOAD_TAPS = 256
TEMP_LAG_STEPS = 20.0  # temperature follows load through this exponential lag
TEMP_TAPS = 200

# (min, max) size in units of the sensor's step-to-step noise (noise_sd). A well-fitted
# model's predictive sigma is ~1.2-1.5 noise_sd (it cannot foresee the load's wander),
# so a spike of 8 noise_sd is still ~6 sigma to the detector.
SIZES = {
    "spike": (8.0, 12.0), "dip": (8.0, 12.0), "level_shift": (7.0, 10.0),
    "drift": (8.0, 12.0), "noise_burst": (4.0, 6.0),
}  # fmt: skip
DRIFT_RAMP_STEPS = 30

# (min, max) duration in steps per kind.
DURATIONS = {
    "spike": (1, 3),
    "dip": (1, 3),
    "level_shift": (30, 80),
    "drift": (40, 80),
    "stuck": (40, 80),
    "noise_burst": (15, 40),
    "correlation_break": (40, 80),
}


@dataclass(frozen=True)
class Anomaly:
    stream: int
    kind: str
    start: int  # step index within the fleet, inclusive
    end: int  # exclusive
    features: tuple[int, ...]


@dataclass(frozen=True)
class Fleet:
    values: np.ndarray  # [S, T, F] float64
    features: list[str]
    interval_s: float
    start_step: int  # absolute step of values[:, 0]
    labels: np.ndarray  # [S, T] bool: inside an anomaly
    anomalies: list[Anomaly]

    def timestamps(self) -> np.ndarray:
        """Epoch seconds of each step (shared by all streams)."""
        steps = self.start_step + np.arange(self.values.shape[1], dtype=np.float64)
        return EPOCH0.timestamp() + steps * self.interval_s

    @staticmethod
    def stream_name(index: int) -> str:
        return f"pump-{index:03d}"


def _white(seed: int, pump: int, channel: int, first: int, stop: int) -> np.ndarray:
    """Standard normals for absolute steps [first, stop), identical whoever asks."""
    blocks = range(first // BLOCK, (stop - 1) // BLOCK + 1)
    draws = [
        np.random.Generator(
            np.random.PCG64(
                np.random.SeedSequence([seed, _NOISE, pump, channel, b + _BLOCK_OFFSET])
            )
        ).standard_normal(BLOCK)
        for b in blocks
    ]
    offset = first - blocks[0] * BLOCK
    return np.concatenate(draws)[offset : offset + stop - first]


def _pump_load(seed: int, pump: int, first: int, stop: int, period: int) -> np.ndarray:
    """Load in ~[0.3, 0.9] for absolute steps [first, stop): daily cycle plus slow wander."""
    p = np.random.default_rng([seed, _PARAMS, pump])
    phase, base, amp = p.uniform(-0.3, 0.3), p.uniform(0.55, 0.65), p.uniform(0.2, 0.28)
    taps = LOAD_AR ** np.arange(LOAD_TAPS) * math.sqrt(1 - LOAD_AR**2)  # unit variance
    noise = _white(seed, pump, 0, first - LOAD_TAPS + 1, stop)
    wander = np.convolve(noise, taps, mode="valid")  # (stop - first,)
    angle = 2 * math.pi * np.arange(first, stop) / period + phase
    return base + amp * (np.sin(angle) + 0.3 * np.sin(2 * angle + 1.0)) + 0.03 * wander


def _pump_values(
    seed: int, pump: int, first: int, stop: int, n_features: int, period: int
) -> np.ndarray:
    """[stop - first, F]: feature j plays role j % 4 (flow, pressure, temperature, vibration)."""
    load_ext = _pump_load(seed, pump, first - TEMP_TAPS + 1, stop, period)
    load = load_ext[TEMP_TAPS - 1 :]
    lag_taps = (1 - 1 / TEMP_LAG_STEPS) ** np.arange(TEMP_TAPS)
    lagged = np.convolve(load_ext, lag_taps / lag_taps.sum(), mode="valid")
    out = np.empty((stop - first, n_features))
    for j in range(n_features):
        c = np.random.default_rng([seed, _PARAMS, pump, j + 1])
        eps = _white(seed, pump, j + 1, first, stop)
        role = j % 4
        if role == 0:  # flow, m3/h: proportional to load
            out[:, j] = c.uniform(90, 110) * load + 1.0 * eps
        elif role == 1:  # pressure, bar: follows flow along a pump curve
            out[:, j] = c.uniform(1.8, 2.2) + c.uniform(2.5, 3.5) * load**2 + 0.03 * eps
        elif role == 2:  # temperature, degC: lags the load
            out[:, j] = c.uniform(35, 45) + c.uniform(20, 30) * lagged + 0.1 * eps
        else:  # vibration, mm/s: its noise grows with flow
            out[:, j] = c.uniform(0.8, 1.2) + 0.5 * load + (0.05 + 0.3 * load) * eps
    return out


def noise_sd(column: np.ndarray) -> float:
    """Step-to-step noise of a series: MAD of first differences * 1.4826 / sqrt(2).

    >>> round(noise_sd(np.array([0.0, 1.0, 0.0, 1.0, 0.0])), 3)
    1.048
    """
    diffs = np.diff(np.asarray(column, np.float64))
    if len(diffs) == 0:
        return 1.0
    sd = 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2)
    return sd if sd > 0 else (float(np.std(diffs)) or 1.0)


def inject(
    values: np.ndarray,
    kind: str,
    start: int,
    end: int,
    features: Sequence[int],
    rng: np.random.Generator,
) -> np.ndarray:
    """A copy of ``values`` [T, F] with one anomaly of ``kind`` on ``features`` in [start, end).

    Sizes are in units of each feature's step-to-step noise (:func:`noise_sd`).
    """
    if kind not in ANOMALY_KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}")
    if not 0 <= start < end <= len(values):
        raise ValueError(f"anomaly span [{start}, {end}) is outside 0..{len(values)}")
    out = np.array(values, dtype=np.float64, copy=True)
    n = end - start
    for f in features:
        sd = noise_sd(values[:, f])
        seg = out[start:end, f]  # a view: edits land in out
        sign = rng.choice([-1.0, 1.0])
        if kind == "spike":
            seg += rng.uniform(*SIZES["spike"]) * sd
        elif kind == "dip":
            seg -= rng.uniform(*SIZES["dip"]) * sd
        elif kind == "level_shift":
            seg += sign * rng.uniform(*SIZES["level_shift"]) * sd
        elif kind == "drift":
            ramp = np.minimum(1.0, np.arange(1, n + 1) / min(DRIFT_RAMP_STEPS, n))
            seg += sign * rng.uniform(*SIZES["drift"]) * sd * ramp
        elif kind == "stuck":
            seg[:] = values[max(start - 1, 0), f]
        elif kind == "noise_burst":
            seg += rng.normal(0.0, rng.uniform(*SIZES["noise_burst"]) * sd, n)
        else:  # correlation_break: the sensor moves against its own trend (mirrored)
            seg[:] = 2.0 * values[start, f] - values[start:end, f]
    return out


def _feature_pool(kind: str, n_features: int) -> list[int]:
    """Features an anomaly of ``kind`` may hit: a correlation break needs a sensor that
    follows another (not flow); a stuck sensor must be one that visibly moves (not the
    noisy vibration)."""
    banned = {"correlation_break": 0, "stuck": 3}.get(kind)
    pool = [j for j in range(n_features) if j % 4 != banned]
    return pool or list(range(n_features))


def _plan(
    n_streams: int,
    n_steps: int,
    count: int,
    kinds: Sequence[str],
    n_features: int,
    min_start: int,
    min_gap: int,
    rng: np.random.Generator,
) -> list[Anomaly]:
    """Spread ``count`` anomalies over the streams, kinds in turn, one per slot of time."""
    per_stream = [count // n_streams] * n_streams
    for s in rng.permutation(n_streams)[: count % n_streams]:
        per_stream[s] += 1
    kind_cycle = [kinds[i % len(kinds)] for i in range(count)]
    rng.shuffle(kind_cycle)
    plan, k = [], 0
    for s, m in enumerate(per_stream):
        if m == 0:
            continue
        width = (n_steps - min_start) // m
        if width - min_gap < 1:
            raise ValueError(
                f"{n_steps} steps are too few for {m} anomalies per stream"
                f" after step {min_start} with gaps of {min_gap}"
            )
        for i in range(m):
            kind = kind_cycle[k]
            k += 1
            low, high = DURATIONS[kind]
            length = min(int(rng.integers(low, high + 1)), width - min_gap)
            start = min_start + i * width + int(rng.integers(0, width - min_gap - length + 1))
            pool = _feature_pool(kind, n_features)
            feature = int(rng.choice(pool))
            plan.append(Anomaly(s, kind, start, start + length, (feature,)))
    return plan


def generate_fleet(
    n_streams: int = 20,
    n_steps: int = 2000,
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    period_steps: int = 240,
    interval_s: float = 1.0,
    start_step: int = 0,
    seed: int = 0,
    anomalies: int = 0,
    kinds: Sequence[str] = ANOMALY_KINDS,
    min_start: int = 0,
    min_gap: int = 30,
) -> Fleet:
    """``n_streams`` pumps for ``n_steps`` steps from absolute step ``start_step``, with
    ``anomalies`` anomalies in the whole fleet (spread over the streams, kinds in turn)."""
    if n_streams < 1 or n_steps < 2 or period_steps < 2 or not features:
        raise ValueError("need n_streams >= 1, n_steps >= 2, period_steps >= 2 and features")
    if anomalies < 0 or seed < 0 or interval_s <= 0 or not 0 <= min_start < n_steps:
        raise ValueError(
            "need anomalies >= 0, seed >= 0, interval_s > 0 and 0 <= min_start < n_steps"
        )
    unknown = [k for k in kinds if k not in ANOMALY_KINDS]
    if unknown or (anomalies and not kinds):
        raise ValueError(f"unknown anomaly kinds {unknown} (choose from {ANOMALY_KINDS})")
    stop = start_step + n_steps
    values = np.stack(
        [
            _pump_values(seed, s, start_step, stop, len(features), period_steps)
            for s in range(n_streams)
        ]
    )
    labels = np.zeros((n_streams, n_steps), np.bool_)
    rng = np.random.default_rng([seed, _ANOMALIES, start_step])
    plan = _plan(n_streams, n_steps, anomalies, kinds, len(features), min_start, min_gap, rng)
    for a in plan:
        values[a.stream] = inject(values[a.stream], a.kind, a.start, a.end, a.features, rng)
        labels[a.stream, a.start : a.end] = True
    return Fleet(values, list(features), float(interval_s), int(start_step), labels, plan)


# --- CSV files and the `rnnsentry synth` command ---


def iso_times(seconds: np.ndarray) -> list[str]:
    """ISO 8601 UTC text, with milliseconds only when the times need them.

    >>> iso_times(np.array([1704067200.0, 1704067200.5]))
    ['2024-01-01T00:00:00.000Z', '2024-01-01T00:00:00.500Z']
    """
    whole = bool(np.all(seconds == np.round(seconds)))
    spec = "seconds" if whole else "milliseconds"
    return [
        (EPOCH0 + timedelta(seconds=float(s) - EPOCH0.timestamp()))
        .isoformat(timespec=spec)
        .replace("+00:00", "Z")
        for s in seconds
    ]


def write_csv(fleet: Fleet, path: str | Path, streams: Sequence[int] | None = None) -> None:
    """timestamp[, stream], features..., anomaly; streams one after another."""
    streams = list(range(len(fleet.values))) if streams is None else list(streams)
    many = len(streams) > 1
    stamps = iso_times(fleet.timestamps())
    header = ["timestamp", *(["stream"] if many else []), *fleet.features, "anomaly"]
    lines = [",".join(header)]
    for s in streams:
        prefix = f"{Fleet.stream_name(s)}," if many else ""
        for t, row in enumerate(fleet.values[s]):
            cells = ",".join(f"{v:.7g}" for v in row)
            lines.append(f"{stamps[t]},{prefix}{cells},{int(fleet.labels[s, t])}")
    try:
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror}") from None


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR|FILE.csv",
        help="a directory (one CSV per pump + anomalies.json) or one CSV file"
        " (with a 'stream' column when there are several pumps)",
    )
    parser.add_argument("--streams", type=int, default=20, help="pumps (default: 20)")
    parser.add_argument("--steps", type=int, default=2000, help="steps per pump (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--anomalies",
        type=int,
        default=0,
        help="anomalies in the whole fleet, kinds in turn (default: 0)",
    )
    parser.add_argument(
        "--kinds",
        default=",".join(ANOMALY_KINDS),
        help="comma-separated anomaly kinds (default: all)",
    )
    parser.add_argument(
        "--features",
        default=",".join(DEFAULT_FEATURES),
        help="comma-separated feature names; feature j behaves like"
        " flow/pressure/temperature/vibration by j %% 4",
    )
    parser.add_argument("--interval-s", type=float, default=1.0, help="seconds per step")
    parser.add_argument(
        "--start-step",
        type=int,
        default=0,
        help="absolute step of the first row (continue an earlier fleet)",
    )
    parser.add_argument("--period-steps", type=int, default=240, help="steps per daily cycle")
    parser.add_argument("--min-start", type=int, default=0, help="no anomaly before this step")
    parser.add_argument("--min-gap", type=int, default=30, help="steps between anomalies")


def run_synth(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.features.split(",") if n.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        fleet = generate_fleet(
            args.streams,
            args.steps,
            features=names,
            period_steps=args.period_steps,
            interval_s=args.interval_s,
            start_step=args.start_step,
            seed=args.seed,
            anomalies=args.anomalies,
            kinds=kinds,
            min_start=args.min_start,
            min_gap=args.min_gap,
        )
    except ValueError as exc:
        raise DataError(f"synth: {exc}") from None
    out = Path(args.out)
    if out.suffix.lower() == ".csv":
        out.parent.mkdir(parents=True, exist_ok=True)
        write_csv(fleet, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for s in range(len(fleet.values)):
            write_csv(fleet, out / f"{Fleet.stream_name(s)}.csv", [s])
        doc = [{**asdict(a), "stream": Fleet.stream_name(a.stream)} for a in fleet.anomalies]
        (out / "anomalies.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(
        f"wrote {args.streams} pump(s) x {args.steps} steps x {len(names)} features"
        f" with {len(fleet.anomalies)} anomalies to {out}"
    )
    return 0
