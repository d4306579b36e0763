"""Offline evaluation without torch: what the daemon's scoring path did on labelled data.

``evaluate`` (point-wise, event and NAB scores of replay output; ``rnnsentry evaluate``),
``nab`` (the NAB scoring rules), ``plot`` (``rnnsentry plot`` and ``replay --plot``;
matplotlib loaded only to draw) and ``synth`` (synthetic pump fleets with labelled
anomalies; ``rnnsentry synth``). A test imports this package with torch blocked.
"""
