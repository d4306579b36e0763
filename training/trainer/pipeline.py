"""From arrays or CSV files to one checked model file: train, export, parity, calibrate.

``fit_and_export`` trains on streams, writes the one-step ONNX graph with its metadata
(fails loudly when parity is off) and returns the :class:`ModelMeta` read back from
the file; ``train_csv`` does the same from CSV files through :mod:`training.trainer.data`.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.artifact import FORMAT_VERSION, ModelMeta
from detector.errors import DataError
from training.trainer.calibrate import (
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    QUIET_SHARE,
    calibrate,
    quiet_features,
)
from training.trainer.data import fingerprint, load_csv_streams
from training.trainer.export import build_step_graph, check_parity, parity_sequence, write_artifact
from training.trainer.model import level_gain
from training.trainer.train import TrainOptions, TrainResult, speed, torch_threads, train

log = logging.getLogger(__name__)


def provenance(
    result: TrainResult, data_fingerprint: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What ModelMeta.training records: options, data, outcome, when and with what."""
    options = asdict(result.options)
    options["stride"] = result.options.step_stride
    doc: dict[str, Any] = {
        "options": options,
        "data_fingerprint": data_fingerprint,
        "rows": int(
            sum(len(s) for s in result.train_streams) + sum(len(s) for s in result.val_streams)
        ),
        "train_rows": int(sum(len(s) for s in result.train_streams)),
        "val_rows": int(sum(len(s) for s in result.val_streams)),
        "streams": len(result.train_streams),
        "seed": result.options.seed,
        "val_loss": _finite(result.best_loss),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "duration_s": round(result.seconds, 3),
        **{k: None if v is None else round(v, 3) for k, v in speed(result.history).items()},
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "history": [[h.epoch, _finite(h.train_loss), _finite(h.val_loss)] for h in result.history],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    logit = result.model.head.level_logit
    if logit is not None:  # each sensor's smoothing gain, for `rnnsentry inspect`
        doc["level_gain"] = [round(float(g), 4) for g in level_gain(logit.detach())]
    doc.update(result.extra)
    doc.update(extra or {})
    return doc


def _finite(value: float) -> float | None:
    """JSON has no NaN: None instead."""
    return round(float(value), 6) if np.isfinite(value) else None


def export_result(
    result: TrainResult,
    features: Sequence[str],
    out_path: str | Path,
    *,
    name: str | None = None,
    sample_interval_s: float | None = None,
    training_info: dict[str, Any] | None = None,
    calibration_window: int = DEFAULT_WINDOW,
    threshold: float = DEFAULT_THRESHOLD,
) -> ModelMeta:
    """Export a trained result: graph, parity check, calibration, metadata, file."""
    began = time.perf_counter()
    model, norm = result.model, result.normalisation
    held_out = result.val_streams
    calibration_streams, score_from = held_out, None
    quiet: list[str] = []
    if not any(len(s) > result.options.burn_in + 2 for s in held_out):
        # No usable validation split: calibrate on the last fifth of the training rows.
        if result.options.val_fraction > 0:
            log.warning("validation rows too few to calibrate on; using the training tail")
        held_out = [
            s[-max(len(s) // 5, result.options.burn_in + 3) :] for s in result.train_streams
        ]
        calibration_streams = held_out
    elif len(held_out) == len(result.train_streams):
        # Each stream whole, scored on its held-out tail only: the model's state there is
        # warm, as it is in the daemon, where a cold start would count its first errors.
        score_from = [len(t) for t in result.train_streams]
        quiet = quiet_features(result.train_streams, held_out, features)
        if quiet:
            log.warning(
                "the held-out rows (the last %.0f%% of the data, on which the scores are"
                " calibrated) vary less than %.0f%% as much as the rest in %s: routine events"
                " they never show (a working day's start, when the data ends on a weekend)"
                " may raise alerts in a stream's first days; train on data that ends on a"
                " typical stretch, or on more of it", 100 * result.options.val_fraction,
                100 * QUIET_SHARE, ", ".join(quiet),
            )  # fmt: skip
        calibration_streams = [
            np.concatenate([t, v]) for t, v in zip(result.train_streams, held_out, strict=True)
        ]
    name = name or Path(out_path).stem
    proto = build_step_graph(model, norm, name)
    with torch_threads(result.options.threads):  # torch's side of the parity check
        parity = check_parity(proto, model, norm, parity_sequence(held_out))
    cal = calibrate(
        proto,
        norm,
        calibration_streams,
        result.options.burn_in,
        calibration_window,
        threshold,
        score_from,
    )
    data_fp = fingerprint([*result.train_streams, *result.val_streams])
    info = {
        "sample_interval_s": sample_interval_s,
        "calibration_window": calibration_window,
        "threshold": threshold,
        "export_s": round(time.perf_counter() - began, 3),  # graph, parity and calibration
        "held_out_quiet": quiet,  # features whose held-out rows vary far less (a warning)
        **(training_info or {}),
    }
    meta = ModelMeta(
        format_version=FORMAT_VERSION,
        name=name,
        cell=model.cell,
        layers=model.layers,
        hidden_size=model.hidden_size,
        features=list(features),
        normalisation=norm,
        sample_interval_s=sample_interval_s,
        calibration=cal,
        training=provenance(result, data_fp, info),
        graph_sha256="",  # filled in from the graph by write_artifact
        parity_max_abs_diff=parity,
        skip=model.skip,
    )
    return write_artifact(proto, meta, out_path)


def fit_and_export(
    streams: Sequence[np.ndarray],
    features: Sequence[str],
    out_path: str | Path,
    options: TrainOptions | None = None,
    *,
    name: str | None = None,
    sample_interval_s: float | None = None,
    training_info: dict[str, Any] | None = None,
    stream_names: Sequence[str] | None = None,
    quiet: bool = False,
    report_dir: str | Path | None = None,
) -> ModelMeta:
    """Train on ``streams`` (each [T, F] raw units, columns in ``features`` order) and write
    a checked model file to ``out_path``; returns its metadata as the daemon reads it.

    With ``report_dir``, also writes the training report there (:mod:`training.trainer.report`).
    """
    began = time.perf_counter()
    features = list(features)
    if not features or len(set(features)) != len(features):
        raise DataError("feature names must be a non-empty list of distinct names")
    if report_dir is not None:
        from training.trainer.report import check_report_dir

        check_report_dir(report_dir)  # fail before training, not after
    info = {"report_dir": str(report_dir) if report_dir is not None else None}
    info.update(training_info or {})
    result = train(streams, options, features=features, stream_names=stream_names, quiet=quiet)
    trained = time.perf_counter()
    meta = export_result(
        result,
        features,
        out_path,
        name=name,
        sample_interval_s=sample_interval_s,
        training_info=info,
    )
    if report_dir is not None:
        from training.trainer.report import write_report

        done = time.perf_counter()
        timings = {"export_s": done - trained, "fit_and_export_s": done - began}
        write_report(report_dir, result, meta, artifact=out_path, timings=timings)
    return meta


def train_csv(
    paths: Sequence[str | Path],
    out_path: str | Path,
    options: TrainOptions | None = None,
    *,
    columns: Sequence[str] | None = None,
    train_rows: int | None = None,
    timestamp_col: str | None = None,
    stream_col: str | None = None,
    name: str | None = None,
    quiet: bool = False,
    report_dir: str | Path | None = None,
) -> ModelMeta:
    """Read CSV files (one stream per file, or per ``stream_col`` value) and fit_and_export.

    The metadata records every argument, the timestamp column actually used (given or
    detected by name) and the sample interval inferred from the timestamps.
    """
    data = load_csv_streams(paths, columns, train_rows, timestamp_col, stream_col)
    info = {
        "files": [str(p) for p in paths],
        "stream_names": data.names[:100],
        "columns": list(columns) if columns else None,
        "features": list(data.features),
        "train_rows_per_stream": train_rows,
        "timestamp_col": data.timestamp_col,  # used: given, or detected by name
        "timestamp_col_given": timestamp_col,
        "stream_col": stream_col,
        "sample_interval_s": data.sample_interval_s,  # inferred from the timestamps
        "name": name,
        "out": str(out_path),
        "quiet": quiet,
    }
    return fit_and_export(
        data.streams,
        data.features,
        out_path,
        options,
        name=name,
        sample_interval_s=data.sample_interval_s,
        training_info=info,
        stream_names=data.names,
        quiet=quiet,
        report_dir=report_dir,
    )
