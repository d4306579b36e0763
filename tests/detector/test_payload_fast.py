"""The parser's two readings agree: the fast one (``read_plain``) either reads a message
exactly as the full one (``parse_message``, ``read_doc``) does or leaves it alone;
``parse_into`` gives what the full reading gives, whichever took the message; and
``decode_json`` is ``json.loads`` with NaN and Infinity rejected."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detector.errors import PayloadError
from detector.payload import (
    PayloadLimits,
    PlainForm,
    _reject_constant,
    decode_json,
    parse_into,
    parse_message,
    read_plain,
)

PROPS = settings(database=None, deadline=None, max_examples=400,
                 suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
FEATURES = ("a", "b", "c")
INDEX = {name: i for i, name in enumerate(FEATURES)}
LIMITS = PayloadLimits(max_samples=6)
RECV_TS = 1_700_000_000.0

numbers = (
    st.floats(min_value=-1e3, max_value=1e3)
    | st.floats()  # NaN and infinities: json.dumps writes NaN / Infinity
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.sampled_from([3.4028234663852886e38, 3.5e38, -1e39, 1e308, 2**128, 2**129 - 1])
)
anything = st.none() | st.booleans() | st.text(max_size=4) | numbers
timestamps = (
    st.integers(min_value=1_600_000_000, max_value=1_800_000_000)
    | st.integers(min_value=1_600_000_000_000, max_value=1_800_000_000_000)  # milliseconds
    | st.floats()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.sampled_from(["2024-01-01T00:00:00Z", "1704067200", "soon", "", True])
    | st.none()
)
values = (
    st.fixed_dictionaries({name: numbers for name in FEATURES})
    | st.fixed_dictionaries({name: numbers for name in FEATURES}, optional={"x": numbers})
    | st.dictionaries(st.sampled_from([*FEATURES, "x"]), numbers | anything, max_size=4)
    | st.lists(numbers, min_size=3, max_size=3)
    | st.lists(numbers | anything, max_size=4)
    | anything
)
sample = st.fixed_dictionaries({"values": values}, optional={"ts": timestamps, "other": anything})
documents = sample | st.lists(sample, max_size=LIMITS.max_samples + 1) | anything


def _encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


payloads = (
    documents.map(_encode)
    | documents.map(_encode).map(lambda b: b"  " + b)  # leading space: the general path
    | documents.map(_encode).map(lambda b: b + b" \n")
    | documents.map(_encode).map(lambda b: b + b" x")  # extra data
    | documents.map(lambda d: json.dumps(d).encode("utf-16"))
    | st.binary(max_size=40)
)


@PROPS
@given(payload=payloads)
@example(payload=b'{"values": [1, 2, 3]}')
@example(payload=b'{"ts": 1e999, "values": [1, 2, 3]}')
@example(payload=b'{"ts": 1704067200000, "values": {"c": 3, "b": 2.5, "a": -1}}')
@example(payload=b'[{"ts": 1, "values": [1, 2, 3]}, {"values": [1, 2, 3]}]')
def test_the_fast_reading_reads_a_message_as_the_full_one_does_or_not_at_all(
    payload: bytes,
) -> None:
    ts: list[float] = [-1.0]  # what was there before stays
    flat: list[float] = [-2.0, -3.0, -4.0]
    try:
        doc = decode_json(payload)
    except (ValueError, RecursionError, PayloadError):
        return  # not a document: neither reading sees it
    n = read_plain(doc, PlainForm.of(FEATURES), RECV_TS, LIMITS, ts, flat)
    if n == 0:
        assert ts == [-1.0] and flat == [-2.0, -3.0, -4.0]
        return
    if len(payload) > LIMITS.max_bytes:
        return
    parsed = parse_message(payload, FEATURES, INDEX, RECV_TS, LIMITS)  # raises if it would
    assert parsed.ignored_names == 0
    assert n == len(parsed.readings)
    assert ts[1:] == [r.ts for r in parsed.readings]
    got = np.array(flat[3:], dtype=np.float64).reshape(n, len(FEATURES))
    want = np.array([r.values for r in parsed.readings], dtype=np.float64)
    assert np.array_equal(got, want)


def _loads(payload: bytes) -> tuple[str, Any]:
    try:
        return "ok", json.loads(payload, parse_constant=_reject_constant)
    except PayloadError as exc:
        return "payload", exc.reason
    except (ValueError, RecursionError) as exc:
        return "error", type(exc).__name__


def _decode(payload: bytes) -> tuple[str, Any]:
    try:
        return "ok", decode_json(payload)
    except PayloadError as exc:
        return "payload", exc.reason
    except (ValueError, RecursionError) as exc:
        return "error", type(exc).__name__


@PROPS
@given(payload=payloads | st.sampled_from([b"[", b"{", b"{}", b"[]", b"{\x00", b"[1] ]"]))
def test_decode_json_is_json_loads(payload: bytes) -> None:
    want, got = _loads(payload), _decode(payload)
    if want[0] == "ok" and got[0] == "ok":
        assert json.dumps(want[1]) == json.dumps(got[1])  # NaN-free: equal text, equal value
    else:
        assert want == got


@pytest.mark.parametrize(
    "payload",
    [b'{"values": [1, 2, NaN]}', b'{"values": [1, 2, Infinity]}', b"[-Infinity]"],
)
def test_decode_json_rejects_non_finite_constants(payload: bytes) -> None:
    with pytest.raises(PayloadError) as err:
        decode_json(payload)
    assert err.value.reason == "non_finite"


@PROPS
@given(payload=payloads)
def test_parse_into_gives_what_the_full_reading_gives(payload: bytes) -> None:
    ts: list[float] = [-1.0]
    flat: list[float] = [-2.0, -3.0, -4.0]
    try:
        want = parse_message(payload, FEATURES, INDEX, RECV_TS, LIMITS)
    except PayloadError as exc:
        with pytest.raises(PayloadError) as err:
            parse_into(payload, PlainForm.of(FEATURES), RECV_TS, LIMITS, ts, flat)
        assert err.value.reason == exc.reason
        assert ts == [-1.0] and flat == [-2.0, -3.0, -4.0]  # nothing appended
        return
    n, ignored = parse_into(payload, PlainForm.of(FEATURES), RECV_TS, LIMITS, ts, flat)
    assert (n, ignored) == (len(want.readings), want.ignored_names)
    assert ts[1:] == [r.ts for r in want.readings]
    assert np.array_equal(
        np.array(flat[3:], np.float64),
        np.array([v for r in want.readings for v in r.values], np.float64),
    )


def test_the_fast_reading_leaves_what_it_does_not_read_to_the_full_one() -> None:
    form = PlainForm.of(FEATURES)
    leave = [
        b'{"ts": "2024-01-01T00:00:00Z", "values": [1, 2, 3]}',  # ISO time
        b'{"values": {"a": 1, "b": 2, "c": 3, "x": 4}}',  # a name to count as ignored
        b'{"values": [1, 2, true]}',  # a boolean is not a reading
        b'{"values": [1, 2, 3.5e38]}',  # beyond float32
        b'[{"values": [1, 2, 3]}, {"values": [1, 2, 3]}]',  # batch samples need a ts
        b"7",  # a bare number: one-feature models only
    ]
    for payload in leave:
        ts: list[float] = []
        flat: list[float] = []
        assert read_plain(decode_json(payload), form, RECV_TS, LIMITS, ts, flat) == 0, payload
        assert ts == [] and flat == []


def test_plain_form_of_one_feature_picks_a_one_tuple() -> None:
    ts: list[float] = []
    flat: list[float] = []
    form = PlainForm.of(("only",))
    assert parse_into(b'{"ts": 5, "values": {"only": 2}}', form, RECV_TS, LIMITS, ts, flat) == (
        1,
        0,
    )
    assert (ts, flat) == ([5.0], [2])
    assert math.isclose(PlainForm.of(("only",)).pick({"only": 1.5})[0], 1.5)
