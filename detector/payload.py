"""Parse one MQTT message into timestamped readings, or a rejection reason.

Accepted forms: ``{"ts": T, "values": {"name": number, ...}}``, ``values`` as a
list in the model's feature order, a bare number (one-feature models), and a
JSON list of such objects (a batch for one stream, in time order). ``ts`` is
epoch seconds or milliseconds, or ISO 8601 text; absent means receive time.
Every failure is a :class:`~detector.errors.PayloadError` with a closed reason.
:func:`parse_into` is the daemon's parser: it decodes a message once, reads the plain
forms the fast way (:func:`read_plain`) and the rest the full way (:func:`read_doc`);
:func:`parse_message` is the full reading alone.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from detector.errors import PayloadError

# Epoch numbers above this are taken as milliseconds (1e11 s is the year 5138).
_MS_THRESHOLD: Final = 1e11
# The model computes in float32: a larger magnitude would become infinity there.
_FLOAT32_MAX: Final = 3.4028234663852886e38
_FLOAT64_MAX: Final = sys.float_info.max


def parse_timestamp(value: object) -> float:
    """Epoch seconds from a number (s or ms) or ISO 8601 text; ValueError otherwise.

    Naive ISO times are taken as UTC.

    >>> parse_timestamp("2024-01-01T00:00:00Z")
    1704067200.0
    >>> parse_timestamp(1704067200000)
    1704067200.0
    """
    if isinstance(value, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(value, (int, float)):
        try:
            ts = float(value)
        except OverflowError:
            raise ValueError("timestamp is too large") from None
    elif isinstance(value, str):
        text = value.strip()
        try:
            ts = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"not a timestamp: {value!r}") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    else:
        raise ValueError(f"not a timestamp: {value!r}")
    if not math.isfinite(ts):
        raise ValueError("timestamp is not finite")
    return ts / 1000.0 if abs(ts) > _MS_THRESHOLD else ts


@dataclass(frozen=True)
class Reading:
    """One sample of one stream: epoch seconds and the values in feature order."""

    ts: float
    values: list[float]


@dataclass(frozen=True)
class ParsedMessage:
    readings: list[Reading]
    ignored_names: int  # value names the model does not know (counted, not fatal)


@dataclass(frozen=True)
class PayloadLimits:
    max_bytes: int = 65536
    max_samples: int = 1000  # samples in one batch message
    max_ahead_s: float = 300.0  # a sample's ts this far past its receipt is bad_timestamp
    # (clock skew allowed for); so is a ts at or before 1970-01-01


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError("schema", f"{what} is not a number")
    try:
        out = float(value)
    except OverflowError:
        raise PayloadError("non_finite", f"{what} is too large for a float") from None
    if not math.isfinite(out):
        raise PayloadError("non_finite", f"{what} is not finite")
    if abs(out) > _FLOAT32_MAX:
        raise PayloadError("non_finite", f"{what} is beyond the model's float32 range")
    return out


def _reject_constant(name: str) -> float:
    # json.loads calls this for NaN / Infinity / -Infinity, which are not JSON.
    raise PayloadError("non_finite", f"{name} is not a finite number")


def _sample(
    item: object, features: Sequence[str], index: Mapping[str, int], recv_ts: float | None
) -> tuple[Reading, int]:
    if not isinstance(item, dict):
        if len(features) == 1 and not isinstance(item, (list, str)) and item is not None:
            return Reading(_ts_or(recv_ts), [_number(item, "value")]), 0
        raise PayloadError("schema", "expected an object with 'values'")
    if "values" not in item:
        raise PayloadError("schema", "object has no 'values'")
    raw_ts = item.get("ts")
    if raw_ts is None:
        ts = _ts_or(recv_ts)
    else:
        try:
            ts = parse_timestamp(raw_ts)
        except ValueError as exc:
            raise PayloadError("bad_timestamp", str(exc)) from None
    values = item["values"]
    ignored = 0
    if isinstance(values, dict):
        out = [math.nan] * len(features)
        for name, value in values.items():
            i = index.get(name)
            if i is None:
                ignored += 1
                continue
            out[i] = _number(value, f"value {name!r}")
        missing = [features[i] for i, v in enumerate(out) if math.isnan(v)]
        if missing:
            raise PayloadError("schema", f"missing value(s) for {', '.join(missing[:5])}")
    elif isinstance(values, list):
        if len(values) != len(features):
            raise PayloadError(
                "schema", f"values has {len(values)} entries, the model has {len(features)}"
            )
        out = [_number(v, f"values[{i}]") for i, v in enumerate(values)]
    elif len(features) == 1:
        out = [_number(values, "value")]
    else:
        raise PayloadError("schema", "'values' must be an object or a list")
    return Reading(ts, out), ignored


# One decoder for every message: json.loads(payload, parse_constant=...) builds a new
# decoder and scanner per call, which costs about as much as decoding a small message.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN: Final[Callable[[str, int], tuple[Any, int]]] = _DECODER.scan_once  # type: ignore[attr-defined]
_JSON_SPACE: Final = " \t\n\r"
_NUMBER_TYPES: Final = frozenset((int, float))  # exact types: a bool is not a reading


def decode_json(payload: bytes) -> Any:
    """``json.loads(payload)`` with NaN and Infinity rejected as ``non_finite``; the same
    errors (``ValueError``, ``RecursionError``) for anything that is not one JSON document.

    >>> decode_json(b'{"ts": 1, "values": [2.5]}')
    {'ts': 1, 'values': [2.5]}
    """
    if payload[:1] in (b"{", b"[") and payload[1:2] != b"\x00":
        # What json.detect_encoding says of any such start (no BOM, not UTF-16/32); and
        # no leading space, so the scanner starts at 0 (json.loads: decode -> raw_decode).
        text = payload.decode("utf-8", "surrogatepass")
        try:
            doc, end = _SCAN(text, 0)
        except StopIteration as exc:
            raise json.JSONDecodeError("Expecting value", text, exc.value) from None
        if end != len(text) and text[end:].strip(_JSON_SPACE):
            raise json.JSONDecodeError("Extra data", text, end)
        return doc
    return _DECODER.decode(payload.decode(json.detect_encoding(payload), "surrogatepass"))


@dataclass(frozen=True)
class PlainForm:
    """What :func:`parse_into` needs to know of a model's features, made once per model."""

    features: tuple[str, ...]
    pick: Callable[[dict[str, Any]], Any]  # values object -> its values in feature order
    index: Mapping[str, int]  # name -> column

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, features: tuple[str, ...]) -> PlainForm:
        index = {name: i for i, name in enumerate(features)}
        if len(features) == 1:
            name = features[0]
            return cls(features, lambda values: (values[name],), index)
        return cls(features, operator.itemgetter(*features), index)


