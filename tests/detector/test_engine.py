"""detector.engine: rounds split a batch so a stream seen twice is stepped in order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from detector.engine import _rounds


def _rounds_by_counting(streams: list[str]) -> list[list[int]]:
    """The plain definition: a sample's round is how many samples of its stream came first."""
    seen: dict[str, int] = {}
    rounds: list[list[int]] = []
    for i, stream in enumerate(streams):
        k = seen.get(stream, 0)
        seen[stream] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds or [[]]


@settings(database=None, deadline=None)
@given(streams=st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=60))
def test_rounds_split_repeated_streams_in_order(streams: list[str]) -> None:
    assert [r.tolist() for r in _rounds(streams)] == _rounds_by_counting(streams)
