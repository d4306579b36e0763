"""Parse one MQTT message into timestamped readings, or a rejection reason.

Accepted forms: ``{"ts": T, "values": {"name": number, ...}}``, ``values`` as a
list in the model's feature order, a bare number (one-feature models), and a
JSON list of such objects (a batch for one stream, in time order). ``ts`` is
epoch seconds or milliseconds, or ISO 8601 text; absent means receive time.
Every failure is a :class:`~detector.errors.PayloadError` with a closed reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from detector.errors import PayloadError

# Epoch numbers above this are taken as milliseconds (1e11 s is the year 5138).
_MS_THRESHOLD: Final = 1e11
# The model computes in float32: a larger magnitude would become infinity there.
_FLOAT32_MAX: Final = 3.4028234663852886e38


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
    """Parse one payload for a model with these ``features`` (``index``: name -> column).

    >>> m = parse_message(b'{"ts": 10, "values": {"a": 1, "b": 2, "z": 0}}', ["a", "b"],
    ...                   {"a": 0, "b": 1}, recv_ts=99.0)
    >>> m.readings[0], m.ignored_names
    (Reading(ts=10.0, values=[1.0, 2.0]), 1)
    """
    if len(payload) > limits.max_bytes:
        raise PayloadError("too_large", f"{len(payload)} bytes > {limits.max_bytes}")
    try:
        doc: Any = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, over-long integer literals
        raise PayloadError("decode", f"not JSON ({type(exc).__name__})") from None
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
