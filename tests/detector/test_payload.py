"""detector.payload: every accepted message form and every rejection reason."""

from __future__ import annotations

import json

import pytest

from detector.errors import REJECTION_REASONS, PayloadError, RnnsentryError
from detector.payload import ParsedMessage, PayloadLimits, Reading, parse_message, parse_timestamp

FEATURES = ["a", "b"]
INDEX = {"a": 0, "b": 1}
RECV_TS = 1_700_000_000.5
# 2024-01-01T00:00:00Z: 54 years after 1970, 13 of them leap (1972 .. 2020).
NEW_YEAR_2024 = float((54 * 365 + 13) * 86_400)


def parse(payload: bytes | str, features: list[str] | None = None, **limits: int) -> ParsedMessage:
    feats = FEATURES if features is None else features
    data = payload.encode() if isinstance(payload, str) else payload
    return parse_message(
        data, feats, {n: i for i, n in enumerate(feats)}, RECV_TS, PayloadLimits(**limits)
    )


def reject(payload: bytes | str, features: list[str] | None = None, **limits: int) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        parse(payload, features, **limits)
    assert info.value.reason in REJECTION_REASONS
    return info.value


# --- accepted forms ---


def test_object_with_named_values_in_feature_order() -> None:
    msg = parse('{"ts": 10, "values": {"b": -2, "a": 1.5}}')
    assert msg.readings == [Reading(10.0, [1.5, -2.0])]
    assert msg.ignored_names == 0


def test_unknown_value_names_are_counted_not_fatal() -> None:
    msg = parse('{"ts": 10, "values": {"a": 1, "x": 9, "b": 2, "y": 8}}')
    assert msg.readings[0].values == [1.0, 2.0]
    assert msg.ignored_names == 2


def test_a_missing_value_name_is_a_schema_error_naming_it() -> None:
    err = reject('{"ts": 10, "values": {"a": 1, "x": 2}}')
    assert err.reason == "schema"
    assert "b" in err.detail


def test_list_values_follow_feature_order() -> None:
    msg = parse('{"ts": 10, "values": [3, 4.25]}')
    assert msg.readings == [Reading(10.0, [3.0, 4.25])]
    assert msg.ignored_names == 0


@pytest.mark.parametrize("values", ["[1]", "[1, 2, 3]", "[]"])
def test_list_values_of_the_wrong_length_are_schema_errors(values: str) -> None:
    assert reject(f'{{"ts": 10, "values": {values}}}').reason == "schema"


def test_bare_number_for_a_one_feature_model_uses_receive_time() -> None:
    msg = parse("2.5", features=["temp"])
    assert msg.readings == [Reading(RECV_TS, [2.5])]


def test_scalar_values_field_for_a_one_feature_model() -> None:
    assert parse('{"ts": 7, "values": -1}', features=["temp"]).readings == [Reading(7.0, [-1.0])]


def test_bare_number_for_a_multi_feature_model_is_a_schema_error() -> None:
    assert reject("2.5").reason == "schema"
    assert reject('{"ts": 7, "values": 3}').reason == "schema"


def test_batch_of_objects_keeps_order_and_sums_ignored_names() -> None:
    msg = parse(
        '[{"ts": 1, "values": [1, 2]}, {"ts": 2, "values": {"a": 3, "b": 4, "z": 0}},'
        ' {"ts": 3, "values": {"a": 5, "b": 6, "y": 0, "z": 0}}]'
    )
    assert msg.readings == [
        Reading(1.0, [1.0, 2.0]),
        Reading(2.0, [3.0, 4.0]),
        Reading(3.0, [5.0, 6.0]),
    ]
    assert msg.ignored_names == 3


def test_one_element_batch_without_ts_uses_receive_time() -> None:
    assert parse('[{"values": [1, 2]}]').readings == [Reading(RECV_TS, [1.0, 2.0])]
    assert parse("[4]", features=["temp"]).readings == [Reading(RECV_TS, [4.0])]


