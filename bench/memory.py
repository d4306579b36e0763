"""Resident memory against live streams: 0 -> 1,000,000 streams through ``Engine`` (its
``StateTable``) with the benchmark GRU (hidden size 64, 8 features), one sample per new
stream in batches as the daemon makes them. Reports the process's RSS, its growth per
stream, the table's own arrays per stream and the peak. Stream ids look like
``plant/123/pump-123456`` (20-odd characters). Prints a markdown table; not a test.

    .venv/bin/python bench/memory.py [--steps 0,10000,100000,250000,500000,1000000]
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time

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

from detector.engine import Engine, StreamConfig
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
    print(f"wall time {time.monotonic() - began:.0f} s; " + load_note_at_end())
    return 0


if __name__ == "__main__":
    sys.exit(main())
