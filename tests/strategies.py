"""Hypothesis strategies that more than one property test draws from."""

from __future__ import annotations

from hypothesis import strategies as st

# Text that is, or almost is, a timestamp.
TIME_TEXTS = [
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00",
    "2024-01-01T02:00:00+02:00",
    "1704067200",
    "1704067200000",
    "yesterday",
    "nan",
    "-inf",
    "1e999",
    "1_000",
    "",
]

# JSON leaves: the kinds json.loads can produce, big and awkward numbers included.
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # json.dumps writes NaN / Infinity for the non-finite ones
    | st.text(max_size=12)
    | st.sampled_from(TIME_TEXTS)
)
keys = st.sampled_from(["ts", "values", "a", "b", "c", "x"]) | st.text(max_size=6)
# Any JSON document of a few levels, timestamps among its texts.
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)
