"""The daemon's message path on anything at all: ``Daemon.process`` never raises, and every
message is counted, as its scored samples or as exactly one rejection."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.config import build_config
from detector.daemon import Daemon
from detector.errors import REJECTION_REASONS, PayloadError
from detector.link import Inbound
from detector.metrics import OUTCOMES
from detector.payload import parse_message
from detector.publisher import publishable
from tests.support import TINY_FEATURES, train_tiny_model

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
MAX_BYTES = 4096
MAX_SAMPLES = 8
# Rejections the engine makes per sample, after parsing (the timestamp checks, NaN out).
ENGINE_REASONS = frozenset({"out_of_order", "duplicate", "model_non_finite"})


@pytest.fixture(scope="module")
def one_feature_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "meter.onnx"
    train_tiny_model(out, cell="rnn", hidden=4, epochs=1, one_feature=True)
    return out


@pytest.fixture(scope="module")
def daemon(tiny_model: Path, one_feature_model: Path) -> Daemon:
    """A daemon with its models loaded but never started: no broker, no threads."""
    config, problems = build_config({
        "models": [{"path": str(tiny_model), "topics": ["sensors/{stream}"]},
                   {"path": str(one_feature_model),
                    "topics": ["plant/{site}/{machine}/meter"]}],
        "metrics": {"enabled": False},
        "daemon": {"workers": 0},  # scored in this process, by process()
        "scoring": {"warmup_steps": 2},
        "payload": {"max_bytes": MAX_BYTES, "max_samples": MAX_SAMPLES},
    })  # fmt: skip
    assert problems == []
    made = Daemon(config)
    made._install(made._load_models())
    return made


# --- strategies ---
# Half well-formed, half anything: junk alone would hardly ever reach the network.
# Floats stay within float32's range (the model's input type); beyond it, see the test below.

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)  # to 3.4e38: NaN outputs
plausible = st.floats(min_value=-1e3, max_value=1e3)  # values a pump could report
numbers = (
    plausible
    | finite
    | st.floats(width=32)  # NaN and infinities too: json.dumps writes NaN / Infinity
    | st.integers(min_value=-(10**20), max_value=10**20)
)
# Few streams and close timestamps, so duplicates and out-of-order samples are common.
near_ts = st.integers(min_value=1_700_000_000, max_value=1_700_000_030)
timestamps = (
    near_ts
    | st.none()
    | numbers
    | st.integers(min_value=1_600_000_000_000, max_value=1_800_000_000_000)  # milliseconds
    | st.sampled_from(["2023-11-14T22:13:20Z", "2023-11-15T00:13:21+02:00", "soon", ""])
)
names = st.sampled_from([*TINY_FEATURES, "value", "extra"]) | st.text(max_size=5)
json_any = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=20,
)

good_values = (
    st.lists(plausible | finite, min_size=4, max_size=4)
    | st.fixed_dictionaries({f: plausible for f in TINY_FEATURES}, optional={"extra": numbers})
    | plausible  # right for the one-feature model only
)
good_sample = st.fixed_dictionaries({"values": good_values}, optional={"ts": near_ts})
good_documents = good_sample | st.lists(good_sample, min_size=1, max_size=4) | plausible

any_values = numbers | st.lists(numbers, max_size=5) | st.dictionaries(names, numbers) | json_any
any_sample = st.fixed_dictionaries({"values": any_values}, optional={"ts": timestamps})
any_documents = (
    any_sample
    | st.lists(any_sample, min_size=1, max_size=MAX_SAMPLES + 2)
    | json_any
    | st.dictionaries(st.sampled_from(["ts", "values"]), json_any, max_size=2)
)


def _encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


payloads = st.one_of(
    good_documents.map(_encode),
    good_documents.map(_encode),
    any_documents.map(_encode),
    any_documents.map(_encode).map(lambda b: b[: len(b) // 2]),  # cut short
    st.binary(max_size=64),
    st.just(b"[" + b" " * MAX_BYTES + b"]"),  # over the size limit
)
good_topics = st.sampled_from(["sensors/a", "sensors/b", "sensors/x/y", "plant/n/p1/meter"])
topics = st.one_of(
    good_topics,
    st.sampled_from(["sensors", "sensors/", "plant//p1/meter", "elsewhere/a", ""])
    | st.builds("sensors/{}".format, st.text(min_size=1, max_size=8))
    | st.text(max_size=12),
)

_clock = itertools.count()


def _receive_time() -> float:
    """Receive times that move on from call to call, as a wall clock would."""
    return 1_700_000_000.0 + next(_clock)


# --- the property ---


def _counts(daemon: Daemon) -> tuple[dict[str, float], dict[str, float]]:
    registry = daemon.metrics.registry
    outcomes = {
        o: registry.get_sample_value("rnnsentry_messages_total", {"outcome": o}) or 0.0
        for o in OUTCOMES
    }
    reasons = {
        r: registry.get_sample_value("rnnsentry_rejections_total", {"reason": r}) or 0.0
        for r in REJECTION_REASONS
    }
    return outcomes, reasons


def _expected(daemon: Daemon, batch: list[Inbound]) -> tuple[int, Counter[str]]:
    """Samples the batch holds (a message that cannot be parsed counts as one), and the
    reasons the messages that cannot be parsed or routed must be rejected for."""
    samples = 0
    reasons: Counter[str] = Counter()
    for topic, payload, received, _ in batch:
        route = daemon.router.route(topic)
        if route is None:
            samples += 1
            reasons["unknown_route"] += 1
            continue
        if not publishable(route[1], daemon.config.mqtt):  # a wildcard, or far too long
            samples += 1
            reasons["unpublishable"] += 1
            continue
        model = daemon.engines[route[0]].model
        try:
            parsed = parse_message(payload, model.meta.features, model.feature_index, received,
                                   daemon.config.payload)  # fmt: skip
        except PayloadError as exc:
            samples += 1
            reasons[exc.reason] += 1
            continue
        samples += len(parsed.readings)
        ahead = received + daemon.config.payload.max_ahead_s  # the stage's time window
        reasons["bad_timestamp"] += sum(not 0.0 < r.ts <= ahead for r in parsed.readings)
    return samples, reasons


@FUZZ
@given(messages=st.lists(st.tuples(topics, payloads), min_size=1, max_size=6))
def test_any_batch_is_counted_in_full_and_never_raises(
    daemon: Daemon, messages: list[tuple[str, bytes]]
) -> None:
    batch = [(topic, payload, _receive_time(), False) for topic, payload in messages]
    samples, reasons = _expected(daemon, batch)
    outcomes_before, reasons_before = _counts(daemon)

    daemon.process(batch)

    outcomes_after, reasons_after = _counts(daemon)
    delta = {o: outcomes_after[o] - outcomes_before[o] for o in OUTCOMES}
    by_reason = {r: reasons_after[r] - reasons_before[r] for r in REJECTION_REASONS}
    assert delta["dropped"] == 0
    assert delta["scored"] + delta["rejected"] == samples
    assert sum(by_reason.values()) == delta["rejected"]  # every rejection has its reason
    for reason in REJECTION_REASONS:  # the engine may add its own; the others are exact
        if reason not in ENGINE_REASONS:
            assert by_reason[reason] == reasons[reason], (reason, by_reason)


@pytest.mark.parametrize("value", [3.5e38, -1e39, 1.7976931348623157e308])
def test_a_value_beyond_float32_is_rejected_as_non_finite(daemon: Daemon, value: float) -> None:
    """Finite in JSON (float64) but infinite as the model's float32 input."""
    payload = json.dumps({"values": [1.0, 2.0, 3.0, value]})
    outcomes_before, reasons_before = _counts(daemon)
    daemon.process([("sensors/huge", payload.encode(), _receive_time(), False)])
    outcomes_after, reasons_after = _counts(daemon)
    assert outcomes_after["rejected"] - outcomes_before["rejected"] == 1
    assert reasons_after["non_finite"] - reasons_before["non_finite"] == 1


