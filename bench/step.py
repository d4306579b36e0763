"""Where a batch's time goes: onnxruntime alone, then the daemon's whole worker path.

1. onnxruntime steps per second against batch size (1 ... 4096) for gru and lstm of hidden
   size 64 and 8 features, through ``LoadedModel.step`` (one intra-op thread, as the
   daemon runs; gru also with two).
2. The daemon's worker on single-sample messages as the queue holds them, no broker:
   ``process`` per micro-batch of batch.max (512) over 10,000 streams. Timed without a
   profiler (onnxruntime's share from a timer around ``InferenceSession.run``); then each of
   its parts (``PARTS``) with a timer around every call, best of three drains; then under
   cProfile, split by the module the time is spent in.
3. The same worker on batch payloads (100 samples a message, 2,000 streams): samples/s.
4. The reading process's cost of handing messages over to scoring processes
   (``WorkerPool.dispatch``) per message, for 1, 2 and 4 processes that only read.
5. ``Scorer.step_batch`` alone per stream for models of 4 to 32 sensors, the relations
   check on and off, and the scorer's columns a stream (the relations' grow as the square).
6. The CUDA execution provider against CPU at batch 4,096 and 65,536, where onnxruntime
   lists it.

    .venv/bin/python bench/step.py [--streams 10000] [--messages 200000] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import math
import pstats
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from common import (
    Load,
    add_common_arguments,
    bench_model,
    inbound_messages,
    load_note_at_end,
    machine_line,
    table,
    wait_quiet,
)

from detector.config import build_config
from detector.daemon import Daemon
from detector.model import LoadedModel
from detector.scoring import Scorer, ScoringConfig, scorer_columns
from detector.scoring.calibration import Calibration, RelationsPrior

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def time_steps(model: LoadedModel, batch: int, seconds: float) -> float:
    """Seconds per call of ``model.step`` at this batch size (best of a few rounds)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, model.meta.n_features)).astype(np.float32)
    states = [s + 0.1 for s in model.zero_states(batch)]
    model.step(x, states)
    best = math.inf
    deadline = time.perf_counter() + seconds
    while True:
        calls = 0
        t0 = time.perf_counter()
        while calls < 5 or time.perf_counter() - t0 < seconds / 5:
            model.step(x, states)
            calls += 1
        best = min(best, (time.perf_counter() - t0) / calls)
        if time.perf_counter() > deadline:
            return best


def onnx_table(paths: dict[str, Path], seconds: float) -> None:
    variants = [("gru", 1), ("lstm", 1), ("gru", 2)]
    models = {(c, t): LoadedModel.load(paths[c], intra_op_threads=t) for c, t in variants}
    rows = []
    for b in BATCHES:
        row: list[object] = [f"{b:,}"]
        for key in variants:
            per_call = time_steps(models[key], b, seconds)
            row += [f"{per_call * 1e6:,.1f}", f"{per_call / b * 1e6:.3f}", f"{b / per_call:,.0f}"]
        rows.append(row)
    heads = ["batch"]
    for cell, threads in variants:
        tag = f"{cell}{'' if threads == 1 else f' {threads} thr'}"
        heads += [f"{tag} µs/call", f"{tag} µs/step", f"**{tag} steps/s**"]
    print(table(heads, rows))


class TimedSession:
    """An InferenceSession whose ``run`` adds its wall time to ``seconds``."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.seconds = 0.0
        self.calls = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self.session.run(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def make_daemon(model: Path, streams: int, batch_max: int = 512) -> Daemon:
    config, problems = build_config(
        {
            "models": [{"path": str(model), "topics": ["sensors/{stream}"]}],
            "metrics": {"enabled": False},
            "daemon": {"workers": 0},  # scored in this process, by process()
            "streams": {"max_streams": max(100_000, streams)},
            "batch": {"queue_size": 1_000_000, "max": batch_max},
            # a short warm-up, so that the injected anomalies may raise alerts
            "scoring": {"warmup_steps": 5},
        }
    )
    assert not problems, problems
    daemon = Daemon(config)
    daemon._install(daemon._load_models())
    daemon.publisher.link = FakeLink()  # type: ignore[assignment]
    return daemon


class FakeLink:
    """Stands in for MqttLink: alerts are encoded and handed over, never sent."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        return True


