"""Resident memory against live streams: 0 -> 1,000,000 streams through ``Engine`` (its
``StateTable``) with the benchmark GRU (hidden size 64, 8 features), one sample per new
stream in batches as the daemon makes them. Reports the process's RSS, its growth per
stream, the table's own arrays per stream and the peak. Stream ids look like
``plant/123/pump-123456`` (20-odd characters). Then the whole daemon (``--workers``, its
default: scoring processes) fed the same streams as single-sample messages over an
in-memory link, the RSS of every one of its processes added up. Prints markdown tables;
not a test.

    .venv/bin/python bench/memory.py [--steps 0,10000,100000,250000,500000,1000000]
        [--workers -1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    add_common_arguments,
    bench_model,
    load_note_at_end,
    machine_line,
    rss_bytes,
    table,
    value_pool,
    wait_quiet,
)

from detector.config import StreamConfig
from detector.engine import Engine
from detector.model import LoadedModel

TARGET_BYTES = 2048
BATCH = 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps",
        default="0,10000,100000,250000,500000,1000000",
        help="live stream counts to measure at (%(default)s)",
    )
    parser.add_argument("--hidden", type=int, default=64, help="(%(default)s)")
    parser.add_argument(
        "--workers", type=int, default=-1,
        help="[daemon] workers of the whole-daemon run (0: skip it) (%(default)s)",
    )  # fmt: skip
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    steps = sorted({int(s) for s in args.steps.split(",")} | {0})
    note = wait_quiet(args.wait_quiet_s) if args.wait_quiet_s > 0 else ""
    path = bench_model("gru", args.hidden, 8)
    began = time.monotonic()
    print(f"memory: {machine_line(note)}\n")

    model = LoadedModel.load(path)
    pool = value_pool(8, pumps=16, steps=64).reshape(-1, 8)
    engine = Engine(model, streams=StreamConfig(max_streams=max(steps)))
    gc.collect()
    base = rss_bytes()
    rows = []
    made = 0
    ts = 1_750_000_000.0
    for target in steps:
        while made < target:
            n = min(BATCH, target - made)
            ids = [f"plant/{k // 1000}/pump-{k}" for k in range(made, made + n)]
            x = pool[np.arange(made, made + n) % len(pool)]
            engine.process(ids, np.full(n, ts), x, now=ts)
            made += n
        gc.collect()
        rss = rss_bytes()
        table_bytes = engine.table.nbytes()
        per = (rss - base) / target if target else float("nan")
        rows.append(
            (
                f"{target:,}",
                f"{len(engine.table):,}",
                f"{engine.table.capacity:,}",
                f"{rss / 2**20:,.0f}",
                f"{(rss - base) / 2**20:,.0f}",
                f"**{per:,.0f}**" if target else "-",
                f"{table_bytes / target:,.0f}" if target else "-",
            )
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        table(
            [
                "live streams",
                "in table",
                "table capacity (rows)",
                "RSS MiB",
                "growth MiB",
                "**bytes / stream (RSS)**",
                "table arrays bytes / stream",
            ],
            rows,
        )
    )
    last = steps[-1]
    per_last = (rss_bytes() - base) / last if last else float("nan")
    print(
        f"\npeak RSS {peak / 2**20:,.0f} MiB (the table doubles by copying: old and new"
        " arrays live together for a moment)"
    )
    print(
        f"target < {TARGET_BYTES} bytes per stream at hidden {args.hidden}:"
        f" {'met' if per_last < TARGET_BYTES else 'NOT met'} ({per_last:,.0f} at {last:,})"
    )
    if args.workers != 0:
        del engine
        gc.collect()
        daemon_memory(path, steps, args.workers)
    print(f"wall time {time.monotonic() - began:.0f} s; " + load_note_at_end())
    return 0


def process_rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def daemon_memory(model: Path, steps: list[int], workers: int) -> None:
    """The daemon's processes' RSS added up, against the streams they hold."""
    from detector.config import build_config
    from detector.daemon import Daemon
    from detector.link import MemoryLink

    config, problems = build_config({
        "daemon": {"workers": workers, "log_level": "WARNING"},
        "models": [{"path": str(model), "topics": ["plant/{site}/{stream}"]}],
        "metrics": {"enabled": False},
        "streams": {"max_streams": max(steps)},
        "batch": {"queue_size": 100_000},
    })  # fmt: skip
    assert not problems, problems
    link = MemoryLink()
    daemon = Daemon(config, link=link)
    daemon.start()
    pids = [os.getpid(), *(p.pid for p in (daemon.pool._processes if daemon.pool else []))]

    def total() -> int:
        return sum(process_rss(pid) for pid in pids)

    def scored() -> float:
        return daemon.metrics.value("rnnsentry_messages_total", {"outcome": "scored"}) or 0.0

    pool = value_pool(8, pumps=16, steps=64).reshape(-1, 8)
    bodies = [json.dumps({"ts": 1_750_000_000.0, "values": [round(float(v), 4) for v in row]})
              .encode() for row in pool]  # fmt: skip
    gc.collect()
    base = total()
    rows, made = [], 0
    try:
        for target in steps:
            for k in range(made, target):
                while not link.deliver(f"plant/{k // 1000}/pump-{k}", bodies[k % len(bodies)]):
                    time.sleep(0.01)  # the inbox is full: let the scoring catch up
            made = target
            while scored() < target:
                time.sleep(0.05)
            gc.collect()
            now = total()
            rows.append((
                f"{target:,}", f"{len(pids)}", f"{now / 2**20:,.0f}",
                f"{(now - base) / 2**20:,.0f}",
                f"**{(now - base) / target:,.0f}**" if target else "-",
            ))  # fmt: skip
        final = total()
    finally:
        daemon.stop()
    print(f"\nthe daemon, [daemon] workers {workers}: every process's RSS\n")
    print(table(["live streams", "processes", "RSS MiB, all", "growth MiB",
                 "**bytes / stream (growth)**"], rows))  # fmt: skip
    print(f"\nat start, before any stream: {base / 2**20:,.0f} MiB in all (this process holds"
          " what the run above left too)")  # fmt: skip
    last = steps[-1]
    per = (final - base) / last if last else float("nan")
    print(
        f"\ntarget < {TARGET_BYTES} bytes per stream, every process:"
        f" {'met' if per < TARGET_BYTES else 'NOT met'} ({per:,.0f} at {last:,})"
    )


if __name__ == "__main__":
    sys.exit(main())
