"""rnnsentry's offline side, in three subpackages by what they need:

- ``training.trainer``: fit a recurrent model on CSV data and export one checked ONNX
  file (torch, from the ``train`` extra);
- ``training.evaluation``: score replay output against labels (point-wise, events, NAB),
  plot it, and generate labelled synthetic fleets (numpy; matplotlib for plots; never torch);
- ``training.demo``: ``rnnsentry demo`` and the local mosquitto launcher that the demo,
  the tests and the benchmarks share.

Each may import ``detector``; ``detector`` imports none of them.
"""
