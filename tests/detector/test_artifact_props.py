"""Reading a model file's metadata never raises anything but ModelFileError, whatever it holds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detector.artifact import FORMAT_VERSION, meta_from_dict, parse_artifact
from detector.errors import ModelFileError
from tests.strategies import json_values

# No example database: the suite leaves no files behind in the working tree.
PROPS = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_META: dict[str, Any] = {
    "format_version": FORMAT_VERSION,
    "name": "pumps",
    "cell": "gru",
    "layers": 1,
    "hidden_size": 8,
    "features": ["a", "b"],
    "normalisation": {"centre": [0.0, 1.0], "scale": [1.0, 2.0]},
    "sample_interval_s": None,
    "calibration": {
        "n": 10,
        "mean": 1.0,
        "std": 0.5,
        "quantiles": {},
        "window": 5,
        "window_mean": 1.0,
        "window_std": 0.2,
        "threshold": 0.999,
    },
    "training": {},
    "graph_sha256": "0" * 64,
}


def test_the_valid_metadata_is_valid() -> None:
    assert meta_from_dict(json.loads(json.dumps(VALID_META))).name == "pumps"


@PROPS
@given(
    field=st.sampled_from([k for k in VALID_META if k != "format_version"]),
    value=json_values,
)
@example(field="layers", value="2")  # BUG: TypeError escapes _check_meta
def test_meta_from_dict_raises_only_model_file_error(field: str, value: Any) -> None:
    doc = json.loads(json.dumps(VALID_META))
    doc[field] = value
    try:
        meta_from_dict(doc)
    except ModelFileError:
        pass


@PROPS
@given(
    section=st.sampled_from(["normalisation", "calibration"]),
    field=st.sampled_from(["centre", "scale", "window", "window_mean", "window_std", "n"]),
    value=json_values,
)
@example(section="calibration", field="window", value=None)  # BUG: TypeError escapes
@example(section="normalisation", field="centre", value=None)  # BUG: TypeError escapes
def test_meta_from_dict_sections_raise_only_model_file_error(
    section: str, field: str, value: Any
) -> None:
    doc = json.loads(json.dumps(VALID_META))
    doc[section][field] = value
    try:
        meta_from_dict(doc)
    except ModelFileError:
        pass


@PROPS
@given(data=st.binary(max_size=256))
@example(data=b"\x3a\x00\x72\x06\x0a\x01\xff\x12\x01x")
def test_parse_artifact_on_arbitrary_bytes(data: bytes) -> None:
    try:
        parse_artifact(data)
    except ModelFileError:
        pass
