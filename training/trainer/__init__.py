"""The trainer (torch): data, model, BPTT training, calibration, ONNX export, report.

``fit_and_export(streams, features, out_path, options)`` and ``train_csv(paths,
out_path, options)`` produce one checked model file. They load torch when first
used, so ``training.trainer.cli`` (``rnnsentry train --help``) imports without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_result", "fit_and_export", "train_csv"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from training.trainer import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'training.trainer' has no attribute {name!r}")