# --- a stream's sequence: bad samples never take good ones down ---

_streams = itertools.count()
BAD_SAMPLES = {
    "far future": lambda ts: {"ts": ts + 10**6, "values": [1.0, 2.0, 3.0, 4.0]},
    "year 9999": lambda ts: {"ts": "9999-12-31T23:59:59Z", "values": [1.0, 2.0, 3.0, 4.0]},
    "huge epoch": lambda ts: {"ts": 1e297, "values": [1.0, 2.0, 3.0, 4.0]},
    "before 1970": lambda ts: {"ts": -1e9, "values": [1.0, 2.0, 3.0, 4.0]},
    "zero": lambda ts: {"ts": 0, "values": [1.0, 2.0, 3.0, 4.0]},
    "not a time": lambda ts: {"ts": "soon", "values": [1.0, 2.0, 3.0, 4.0]},
    "short": lambda ts: {"ts": ts, "values": [1.0, 2.0]},
    "no values": lambda ts: {"ts": ts},
    "beyond float32": lambda ts: {"ts": ts, "values": [1.0, 2.0, 3.0, 1e39]},
}


@FUZZ
@given(
    plan=st.lists(st.one_of(st.just("good"), st.sampled_from(sorted(BAD_SAMPLES))),
                  min_size=1, max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=30),
)  # fmt: skip
def test_a_good_sample_is_never_rejected_because_of_a_bad_one_before_it(
    daemon: Daemon, plan: list[str], cuts: list[int]
) -> None:
    """Any interleaving of good samples (in time order) and bad ones on one stream, in any
    batching: every good one is scored, every bad one rejected."""
    k = next(_streams)
    stream, base = f"sensors/seq-{k}", 1_700_000_000.0 + 10_000.0 * k
    messages: list[Inbound] = []
    t = 0
    for kind in plan:
        ts = base + t  # this stream's next time, received as it is sent
        if kind == "good":
            doc: Any = {"ts": ts, "values": [1.0 + t % 3, 2.0, 3.0, 4.0]}
            t += 1
        else:
            doc = BAD_SAMPLES[kind](ts)
        messages.append((stream, json.dumps(doc).encode(), ts, False))
    good = plan.count("good")
    before, _ = _counts(daemon)
    at = 0
    for cut in itertools.cycle(cuts):  # batches of the drawn sizes, in order
        if at >= len(messages):
            break
        daemon.process(messages[at : at + cut])
        at += cut
    after, _ = _counts(daemon)
    assert after["scored"] - before["scored"] == good
    assert after["rejected"] - before["rejected"] == len(plan) - good
