"""rnnsentry's daemon and scoring core: numpy and onnxruntime, never torch.

The public pieces: :mod:`detector.artifact` (the model file contract),
:mod:`detector.scoring` (pure maths), :mod:`detector.state` (per-stream state),
:mod:`detector.engine` (one batched step of many streams), :mod:`detector.daemon`.
"""

import os

__version__ = "0.1.0"

# onnxruntime's official builds send usage events to Microsoft and keep a device id under
# ~/.cache unless this is set before it starts; a daemon on a plant network does neither
# unless its operator sets ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
