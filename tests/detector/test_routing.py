"""detector.routing: templates to subscription filters, topics to (model, stream id)."""

from __future__ import annotations

import pytest

from detector.routing import Router, TopicTemplate


def test_single_placeholder_stream_takes_one_or_more_levels() -> None:
    t = TopicTemplate.parse("sensors/{stream}")
    assert t.filter == "sensors/#"
    assert t.match("sensors/pump1") == "pump1"
    assert t.match("sensors/hall/pump1") == "hall/pump1"
    assert t.match("sensors") is None
    assert t.match("sensors/") is None
    assert t.match("actuators/pump1") is None
    assert t.match("x/sensors/pump1") is None


def test_named_placeholders_take_exactly_one_level_each() -> None:
    t = TopicTemplate.parse("plant/{site}/{machine}/telemetry")
    assert t.filter == "plant/+/+/telemetry"
    assert t.match("plant/north/p7/telemetry") == "north/p7"
    assert t.match("plant/north/hall/p7/telemetry") is None
    assert t.match("plant/north/p7/telemetry/extra") is None
    assert t.match("plant/north/telemetry") is None
    assert t.match("plant/north/p7/status") is None


def test_one_named_placeholder_is_a_stream_id() -> None:
    t = TopicTemplate.parse("line/{machine}")
    assert t.filter == "line/+"
    assert t.match("line/m1") == "m1"
    assert t.match("line/m1/x") is None


def test_stream_in_the_middle_filters_on_the_prefix() -> None:
    t = TopicTemplate.parse("factory/{stream}/data")
    assert t.filter == "factory/#"
    assert t.match("factory/l1/m2/data") == "l1/m2"
    assert t.match("factory/m2/data") == "m2"
    assert t.match("factory/m2/status") is None
    assert t.match("factory/data") is None


def test_named_levels_before_and_after_stream_join_the_id() -> None:
    t = TopicTemplate.parse("plant/{site}/{stream}/v/{unit}")
    assert t.filter == "plant/+/#"
    assert t.match("plant/n/a/b/v/c") == "n/a/b/c"


def test_whole_topic_as_stream() -> None:
    t = TopicTemplate.parse("{stream}")
    assert t.filter == "#"
    assert t.match("a/b/c") == "a/b/c"


def test_literal_levels_are_not_regular_expressions() -> None:
    t = TopicTemplate.parse("a.b/(x)/{stream}")
    assert t.match("a.b/(x)/s") == "s"
    assert t.match("aXb/(x)/s") is None
    assert t.match("a.b/x/s") is None


def test_a_plus_level_matches_one_level_and_is_no_part_of_the_stream_id() -> None:
    t = TopicTemplate.parse("part/+/sensors/{stream}")
    assert t.filter == "part/+/sensors/#"
    # The same pump through partition 3 or 5 is one stream.
    assert t.match("part/3/sensors/pump-7") == t.match("part/5/sensors/pump-7") == "pump-7"
    assert t.match("part/3/sensors/hall/pump-7") == "hall/pump-7"
    assert t.match("part/sensors/pump-7") is None  # '+' is exactly one level
    assert t.match("part/3/4/sensors/pump-7") is None
    assert t.match("part//sensors/pump-7") is None


@pytest.mark.parametrize(
    ("template", "topic_filter", "topic", "stream"),
    [
        ("+/{stream}", "+/#", "site-1/p7", "p7"),
        ("sensors/{site}/+", "sensors/+/+", "sensors/north/flow", "north"),
        ("sensors/{stream}/+", "sensors/#", "sensors/a/b/flow", "a/b"),
        ("plant/+/{machine}/+/data", "plant/+/+/+/data", "plant/n/p7/x/data", "p7"),
    ],
)
def test_plus_levels_anywhere(template: str, topic_filter: str, topic: str, stream: str) -> None:
    t = TopicTemplate.parse(template)
    assert (t.filter, t.match(topic)) == (topic_filter, stream)


def test_a_shared_subscription_keeps_its_prefix_in_the_filter_and_routes_the_rest() -> None:
    t = TopicTemplate.parse("$share/rnnsentry/sensors/{stream}")
    assert t.filter == "$share/rnnsentry/sensors/#"
    # The broker delivers the topic the message was published on, without the prefix.
    assert t.match("sensors/pump-1") == "pump-1"
    assert t.match("$share/rnnsentry/sensors/pump-1") is None
    both = TopicTemplate.parse("$share/g-1/part/+/plant/{site}/{stream}")
    assert both.filter == "$share/g-1/part/+/plant/+/#"
    assert both.match("part/0/plant/north/p7") == "north/p7"


def test_a_router_of_shared_templates_routes_what_the_broker_delivers() -> None:
    router = Router([("$share/rnnsentry/sensors/{stream}", 0), ("meters/+/{stream}", 1)])
    assert router.filters == ["$share/rnnsentry/sensors/#", "meters/+/#"]
    assert router.route("sensors/pump-1") == (0, "pump-1")
    assert router.route("meters/2/m9") == (1, "m9")
    assert router.route("other/x") is None


@pytest.mark.parametrize(
    "template",
    [
        "sensors/all",
        "",
        "sensors/#",
        "sensors/{stream}/#",
        "sensors/++/{stream}",
        "sensors/+x/{stream}",
        "sensors/+",  # a wildcard, but no stream
        "$share/sensors",  # no group
        "$share//sensors/{stream}",
        "$share/g+/sensors/{stream}",
        "$share/g/",
        "$share/g/sensors/all",
        "sensors/x{stream}",
        "sensors/{stream}x",
        "sensors/{bad-name}",
        "sensors/{stream",
        "sensors/{stream}/{unit",
    ],
)
def test_bad_templates_raise(template: str) -> None:
    with pytest.raises(ValueError):
        TopicTemplate.parse(template)


def test_router_first_matching_route_wins() -> None:
    router = Router([("sensors/special/{stream}", 1), ("sensors/{stream}", 0)])
    assert router.route("sensors/special/x") == (1, "x")
    assert router.route("sensors/pump") == (0, "pump")
    reversed_router = Router([("sensors/{stream}", 0), ("sensors/special/{stream}", 1)])
    assert reversed_router.route("sensors/special/x") == (0, "special/x")


def test_router_no_match_is_none() -> None:
    router = Router([("sensors/{stream}", 0), ("plant/{site}/{machine}/telemetry", 1)])
    assert router.route("plant/n/p7/status") is None
    assert router.route("other") is None
    assert router.route("plant/n/p7/telemetry") == (1, "n/p7")


def test_router_filters_are_sorted_and_unique() -> None:
    router = Router([("b/{stream}", 0), ("a/{x}", 1), ("b/{stream}/data", 2)])
    assert router.filters == ["a/+", "b/#"]


def test_router_refuses_a_bad_template() -> None:
    with pytest.raises(ValueError):
        Router([("sensors/{stream}", 0), ("sensors/all", 1)])