def test_longer_batch_needs_ts_on_every_sample() -> None:
    assert reject('[{"ts": 1, "values": [1, 2]}, {"values": [3, 4]}]').reason == "schema"
    assert reject("[4, 5]", features=["temp"]).reason == "schema"


def test_empty_batch_is_a_schema_error() -> None:
    assert reject("[]").reason == "schema"


# --- timestamps ---


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("1704067200", NEW_YEAR_2024),
        ("1704067200.25", NEW_YEAR_2024 + 0.25),
        ("1704067200000", NEW_YEAR_2024),  # epoch milliseconds
        ("1704067200250", NEW_YEAR_2024 + 0.25),
        ('"1704067200"', NEW_YEAR_2024),  # numeric text
        ('"2024-01-01T00:00:00Z"', NEW_YEAR_2024),
        ('"2024-01-01T00:00:00.5Z"', NEW_YEAR_2024 + 0.5),
        ('"2024-01-01T02:00:00+02:00"', NEW_YEAR_2024),
        ('"2023-12-31T19:30:00-04:30"', NEW_YEAR_2024),
        ('"2024-01-01T00:00:00"', NEW_YEAR_2024),  # naive: taken as UTC
        ('"2024-01-01T00:01:40"', NEW_YEAR_2024 + 100.0),
    ],
)
def test_timestamp_forms(ts: str, expected: float) -> None:
    reading = parse(f'{{"ts": {ts}, "values": [0, 0]}}').readings[0]
    assert reading.ts == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("doc", ['{"values": [0, 0]}', '{"ts": null, "values": [0, 0]}'])
def test_missing_ts_means_receive_time(doc: str) -> None:
    assert parse(doc).readings[0].ts == RECV_TS


def test_parse_timestamp_seconds_and_milliseconds_agree() -> None:
    assert parse_timestamp(1_600_000_000) == 1_600_000_000.0
    assert parse_timestamp(1_600_000_000_000) == 1_600_000_000.0
    assert parse_timestamp(-1_600_000_000_000) == -1_600_000_000.0


@pytest.mark.parametrize(
    "value", [True, False, None, [1], {"t": 1}, "yesterday", "", "nan", "1e999", float("inf")]
)
def test_parse_timestamp_rejects_with_value_error(value: object) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(value)


@pytest.mark.parametrize("ts", ['"yesterday"', "true", "[1]", '{"s": 1}', '"nan"', "1e999", '""'])
def test_unreadable_ts_is_bad_timestamp(ts: str) -> None:
    assert reject(f'{{"ts": {ts}, "values": [0, 0]}}').reason == "bad_timestamp"


def test_ts_integer_beyond_float_range_is_bad_timestamp() -> None:
    # BUG: float() of a 401-digit integer raises OverflowError, which escapes parse_message.
    assert reject('{"ts": 1' + "0" * 400 + ', "values": [0, 0]}').reason == "bad_timestamp"


# --- rejections ---


@pytest.mark.parametrize(
    "payload",
    [
        b'{"values": [1, "\xff"]}',  # invalid UTF-8
        b"\xc3\x28",  # invalid UTF-8
        b"",
        b"not json",
        b'{"values": [1, 2]',
        b"{'values': [1, 2]}",
        b"[" * 50_000 + b"]" * 50_000,  # nesting deeper than the recursion limit
    ],
)
def test_undecodable_payloads(payload: bytes) -> None:
    assert reject(payload, max_bytes=1_000_000).reason == "decode"