def batches_of(messages: list[Any], size: int) -> list[list[Any]]:
    return [messages[i : i + size] for i in range(0, len(messages), size)]


def drain(daemon: Daemon, batches: list[list[Any]]) -> float:
    """``process`` every batch, as the worker would, in order; the wall time."""
    t0 = time.perf_counter()
    for batch in batches:
        daemon.process(batch)
    return time.perf_counter() - t0


def module_of(filename: str) -> str:
    if "prometheus_client" in filename:
        return "metrics"
    if "/onnxruntime/" in filename:
        return "onnxruntime"
    if "/detector/scoring/" in filename:  # the scorer's parts count as one module
        return "detector/scoring"
    if "/detector/" in filename:
        return "detector/" + filename.rsplit("/", 1)[1]
    return filename.rsplit("/", 1)[-1]


def split_profile(stats: pstats.Stats) -> tuple[float, dict[str, float]]:
    """Seconds entered into each module from outside it (so including what it calls in
    other modules); "publish" is the publisher's."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = 0.0
    entry: dict[str, float] = {}
    for (filename, _, _), (_, _, tt, _, callers) in raw.items():
        total += tt
        mod = module_of(filename)
        for (cfile, _, _), caller_stat in callers.items():
            if module_of(cfile) != mod:
                key = "publish" if mod == "detector/publisher.py" else mod
                entry[key] = entry.get(key, 0.0) + caller_stat[3]
    return total, entry


# The worker's parts, each timed by a perf_counter wrapper (no profiler): where, what, and
# the row's label. Parsing is called once a message; the rest once a micro-batch or round.
PARTS = (
    ("detector.stage", "parse_into", "parsing (`parse_into`)"),
    ("detector.engine:Engine", "process", "the engine (`Engine.process`), all of it"),
    ("detector.scoring.scorer:Scorer", "step_batch", "of which the scorer (`Scorer.step_batch`)"),
    ("detector.model:LoadedModel", "step", "of which the network's step (with onnxruntime)"),
    ("detector.scoring.scorer:Scorer", "model_feed", "of which the outlier hold-back"),
    ("detector.state:StateTable", "rows_for", "of which the state table: the streams' rows"),
    ("detector.state:StateTable", "gather", "of which the state table: gather"),
    ("detector.state:StateTable", "scatter", "of which the state table: scatter"),
)


@contextmanager
def part_timers() -> Iterator[dict[str, float]]:
    """Wrap each of PARTS in a timer for the duration; yields label -> seconds."""
    spent = dict.fromkeys((label for _, _, label in PARTS), 0.0)
    undo = []
    for where, name, label in PARTS:
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        if cls:
            owner = getattr(owner, cls)
        inner = getattr(owner, name)

        def timed(*args: Any, _f: Any = inner, _k: str = label, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_k] += time.perf_counter() - t0

        setattr(owner, name, functools.wraps(inner)(timed))
        undo.append((owner, name, inner))
    try:
        yield spent
    finally:
        for owner, name, inner in undo:
            setattr(owner, name, inner)


def worker_parts(model: Path, streams: int, batches: list[list[Any]]) -> None:
    """µs a message in each part of the worker, best of three drains by fresh daemons (the
    wrappers add about 0.1 µs to each call; parsing is called once a message)."""
    messages = sum(len(b) for b in batches)
    best: dict[str, float] = {}
    for _ in range(3):
        daemon = make_daemon(model, streams)
        with part_timers() as spent:
            total = drain(daemon, batches)
        for label, seconds in {"the worker's `process`, all of it": total, **spent}.items():
            best[label] = min(best.get(label, math.inf), seconds / messages * 1e6)
    rows = [(label, f"{us:.2f}") for label, us in best.items()]
    print(table(["the worker's parts, timed around each call (no profiler)", "µs a message"],
                rows))  # fmt: skip
    print()


def worker_profile(model: Path, streams: int, messages: int) -> None:
    rounds = max(8, messages // streams)
    load = Load(
        streams=streams, rounds=rounds, inject=tuple((k, rounds - 1) for k in range(0, streams, 97))
    )
    inbound = inbound_messages(load)

    daemon = make_daemon(model, streams)
    engine = daemon.engines[0]
    timed = TimedSession(engine.model.session)
    engine.model.session = timed  # type: ignore[assignment]
    batches = batches_of(inbound, daemon.config.batch.max)
    seconds = drain(daemon, batches)
    scored = (
        daemon.metrics.registry.get_sample_value("rnnsentry_messages_total", {"outcome": "scored"})
        or 0
    )
    alerts = (
        daemon.metrics.registry.get_sample_value("rnnsentry_alerts_total", {"event": "raised"}) or 0
    )
    per_msg = seconds / len(inbound)
    ort_share = timed.seconds / seconds
    print(
        table(
            ["measure (no profiler)", "value"],
            [
                (
                    "messages, streams, micro-batches",
                    f"{len(inbound):,}, {streams:,}, {len(batches):,}",
                ),
                ("scored, alerts raised", f"{int(scored):,}, {int(alerts):,}"),
                (
                    "worker throughput (`process`)",
                    f"**{len(inbound) / seconds:,.0f} messages/s**",
                ),
                ("worker time per message", f"{per_msg * 1e6:.2f} µs"),
                (
                    "onnxruntime per message (session.run)",
                    f"{timed.seconds / len(inbound) * 1e6:.2f} µs",
                ),
                ("**share of a batch's time outside onnxruntime**", f"**{1 - ort_share:.1%}**"),
            ],
        )
    )
    print()
    worker_parts(model, streams, batches)

    daemon = make_daemon(model, streams)
    profiler = cProfile.Profile()
    profiler.enable()
    drain(daemon, batches)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total, entry = split_profile(stats)
    names = {
        "detector/daemon.py": "daemon and stage: process / _step (excluding the rows below)",
        "detector/routing.py": "route topic -> stream",
        "detector/payload.py": "parse (json + validation)",
        "detector/engine.py": "engine (rounds, masks, results; excluding the rows below)",
        "detector/state.py": "state table (rows, gather, scatter)",
        "detector/scoring": "scoring (surprise, likelihoods, step and stuck checks, alerts)",
        "detector/model.py": "model.step (feeds; includes onnxruntime)",
        "onnxruntime": "onnxruntime session.run",
        "metrics": "metrics (prometheus_client)",
        "detector/metrics.py": "metrics (rnnsentry's own)",
        "publish": "publishing alerts (the publisher: JSON + hand-over)",
    }
    rows = []
    ours = {k: v for k, v in entry.items() if k in names}
    # Entered-from-outside times nest (engine includes state, scoring, model, onnxruntime):
    # report each level's exclusive part.
    nested = {
        "detector/engine.py": ["detector/state.py", "detector/scoring", "detector/model.py"],
        "detector/model.py": ["onnxruntime"],
    }
    exclusive = dict(ours)
    for outer, inner in nested.items():
        if outer in exclusive:
            exclusive[outer] -= sum(ours.get(i, 0.0) for i in inner)
    daemon_total = ours.get("detector/daemon.py", total)
    exclusive["detector/daemon.py"] = daemon_total - sum(
        v
        for k, v in ours.items()
        if k
        in (
            "detector/routing.py",
            "detector/payload.py",
            "detector/engine.py",
            "metrics",
            "detector/metrics.py",
            "publish",
        )
    )
    for key, label in names.items():
        if key in exclusive and exclusive[key] > 0:
            rows.append((label, f"{exclusive[key] / daemon_total:.1%}"))
    print(table(["worker time under cProfile, by where it is spent", "share"], rows))
    print("\ntop functions by own time under cProfile (profiling inflates Python calls):\n")
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:14]  # type: ignore[attr-defined]
    print(
        table(
            ["function", "calls", "own s", "share"],
            [
                (
                    f"`{Path(f).name}:{line} {name}`" if f != "~" else f"`{name}`",
                    f"{nc:,}",
                    f"{tt:.3f}",
                    f"{tt / daemon_total:.1%}",
                )
                for (f, line, name), (_, nc, tt, _, _) in top
            ],
        )
    )


def batch_payloads(model: Path, streams: int = 2000, per_message: int = 100) -> None:
    """The worker's path on batch payloads (``per_message`` samples a message, values as
    lists), as the queue holds them, no broker: samples/s and µs a sample. A micro-batch of
    512 messages is 512 streams stepped ``per_message`` rounds."""
    load = Load(streams=streams, rounds=3 * per_message, per_message=per_message, named=False)
    inbound = inbound_messages(load)
    daemon = make_daemon(model, streams)
    batches = batches_of(inbound, daemon.config.batch.max)
    warm = len(batches) // 3  # the streams' first samples: their rows are made there
    drain(daemon, batches[:warm])
    seconds = drain(daemon, batches[warm:])
    messages = sum(len(b) for b in batches[warm:])
    samples = messages * per_message
    print(
        table(
            ["measure (no profiler)", "value"],
            [
                ("messages, samples, streams", f"{messages:,}, {samples:,}, {streams:,}"),
                ("worker throughput (`process`)", f"**{samples / seconds:,.0f} samples/s**"),
                ("worker time per sample", f"{seconds / samples * 1e6:.2f} µs"),
            ],
        )
    )


def _discard(conn: Any) -> None:
    """A stand-in scoring process: takes what is handed over and drops it."""
    try:
        while True:
            conn.recv_bytes()
    except EOFError:
        return


def handover_cost(model: Path, streams: int, messages: int) -> None:
    """The reading process's cost of handing messages to scoring processes
    (``WorkerPool.dispatch``: route, partition, pickle, write a pipe), per message, with
    processes that only read."""
    import multiprocessing as mp

    from detector.pool import WorkerPool

    load = Load(streams=streams, rounds=max(4, messages // streams))
    inbound = inbound_messages(load)
    config, problems = build_config({
        "models": [{"path": str(model), "topics": ["sensors/{stream}"]}],
        "metrics": {"enabled": False},
    })  # fmt: skip
    assert not problems, problems
    ctx = mp.get_context("spawn")
    rows = []
    for workers in (1, 2, 4):
        daemon = Daemon(config)
        pool = WorkerPool(config, daemon.metrics, workers)
        pool.set_router(daemon._load_models()[1])
        readers = []
        for _ in range(workers):
            ours, theirs = ctx.Pipe(duplex=False)
            reader = ctx.Process(target=_discard, args=(ours,), daemon=True)
            reader.start()
            ours.close()
            readers.append(reader)
            pool._inboxes.append(theirs)
        batches = batches_of(inbound, 64)  # what a 2 ms wait gathers at ~30,000 messages/s
        t0 = time.perf_counter()
        for batch in batches:
            pool.dispatch(batch)
        seconds = time.perf_counter() - t0
        for conn in pool._inboxes:
            conn.close()
        for reader in readers:
            reader.join(10)
        rows.append((f"{workers}", f"{len(inbound):,}", f"**{seconds / len(inbound) * 1e6:.2f}**"))
    print(table(["scoring processes", "messages (batches of 64)", "**hand-over µs / message**"],
                rows))  # fmt: skip


def scorer_width(batch: int = 512, widths: tuple[int, ...] = (4, 8, 16, 32)) -> None:
    """``Scorer.step_batch`` alone per stream against the model's number of sensors, the
    relations check on and off, and the scorer's columns a stream: the relations' precision
    is (2F)^2 / 2 floats a stream and its work a step as many products. Random related
    streams (a common load and noise of their own) and a calibration whose prior relates
    every pair alike; the median of 50 calls after 10."""
    rows = []
    for f in widths:
        rng = np.random.default_rng(f)
        cov = 0.5 * np.ones((2 * f, 2 * f)) + 0.5 * np.eye(2 * f)
        prior = RelationsPrior(cov.tolist(), 50, [0.1] * f, 4000)
        cal = Calibration(1000, 2.0, 1.0, {}, 20, 2.0, 0.5, 0.9999, "student_t", relations=prior)
        load = rng.normal(size=(61, batch, 1)).cumsum(axis=0) * 0.1
        x = load + 0.3 * rng.normal(size=(61, batch, f))
        log_var, has_pred = np.zeros((batch, f), np.float32), np.ones(batch, np.bool_)
        per_stream = []
        for relations in (True, False):
            scorer = Scorer(ScoringConfig(relations_check=relations, warmup_steps=5), cal)
            cols = scorer_columns(batch, f)
            times = []
            for t in range(1, 61):
                began = time.perf_counter()
                scorer.step_batch(cols, x[t], x[t - 1].astype(np.float32), log_var, has_pred)
                times.append(time.perf_counter() - began)
            per_stream.append(float(np.median(times[10:])) / batch * 1e6)
        sizes = {k: a.nbytes // batch for k, a in scorer_columns(batch, f).items()}
        own = sum(v for k, v in sizes.items() if k.startswith("rel_"))
        rows.append((f"{f}", f"{per_stream[0]:.2f}", f"{per_stream[1]:.2f}",
                     f"{sum(sizes.values()):,}", f"{own:,}"))  # fmt: skip
    heads = ["sensors", "µs a stream", "without relations", "columns, bytes a stream",
             "of which relations"]  # fmt: skip
    print(table(heads, rows))


def cuda_part(paths: dict[str, Path], seconds: float) -> None:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        print(
            f"CUDA: not run. No GPU here: onnxruntime lists {', '.join(available)}; the CUDA"
            " rows (batch 4,096 and 65,536, CPU against CUDA) run only where it lists"
            " CUDAExecutionProvider (onnxruntime-gpu on a GPU machine)."
        )
        return
    rows = []
    for cell in ("gru", "lstm"):
        cpu = LoadedModel.load(paths[cell], providers=["cpu"])
        gpu = LoadedModel.load(paths[cell], providers=["cuda"])
        for b in (4096, 65536):
            c, g = time_steps(cpu, b, seconds), time_steps(gpu, b, seconds)
            rows.append(
                (
                    cell,
                    f"{b:,}",
                    f"{b / c:,.0f}",
                    f"{b / g:,.0f}",
                    f"{c / g:.1f}x",
                    ", ".join(gpu.providers),
                )
            )
    print(table(["cell", "batch", "CPU steps/s", "CUDA steps/s", "CUDA / CPU", "providers"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000, help="(%(default)s)")
    parser.add_argument("--messages", type=int, default=200_000, help="(%(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=0.3, help="timing per batch size and model (%(default)s)"
    )
    parser.add_argument("--skip-onnx", action="store_true", help="only the worker profile")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    note = wait_quiet(args.wait_quiet_s) if args.wait_quiet_s > 0 else ""
    paths = {cell: bench_model(cell, 64, 8) for cell in ("gru", "lstm")}
    began = time.monotonic()
    print(f"step: {machine_line(note)}\n")
    if not args.skip_onnx:
        print("onnxruntime alone, `LoadedModel.step`, hidden 64, 8 features, 1 layer:\n")
        onnx_table(paths, args.seconds)
        print()
    print("the daemon's worker on queued single-sample messages (gru, batch.max 512):\n")
    worker_profile(paths["gru"], args.streams, args.messages)
    print()
    print("the daemon's worker on batch payloads (gru, 100 samples a message, values as lists):\n")
    batch_payloads(paths["gru"])
    print()
    print("the hand-over to scoring processes (`WorkerPool.dispatch`), processes that only read:\n")
    handover_cost(paths["gru"], args.streams, args.messages)
    print()
    print("the scorer alone against the model's sensors (`Scorer.step_batch`, 512 streams):\n")
    scorer_width()
    print()
    cuda_part(paths, args.seconds)
    print(f"\nwall time {time.monotonic() - began:.0f} s; " + load_note_at_end())
    return 0


if __name__ == "__main__":
    sys.exit(main())