def _plain_sample(
    item: Any, form: PlainForm, recv_ts: float | None, ts_out: list[float],
    values_out: list[float],
) -> bool:  # fmt: skip
    """Append one sample in its plain form (numeric ``ts`` or none, every feature once as a
    number within float32's range, nothing else); False, appending nothing, otherwise."""
    if type(item) is not dict:
        return False
    values = item.get("values")
    if type(values) is dict:
        if len(values) != len(form.features):
            return False  # unknown names (to count) or missing ones (to reject)
        try:
            row = form.pick(values)
        except KeyError:
            return False
    elif type(values) is list:
        if len(values) != len(form.features):
            return False
        row = values
    else:
        return False
    # Numbers only (exact types), and finite within float32: huge ints compare exactly.
    if not _NUMBER_TYPES.issuperset(map(type, row)) or not max(map(abs, row)) <= _FLOAT32_MAX:
        return False
    raw_ts = item.get("ts")
    if raw_ts is None:
        if recv_ts is None:
            return False
        ts = recv_ts
    elif type(raw_ts) is float or type(raw_ts) is int:
        if not abs(raw_ts) <= _FLOAT64_MAX:  # inf (from 1e999), an int beyond float's range
            return False
        ts = float(raw_ts)
        if abs(ts) > _MS_THRESHOLD:
            ts /= 1000.0
    else:
        return False  # ISO text and the rest: parse_timestamp
    ts_out.append(ts)
    values_out.extend(row)
    return True


def _plain_batch(
    doc: list[Any], form: PlainForm, ts_out: list[float], values_out: list[float]
) -> bool:
    """``_plain_sample`` for every item of a batch at once, when all are alike (every
    item an object with a numeric ``ts`` and ``values`` of one form): a few C-level passes
    over the whole batch instead of a Python call per sample. False appends nothing."""
    n = len(form.features)
    try:
        values = [item["values"] for item in doc]
        stamps = [item["ts"] for item in doc]
    except (KeyError, TypeError, IndexError):  # an item that is no object, or lacks one
        return False
    kinds = set(map(type, values))
    if kinds == {dict}:
        if set(map(len, values)) != {n}:
            return False
        try:
            rows: list[Any] = list(map(form.pick, values))
        except KeyError:
            return False
    elif kinds == {list} and set(map(len, values)) == {n}:
        rows = values
    else:
        return False
    flat = list(itertools.chain.from_iterable(rows))
    if not _NUMBER_TYPES.issuperset(map(type, flat)) or not max(map(abs, flat)) <= _FLOAT32_MAX:
        return False
    if not _NUMBER_TYPES.issuperset(map(type, stamps)) or not (
        max(map(abs, stamps)) <= _FLOAT64_MAX
    ):
        return False
    ts_out.extend([t / 1000.0 if abs(t) > _MS_THRESHOLD else float(t) for t in stamps])
    values_out.extend(flat)
    return True


