"""rnnsentry's daemon and scoring core: numpy and onnxruntime, never torch.

The public pieces: :mod:`detector.artifact` (the model file contract),
:mod:`detector.scoring` (pure maths), :mod:`detector.state` (per-stream state),
:mod:`detector.engine` (one batched step of many streams), :mod:`detector.daemon`.
"""

__version__ = "0.1.0"
