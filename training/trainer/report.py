"""The training report of ``rnnsentry train --report DIR``: a loss plot and every figure.

``write_report(directory, result, meta, ...)`` writes ``DIR/training.png`` (training
and validation loss per epoch, the best epoch marked) and ``DIR/training.json``
(options, per-epoch losses, gradient norms, learning rates and times, the best epoch,
parity, calibration, timings, data fingerprint). matplotlib is imported only here, when
a report is asked for, and draws with its Agg backend (no display, no pyplot state).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from detector.artifact import ModelMeta
from detector.errors import RnnsentryError
from training.trainer.train import EpochStats, TrainResult, speed

log = logging.getLogger(__name__)

PLOT_NAME = "training.png"
JSON_NAME = "training.json"
REPORT_FORMAT = 1


def check_report_dir(directory: str | Path) -> Path:
    """Create ``directory`` (and parents) and check matplotlib is there, before training."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RnnsentryError("--report needs matplotlib: pip install 'rnnsentry[train]'") from None
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RnnsentryError(f"cannot create the report directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise RnnsentryError(f"cannot write to the report directory {path}")
    return path


def _finite(value: float) -> float | None:
    """JSON has no NaN: None instead.

    >>> _finite(float("nan")), _finite(0.5)
    (None, 0.5)
    """
    return float(value) if math.isfinite(value) else None


def epoch_rows(history: list[EpochStats], best_epoch: int) -> list[dict[str, Any]]:
    """One JSON object per epoch, NaN as null, the best epoch flagged."""
    return [
        {
            "epoch": h.epoch,
            "train_loss": _finite(h.train_loss),
            "val_loss": _finite(h.val_loss),
            "lr": h.lr,
            "grad_norm_max": _finite(h.grad_norm_max),
            "seconds": h.seconds,
            "val_seconds": h.val_seconds,
            "windows": h.windows,
            "best": h.epoch == best_epoch,
        }
        for h in history
    ]


def report_document(
    result: TrainResult,
    meta: ModelMeta,
    *,
    artifact: str | Path | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Every figure of one training run as a JSON-ready dict."""
    history = result.history
    all_timings = {"train_s": result.seconds, **speed(history), **(timings or {})}
    return {
        "report_format": REPORT_FORMAT,
        "artifact": str(artifact) if artifact is not None else None,
        "model": {
            "name": meta.name,
            "cell": meta.cell,
            "layers": meta.layers,
            "hidden_size": meta.hidden_size,
            "parameters": sum(p.numel() for p in result.model.parameters()),
            "features": list(meta.features),
            "fingerprint": meta.fingerprint,
            "graph_sha256": meta.graph_sha256,
        },
        "options": asdict(result.options),
        "epochs": epoch_rows(history, result.best_epoch),
        "best_epoch": result.best_epoch,
        "best_loss": _finite(result.best_loss),
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "parity_max_abs_diff": meta.parity_max_abs_diff,
        "calibration": asdict(meta.calibration),
        "normalisation": asdict(meta.normalisation),
        "sample_interval_s": meta.sample_interval_s,
        "data_fingerprint": meta.training.get("data_fingerprint"),
        "timings": all_timings,
        "metadata_training": meta.training,  # what the model file records, as it records it
    }


def plot_losses(
    history: list[EpochStats], best_epoch: int, path: str | Path, title: str = ""
) -> None:
    """Training and validation loss per epoch, the best epoch marked, as a PNG file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [h.epoch for h in history]
    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)  # attaches itself to the figure: savefig renders with Agg
    ax = figure.add_subplot()
    ax.plot(epochs, [h.train_loss for h in history], marker=".", label="training")
    val = [h.val_loss for h in history]
    watched = val
    if any(math.isfinite(v) for v in val):
        ax.plot(epochs, val, marker=".", label="validation")
    else:
        watched = [h.train_loss for h in history]
    best = next((h for h in history if h.epoch == best_epoch), None)
    if best is not None:
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
        ax.plot(
            [best_epoch],
            [watched[epochs.index(best_epoch)]],
            marker="*",
            markersize=14,
            color="tab:red",
            linestyle="none",
            label=f"best epoch {best_epoch}",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("Gaussian NLL per feature and step")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_report(
    directory: str | Path,
    result: TrainResult,
    meta: ModelMeta,
    *,
    artifact: str | Path | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[Path, Path]:
    """Write DIR/training.png and DIR/training.json; returns their paths."""
    folder = check_report_dir(directory)
    plot_path, json_path = folder / PLOT_NAME, folder / JSON_NAME
    doc = report_document(result, meta, artifact=artifact, timings=timings)
    title = f"{meta.name}: {meta.cell} {meta.layers}x{meta.hidden_size}"
    try:
        plot_losses(result.history, result.best_epoch, plot_path, title)
        json_path.write_text(
            json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8"
        )
    except OSError as exc:
        raise RnnsentryError(f"cannot write the training report in {folder}: {exc}") from None
    log.debug("training report written to %s", folder)
    return plot_path, json_path