@pytest.mark.parametrize(
    "doc",
    [
        '"hello"',
        "null",
        "{}",
        '{"ts": 1}',
        '{"ts": 1, "values": "1, 2"}',
        '{"ts": 1, "values": null}',
        '{"ts": 1, "values": [1, "2"]}',
        '{"ts": 1, "values": [1, null]}',
        '{"ts": 1, "values": [1, [2]]}',
        '{"ts": 1, "values": {"a": 1, "b": "2"}}',
        '{"ts": 1, "values": {"a": 1, "b": null}}',
        "[1, 2]",
        '[{"ts": 1, "values": [1, 2]}, "x"]',
    ],
)
def test_wrongly_shaped_json_is_a_schema_error(doc: str) -> None:
    assert reject(doc).reason == "schema"


@pytest.mark.parametrize(
    "doc",
    [
        '{"ts": 1, "values": [true, 1]}',
        '{"ts": 1, "values": [0, false]}',
        '{"ts": 1, "values": {"a": 1, "b": false}}',
    ],
)
def test_booleans_are_not_numbers(doc: str) -> None:
    assert reject(doc).reason == "schema"


@pytest.mark.parametrize("doc", ["true", "false", '{"ts": 1, "values": true}', "[false]"])
def test_booleans_are_not_numbers_for_one_feature_models(doc: str) -> None:
    assert reject(doc, features=["a"]).reason == "schema"


@pytest.mark.parametrize(
    "doc",
    [
        '{"ts": 1, "values": [NaN, 1]}',
        '{"ts": 1, "values": [1, Infinity]}',
        '{"ts": 1, "values": {"a": -Infinity, "b": 0}}',
        '{"ts": 1, "values": [1e999, 1]}',
        '{"ts": 1, "values": {"a": 0, "b": -1e999}}',
        '{"ts": NaN, "values": [1, 1]}',
    ],
)
def test_non_finite_values(doc: str) -> None:
    assert reject(doc).reason == "non_finite"


def test_bare_nan_for_a_one_feature_model_is_non_finite() -> None:
    assert reject("NaN", features=["a"]).reason == "non_finite"
    assert reject("1e999", features=["a"]).reason == "non_finite"


def test_integer_value_beyond_float_range_is_non_finite() -> None:
    # BUG: float() of a 401-digit integer raises OverflowError, which escapes parse_message.
    assert reject('{"ts": 1, "values": [1' + "0" * 400 + ", 2]}").reason == "non_finite"


def test_integer_literal_longer_than_python_allows_is_rejected() -> None:
    # BUG: json.loads raises ValueError (int max str digits, 4300) that escapes parse_message.
    err = reject(b"1" * 5000, features=["a"])
    assert err.reason in ("decode", "non_finite")


def test_payload_over_max_bytes_is_too_large_and_at_max_bytes_is_fine() -> None:
    doc = json.dumps({"ts": 1, "values": [1, 2]}).encode()
    assert len(parse(doc, max_bytes=len(doc)).readings) == 1
    err = reject(doc, max_bytes=len(doc) - 1)
    assert err.reason == "too_large"


def test_size_is_checked_before_decoding() -> None:
    assert reject(b"\xff" * 101, max_bytes=100).reason == "too_large"


def test_batch_over_max_samples_is_too_large() -> None:
    batch = [{"ts": i, "values": [i, i]} for i in range(1, 6)]
    assert len(parse(json.dumps(batch), max_samples=5).readings) == 5
    assert reject(json.dumps(batch), max_samples=4).reason == "too_large"


# --- the error type ---


def test_payload_error_carries_reason_and_detail() -> None:
    err = PayloadError("schema", "no values")
    assert isinstance(err, RnnsentryError)
    assert (err.reason, err.detail, str(err)) == ("schema", "no values", "schema: no values")


def test_payload_error_refuses_reasons_outside_the_closed_set() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        PayloadError("bad_vibes", "x")


@pytest.mark.parametrize("value", ["3.5e38", "-1e39", "1.7976931348623157e308"])
def test_values_beyond_float32_are_non_finite(value: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_message(f'{{"values": [{value}]}}'.encode(), ["a"], {"a": 0}, recv_ts=1.0)
    assert info.value.reason == "non_finite"
