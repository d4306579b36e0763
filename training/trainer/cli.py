"""``rnnsentry train``: CSV files in, one checked model file out (and a report on request).

Importing this module does not import torch (``rnnsentry train --help`` works
without it); :func:`run_train` loads it and says how to install it when missing.
Bad input raises DataError, bad options ConfigError: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any

from detector.artifact import CELLS, SKIPS
from detector.errors import RnnsentryError

log = logging.getLogger(__name__)

# TrainOptions' defaults, repeated here so that --help needs no torch; a test keeps them equal.
DEFAULTS: dict[str, Any] = {
    "cell": "lstm",
    "skip": "level",
    "layers": 1,
    "hidden_size": 32,
    "dropout": 0.0,
    "window": 64,
    "stride": None,
    "burn_in": 8,
    "batch_size": 32,
    "epochs": 30,
    "patience": 5,
    "lr": 3e-3,
    "optimiser": "adam",
    "clip": 1.0,
    "val_fraction": 0.2,
    "seed": 0,
    "threads": 1,
}
OPTIMISERS = ("adam", "rmsprop", "sgd")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="FILE.csv",
        help="training CSV file(s) of normal operation",
    )
    data.add_argument("--out", required=True, metavar="MODEL.onnx", help="model file to write")
    data.add_argument(
        "--columns",
        metavar="a,b",
        help="feature columns, in order (default: every numeric column but timestamp and labels)",
    )
    data.add_argument(
        "--train-rows",
        type=int,
        metavar="N",
        help="use the first N rows of each file (or of each stream)",
    )
    data.add_argument("--timestamp-col", metavar="C", help="timestamp column (default: detected)")
    data.add_argument(
        "--stream-col",
        metavar="C",
        help="column naming the stream of each row (several streams per file)",
    )
    data.add_argument("--name", help="model name (default: the output file's stem)")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--cell", choices=CELLS, default=d["cell"], help="recurrent cell (%(default)s)"
    )
    model.add_argument(
        "--skip",
        choices=SKIPS,
        default=d["skip"],
        help="what each prediction adds the network's change to: the inputs' smoothed level,"
        " or the last input (%(default)s)",
    )
    model.add_argument(
        "--layers", type=int, default=d["layers"], help="stacked layers (%(default)s)"
    )
    model.add_argument(
        "--hidden", type=int, default=d["hidden_size"], help="hidden size (%(default)s)"
    )
    model.add_argument(
        "--dropout", type=float, default=d["dropout"], help="dropout between layers (%(default)s)"
    )
    fit = parser.add_argument_group("training")
    fit.add_argument(
        "--window", type=int, default=d["window"], help="truncated-BPTT window, steps (%(default)s)"
    )
    fit.add_argument(
        "--stride",
        type=int,
        default=d["stride"],
        help="steps between window starts (default: the window)",
    )
    fit.add_argument(
        "--burn-in",
        type=int,
        default=d["burn_in"],
        help="unscored first steps of each stream segment (%(default)s)",
    )
    fit.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help="stream segments per batch (%(default)s)",
    )
    fit.add_argument("--epochs", type=int, default=d["epochs"], help="at most (%(default)s)")
    fit.add_argument(
        "--patience",
        type=int,
        default=d["patience"],
        help="epochs without improvement before stopping; 0 never (%(default)s)",
    )
    fit.add_argument("--lr", type=float, default=d["lr"], help="learning rate (%(default)s)")
    fit.add_argument(
        "--optimiser", choices=OPTIMISERS, default=d["optimiser"], help="optimiser (%(default)s)"
    )
    fit.add_argument(
        "--clip", type=float, default=d["clip"], help="gradient-norm clip, 0 disables (%(default)s)"
    )
    fit.add_argument(
        "--val-fraction",
        type=float,
        default=d["val_fraction"],
        help="last fraction of each stream held out for validation (%(default)s)",
    )
    fit.add_argument("--seed", type=int, default=d["seed"], help="random seed (%(default)s)")
    fit.add_argument(
        "--threads",
        type=int,
        default=d["threads"],
        help="torch threads while training; 0: one per core (%(default)s)",
    )
    parser.add_argument(
        "--report",
        metavar="DIR",
        help="also write DIR/training.png (loss curves) and DIR/training.json (every figure)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress or summary lines")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """TrainOptions' keyword arguments from parsed flags."""
    values = {name: getattr(args, name) for name in DEFAULTS if hasattr(args, name)}
    values["hidden_size"] = args.hidden
    return values


def run_train(args: argparse.Namespace) -> int:
    try:
        importlib.import_module("torch")
    except ImportError:
        raise RnnsentryError("training needs torch: pip install 'rnnsentry[train]'") from None
    from training.trainer.pipeline import train_csv
    from training.trainer.train import TrainOptions

    options = TrainOptions(**options_from_args(args))
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    meta = train_csv(
        args.data,
        args.out,
        options,
        columns=columns,
        train_rows=args.train_rows,
        timestamp_col=args.timestamp_col,
        stream_col=args.stream_col,
        name=args.name,
        quiet=args.quiet,
        report_dir=args.report,
    )
    if not args.quiet:
        val = meta.training.get("val_loss")
        print(
            f"wrote {args.out}: {meta.cell} {meta.layers}x{meta.hidden_size},"
            f" features {', '.join(meta.features)}; val loss"
            f" {val if val is None else format(val, '.4f')}, best epoch"
            f" {meta.training['best_epoch']}/{meta.training['epochs_run']},"
            f" parity {meta.parity_max_abs_diff:.1e}, fingerprint {meta.fingerprint}"
            + (f"; report in {args.report}" if args.report else "")
        )
    return 0
