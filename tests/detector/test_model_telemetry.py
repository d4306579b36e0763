"""onnxruntime's telemetry is off for every process that imports ``detector``: no device id
or event store appears in the home folder when a model is loaded and stepped, unless the
operator turns it on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STEP = """
import numpy as np
from detector.model import LoadedModel
model = LoadedModel.load({model!r})
model.step(np.zeros((1, model.meta.n_features)), model.zero_states(1))
"""


def _run(tiny_model: Path, home: Path, **env: str) -> Path:
    environ = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    environ.update(HOME=str(home), **env)
    done = subprocess.run([sys.executable, "-c", STEP.format(model=str(tiny_model))],
                          env=environ, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return home / ".cache" / "Microsoft"


def test_loading_a_model_leaves_no_telemetry_store(tiny_model: Path, tmp_path: Path) -> None:
    assert not _run(tiny_model, tmp_path / "quiet").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="the store's place is Linux's")
def test_the_operator_can_turn_it_on(tiny_model: Path, tmp_path: Path) -> None:
    """The other side: with telemetry asked for, this build does keep its store, so the
    test above sees a difference the setting makes."""
    store = _run(tiny_model, tmp_path / "loud", ORT_DISABLE_TELEMETRY="0")
    if not store.exists():
        pytest.skip("this onnxruntime build has no telemetry to turn off")
    assert any(store.rglob("*"))
