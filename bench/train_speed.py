"""Training speed of the default model on CPU: windows per second, seconds per epoch, and
the wall time of ``fit_and_export`` (train, export, parity, calibration) on a synthetic
multivariate set (100k steps x 8 features by default). Prints a markdown table; exits 1
when ``fit_and_export`` takes longer than ``--limit-s`` (120 s by default).

    .venv/bin/python bench/train_speed.py [--steps N] [--features F] [--streams S]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from training.evaluation.synth import DEFAULT_FEATURES, generate_fleet
from training.trainer import fit_and_export
from training.trainer.train import TrainOptions

LIMIT_S = 120.0


def feature_names(n: int) -> list[str]:
    """flow_0, pressure_0, temperature_0, vibration_0, flow_1, ... (synth's roles in turn)."""
    return [f"{DEFAULT_FEATURES[j % 4]}_{j // 4}" for j in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000, help="steps in all (%(default)s)")
    parser.add_argument("--features", type=int, default=8, help="sensors (%(default)s)")
    parser.add_argument(
        "--streams", type=int, default=1, help="pumps the steps are split over (%(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=TrainOptions().threads,
        help="torch threads while training; 0: one per core (%(default)s)",
    )
    parser.add_argument("--limit-s", type=float, default=LIMIT_S, help="(%(default)s)")
    parser.add_argument("--progress", action="store_true", help="show the per-epoch progress")
    args = parser.parse_args(argv)
    if args.steps < 1000 or args.features < 1 or not 1 <= args.streams <= args.steps // 1000:
        parser.error("need --steps >= 1000, --features >= 1, 1 <= --streams <= steps/1000")

    began = time.perf_counter()
    fleet = generate_fleet(
        args.streams, args.steps // args.streams, features=feature_names(args.features), seed=0
    )
    generated_s = time.perf_counter() - began
    options = TrainOptions(cell="gru", threads=args.threads)  # the README's GRU; else defaults
    with tempfile.TemporaryDirectory(prefix="rnnsentry-bench-") as work:
        began = time.perf_counter()
        meta = fit_and_export(
            list(fleet.values),
            fleet.features,
            Path(work) / "speed.onnx",
            options,
            sample_interval_s=fleet.interval_s,
            quiet=not args.progress,
        )
        total_s = time.perf_counter() - began
    t = meta.training
    ok = total_s <= args.limit_s
    rows = [
        ("data", f"{fleet.values.shape[1] * args.streams:,} steps x {args.features} features"
                 f" ({args.streams} stream{'s' if args.streams > 1 else ''}; synth,"
                 f" generated in {generated_s:.1f} s)"),
        ("model", f"{meta.cell} {meta.layers}x{meta.hidden_size}, window {options.window},"
                  f" batch {t['batch_lanes']} lanes x {t['lane_steps']} steps"),
        ("epochs run (best)", f"{t['epochs_run']} ({t['best_epoch']})"),
        ("windows per epoch", f"{t['windows_per_epoch']:,.0f}"),
        ("windows per second (training)", f"{t['windows_per_s']:,.0f}"),
        ("seconds per epoch (with validation)",
         f"{t['epoch_s_mean']:.2f} (validation {t['val_s_mean']:.2f})"),
        ("training", f"{t['duration_s']:.1f} s"),
        ("export + parity + calibration", f"{t['export_s']:.1f} s"),
        ("parity max abs diff", f"{meta.parity_max_abs_diff:.1e}"),
        ("**fit_and_export wall time**",
         f"**{total_s:.1f} s** (limit {args.limit_s:.0f} s: {'ok' if ok else 'OVER'})"),
    ]  # fmt: skip
    threads = options.threads or torch.get_num_threads()
    print(
        f"training speed: torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPU(s),"
        f" Python {platform.python_version()}, {platform.machine()}\n"
    )
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
