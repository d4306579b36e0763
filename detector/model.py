"""A loaded model: the checked artifact and its onnxruntime session.

``LoadedModel.load`` reads the file, checks its metadata against the graph's
inputs and outputs, picks execution providers (CUDA when asked and present,
else CPU, saying so once) and runs one warm-up step. ``step`` advances B
streams by one sample in a single onnxruntime call.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from detector.artifact import INPUT_NAME, OUTPUT_NAMES, ModelMeta, expected_io, read_artifact
from detector.errors import ModelFileError

log = logging.getLogger(__name__)

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def choose_providers(wanted: list[str]) -> list[str]:
    """Map names ('cuda', 'cpu') to the available onnxruntime providers, CPU last."""
    available = set(ort.get_available_providers())
    chosen = []
    for name in wanted:
        provider = _PROVIDERS.get(name.lower())
        if provider is None:
            raise ModelFileError(f"unknown execution provider {name!r} (use cpu or cuda)")
        if provider in available:
            chosen.append(provider)
        else:
            log.warning("execution provider %s is not available here; using CPU", name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _dims(shape: list[Any]) -> list[Any]:
    return [d if isinstance(d, int) else "B" for d in shape]


@dataclass
class StepOutput:
    mean: np.ndarray  # [B, F] normalised units
    log_var: np.ndarray  # [B, F]
    states: list[np.ndarray]  # each [L, B, H], in meta.state_names order


def _warn_if_others_may_write(path: Path) -> None:
    """A model file that any user may replace, or another user owns, decides what this
    daemon calls normal: say so (it still loads; the operator decides)."""
    try:
        info = path.stat()
    except OSError:
        return
    if info.st_mode & stat.S_IWOTH:
        log.warning("model file %s is writable by every user on this machine: anyone could"
                    " replace the model (chmod o-w)", path)  # fmt: skip
    if hasattr(os, "getuid") and info.st_uid not in (0, os.getuid()):
        log.warning("model file %s belongs to another user (uid %d), who may replace it",
                    path, info.st_uid)  # fmt: skip


class LoadedModel:
    """One model artifact ready to step streams."""

    def __init__(self, name: str, path: str, meta: ModelMeta, session: ort.InferenceSession):
        self.name = name
        self.path = path
        self.meta = meta
        self.session = session
        self.centre = np.asarray(meta.normalisation.centre, dtype=np.float64)
        self.inv_scale = 1.0 / np.asarray(meta.normalisation.scale, dtype=np.float64)
        self.feature_index = {n: i for i, n in enumerate(meta.features)}
        self._outputs = [*OUTPUT_NAMES, *(s + "_out" for s in meta.state_names)]
        self.providers = session.get_providers()

    @classmethod
    def load(
        cls,
        path: str | Path,
        name: str | None = None,
        providers: list[str] | None = None,
        intra_op_threads: int = 1,
    ) -> LoadedModel:
        data, meta = read_artifact(path)
        _warn_if_others_may_write(Path(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                data, sess_options=options, providers=choose_providers(providers or ["cpu"])
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFileError(f"{path}: onnxruntime cannot load the graph: {exc}") from None
        _check_graph(session, meta, str(path))
        model = cls(name or meta.name, str(path), meta, session)
        model.step(np.zeros((1, meta.n_features), np.float32), model.zero_states(1))
        log.info(
            "model %s loaded from %s (%s, %d features, fingerprint %s, providers %s)",
            model.name, path, meta.cell, meta.n_features, meta.fingerprint, model.providers,
        )  # fmt: skip
        return model

    def zero_states(self, batch: int) -> list[np.ndarray]:
        shapes = (self.meta.state_shape(name) for name in self.meta.state_names)
        return [np.zeros((first, batch, last), np.float32) for first, last in shapes]

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Raw units -> the model's normalised units (what mean/log_var predict)."""
        out: np.ndarray = (x - self.centre) * self.inv_scale
        return out

    def denormalise(self, z: np.ndarray) -> np.ndarray:
        """The model's normalised units -> raw units (normalise's inverse)."""
        out: np.ndarray = np.asarray(z, np.float64) / self.inv_scale + self.centre
        return out

    def step(self, x: np.ndarray, states: list[np.ndarray]) -> StepOutput:
        """One recurrent step of B streams: ``x`` [B, F] raw units, states [L, B, H]."""
        with np.errstate(over="ignore"):  # out-of-range values become inf: model_non_finite
            feeds = {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}
        for name, value in zip(self.meta.state_names, states, strict=True):
            feeds[name] = np.ascontiguousarray(value, dtype=np.float32)
        out = self.session.run(self._outputs, feeds)
        return StepOutput(out[0], out[1], list(out[2:]))


def _check_graph(session: ort.InferenceSession, meta: ModelMeta, where: str) -> None:
    want_in, want_out = expected_io(meta)
    have_in = {i.name: _dims(i.shape) for i in session.get_inputs()}
    have_out = {o.name: _dims(o.shape) for o in session.get_outputs()}
    for kind, want, have in (("input", want_in, have_in), ("output", want_out, have_out)):
        if set(want) != set(have):
            raise ModelFileError(
                f"{where}: metadata says {kind}s {sorted(want)}, the graph has {sorted(have)}"
            )
        for name, shape in want.items():
            if have[name] != shape:
                raise ModelFileError(
                    f"{where}: {kind} {name!r} has shape {have[name]}, metadata implies {shape}"
                )
