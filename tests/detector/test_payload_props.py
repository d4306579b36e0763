"""Parsing a message never raises anything but PayloadError, whatever arrives."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detector.errors import PayloadError
from detector.payload import ParsedMessage, PayloadLimits, parse_message, parse_timestamp
from tests.strategies import TIME_TEXTS, json_values

# No example database: the suite leaves no files behind in the working tree.
PROPS = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FEATURE_SETS = [["a"], ["a", "b", "c"]]
LIMITS = PayloadLimits(max_samples=8)  # the default max_bytes
RECV_TS = 1_700_000_000.0

timestamps = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**14), max_value=10**14)
    | st.floats()
    | st.sampled_from(TIME_TEXTS)
    | json_values
)
numbers = st.integers(min_value=-(10**6), max_value=10**6) | st.floats()
sample_values = (
    numbers
    | st.lists(numbers, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b", "c", "x", "y"]), numbers, max_size=5)
    | json_values
)
samples = st.fixed_dictionaries({"values": sample_values}, optional={"ts": timestamps})
messages = samples | st.lists(samples, max_size=10) | numbers


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def check_parsed(msg: ParsedMessage, features: list[str]) -> None:
    assert 1 <= len(msg.readings) <= LIMITS.max_samples
    assert msg.ignored_names >= 0
    for reading in msg.readings:
        assert isinstance(reading.ts, float) and math.isfinite(reading.ts)
        assert len(reading.values) == len(features)
        assert all(isinstance(v, float) and math.isfinite(v) for v in reading.values)


def parse_or_reject(payload: bytes, features: list[str]) -> ParsedMessage | None:
    index = {name: i for i, name in enumerate(features)}
    try:
        msg = parse_message(payload, features, index, RECV_TS, LIMITS)
    except PayloadError:
        return None
    check_parsed(msg, features)
    return msg


@PROPS
@given(payload=st.binary(max_size=512), features=st.sampled_from(FEATURE_SETS))
@example(payload=b"1" * 5000, features=["a"])  # BUG: json.loads' int-digits ValueError escapes
@example(payload=b"\xff\xfe{}", features=["a"])
@example(payload=b"[" * 3000, features=["a"])
def test_parse_message_on_arbitrary_bytes(payload: bytes, features: list[str]) -> None:
    parse_or_reject(payload, features)


@PROPS
@given(doc=json_values, features=st.sampled_from(FEATURE_SETS))
@example(doc={"values": [10**400]}, features=["a"])  # BUG: OverflowError escapes
@example(doc={"ts": 10**400, "values": 1}, features=["a"])  # BUG: OverflowError escapes
def test_parse_message_on_arbitrary_json(doc: Any, features: list[str]) -> None:
    parse_or_reject(encode(doc), features)


@PROPS
@given(doc=messages, features=st.sampled_from(FEATURE_SETS))
def test_parse_message_on_message_shaped_json(doc: Any, features: list[str]) -> None:
    parse_or_reject(encode(doc), features)


@PROPS
@given(
    # the model computes in float32: larger magnitudes are rejected as non_finite
    values=st.lists(st.floats(min_value=-3.4e38, max_value=3.4e38), min_size=3, max_size=3),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=4).filter(lambda k: k not in {"a", "b", "c"}),
        st.integers(),
        max_size=4,
    ),
    ts=st.integers(min_value=0, max_value=10**10),
)
def test_named_values_land_in_feature_order(
    values: list[float], extra: dict[str, int], ts: int
) -> None:
    features = ["a", "b", "c"]
    named = dict(zip(reversed(features), reversed(values), strict=True)) | extra
    msg = parse_or_reject(encode({"ts": ts, "values": named}), features)
    assert msg is not None
    assert msg.readings[0].values == values
    assert msg.readings[0].ts == float(ts)
    assert msg.ignored_names == len(extra)


@PROPS
@given(value=json_values)
@example(value=10**400)  # BUG: OverflowError instead of ValueError
def test_parse_timestamp_returns_finite_or_raises_value_error(value: Any) -> None:
    try:
        ts = parse_timestamp(value)
    except ValueError:
        return
    assert isinstance(ts, float) and math.isfinite(ts)
