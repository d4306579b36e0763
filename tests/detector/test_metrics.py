"""The bulk-observed histograms read exactly like prometheus-client's own, and the
metric names of the contract are all there."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from detector.metrics import _LATENCY_BUCKETS, BatchHistogram, Metrics

NAME = "rnnsentry_decision_latency_seconds"
DOC = "From receiving a message to its decision"


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


amounts = st.floats(min_value=-1.0, max_value=10.0) | st.sampled_from(list(_LATENCY_BUCKETS))


@settings(database=None, deadline=None)
@given(batches=st.lists(st.lists(amounts, max_size=20), max_size=6), singles=st.lists(amounts))
def test_exposition_matches_prometheus_histogram(
    batches: list[list[float]], singles: list[float]
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram(NAME, DOC, buckets=_LATENCY_BUCKETS, registry=theirs)
    bulk = BatchHistogram(NAME, DOC, _LATENCY_BUCKETS, ours)
    for batch in batches:
        for amount in batch:
            reference.observe(amount)
        bulk.observe_many(np.asarray(batch, dtype=np.float64))
    for amount in singles:
        reference.observe(amount)
        bulk.observe(amount)
    want, got = _without_created(generate_latest(theirs)), _without_created(generate_latest(ours))
    # The sum is added up in another order: equal to rounding.
    assert [w for w in want if "_sum" not in w] == [g for g in got if "_sum" not in g]
    (want_sum,) = [float(w.split()[-1]) for w in want if w.startswith(NAME + "_sum")]
    (got_sum,) = [float(g.split()[-1]) for g in got if g.startswith(NAME + "_sum")]
    assert np.isclose(want_sum, got_sum, rtol=1e-9, atol=1e-12)


def test_created_is_exposed_like_prometheus_client() -> None:
    registry = CollectorRegistry()
    BatchHistogram("x_seconds", "X", (0.1, 1.0), registry)
    assert registry.get_sample_value("x_seconds_created") is not None
    assert registry.get_sample_value("x_seconds_count") == 0.0


def test_contract_histograms_keep_their_names() -> None:
    m = Metrics()
    m.batch_size.observe_many(np.array([3.0]))
    m.inference_seconds.observe(0.001)
    m.decision_latency.observe_many(np.array([0.0004, 0.003, 0.2]))
    get = m.registry.get_sample_value
    assert get("rnnsentry_batch_size_bucket", {"le": "4.0"}) == 1.0
    assert get("rnnsentry_inference_seconds_count") == 1.0
    assert get("rnnsentry_decision_latency_seconds_bucket", {"le": "0.0005"}) == 1.0
    assert get("rnnsentry_decision_latency_seconds_bucket", {"le": "+Inf"}) == 3.0
    assert get("rnnsentry_decision_latency_seconds_sum") == 0.0004 + 0.003 + 0.2