def read_plain(
    doc: Any, form: PlainForm, recv_ts: float, limits: PayloadLimits,
    ts_out: list[float], values_out: list[float],
) -> int:  # fmt: skip
    """The fast reading of a decoded message in a plain form: append its samples to
    ``ts_out`` and ``values_out`` (flat, ``len(form.features)`` values a sample, in feature
    order; ints stay ints, to become float64 in one numpy call) and return how many. 0
    appends nothing: the message is not plain, and :func:`read_doc` reads it (or says why
    not). Whatever this reading accepts, ``read_doc`` reads the same."""
    if type(doc) is not list:
        return 1 if _plain_sample(doc, form, recv_ts, ts_out, values_out) else 0
    if not doc or len(doc) > limits.max_samples:
        return 0
    if len(doc) > 1 and _plain_batch(doc, form, ts_out, values_out):
        return len(doc)
    stamp = recv_ts if len(doc) == 1 else None
    n_ts, n_values = len(ts_out), len(values_out)
    for item in doc:
        if not _plain_sample(item, form, stamp, ts_out, values_out):
            del ts_out[n_ts:], values_out[n_values:]
            return 0
    return len(doc)


_ONE_SAMPLE: Final = (1, 0)


def parse_into(
    payload: bytes, form: PlainForm, recv_ts: float, limits: PayloadLimits,
    ts_out: list[float], values_out: list[float],
) -> tuple[int, int]:  # fmt: skip
    """The daemon's parser: decode a message once, append its samples to ``ts_out`` and
    ``values_out`` (as :func:`read_plain`) and return (samples, value names ignored); a
    message that cannot be read raises PayloadError and appends nothing.

    The plain forms take the fast reading; the rest (ISO timestamps, value names the model
    does not know, a bare number, every rejection) the full one, on the same decoded document.

    >>> ts, values, form = [], [], PlainForm.of(("a", "b"))
    >>> parse_into(b'{"ts": 10, "values": {"b": 2, "a": 1.5}}', form, 99.0, PayloadLimits(),
    ...            ts, values), ts, values
    ((1, 0), [10.0], [1.5, 2])
    >>> parse_into(b'{"ts": "1970-01-01T00:00:20Z", "values": {"a": 1, "b": 2, "z": 3}}',
    ...            form, 99.0, PayloadLimits(), ts, values), ts
    ((1, 1), [10.0, 20.0])
    """
    if len(payload) > limits.max_bytes:
        raise PayloadError("too_large", f"{len(payload)} bytes > {limits.max_bytes}")
    try:
        doc = decode_json(payload)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, over-long integer literals
        raise PayloadError("decode", f"not JSON ({type(exc).__name__})") from None
    if type(doc) is not list:  # the usual message, read here without another call
        if _plain_sample(doc, form, recv_ts, ts_out, values_out):
            return _ONE_SAMPLE
    else:
        k = read_plain(doc, form, recv_ts, limits, ts_out, values_out)
        if k:
            return k, 0
    parsed = read_doc(doc, form.features, form.index, recv_ts, limits)
    for reading in parsed.readings:
        ts_out.append(reading.ts)
        values_out.extend(reading.values)
    return len(parsed.readings), parsed.ignored_names


def _decode(payload: bytes, limits: PayloadLimits) -> Any:
    if len(payload) > limits.max_bytes:
        raise PayloadError("too_large", f"{len(payload)} bytes > {limits.max_bytes}")
    try:
        return decode_json(payload)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, over-long integer literals
        raise PayloadError("decode", f"not JSON ({type(exc).__name__})") from None


def _ts_or(recv_ts: float | None) -> float:
    if recv_ts is None:
        raise PayloadError("schema", "batch samples need a 'ts'")
    return recv_ts


def parse_message(
    payload: bytes,
    features: Sequence[str],
    index: Mapping[str, int],
    recv_ts: float,
    limits: PayloadLimits = PayloadLimits(),
) -> ParsedMessage:
    """Parse one payload for a model with these ``features`` (``index``: name -> column),
    by the full reading alone (:func:`read_doc`).

    >>> m = parse_message(b'{"ts": 10, "values": {"a": 1, "b": 2, "z": 0}}', ["a", "b"],
    ...                   {"a": 0, "b": 1}, recv_ts=99.0)
    >>> m.readings[0], m.ignored_names
    (Reading(ts=10.0, values=[1.0, 2.0]), 1)
    """
    return read_doc(_decode(payload, limits), features, index, recv_ts, limits)


def read_doc(
    doc: Any,
    features: Sequence[str],
    index: Mapping[str, int],
    recv_ts: float,
    limits: PayloadLimits = PayloadLimits(),
) -> ParsedMessage:
    """The full reading of a decoded message: every form, every rejection with its reason."""
    if isinstance(doc, list):
        if not doc:
            raise PayloadError("schema", "empty batch")
        if len(doc) > limits.max_samples:
            raise PayloadError("too_large", f"{len(doc)} samples > {limits.max_samples}")
        readings = []
        ignored = 0
        stamp = recv_ts if len(doc) == 1 else None
        for item in doc:
            reading, extra = _sample(item, features, index, stamp)
            readings.append(reading)
            ignored += extra
        return ParsedMessage(readings, ignored)
    reading, extra = _sample(doc, features, index, recv_ts)
    return ParsedMessage([reading], extra)
