"""A state snapshot round-trips exactly: any stream ids, any values, holes in the table."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.config import StreamConfig
from detector.engine import Engine
from detector.model import LoadedModel
from detector.snapshot import load_snapshot, save_snapshot

PROPS = settings(
    database=None, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
# Any str: '/' and other topic characters, astral planes, and lone surrogates too.
stream_ids = st.text(st.one_of(st.characters(), st.sampled_from("/+#"),
                               st.characters(categories=["Cs"])), max_size=12)  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LoadedModel:
    return LoadedModel.load(tiny_model, name="m")


def engine(model: LoadedModel) -> Engine:
    return Engine(model, streams=StreamConfig(max_streams=64, idle_ttl_s=math.inf))


def random_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Values of any bit pattern the dtype allows a table to hold (NaN, inf, extremes)."""
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    values = rng.normal(scale=1e3, size=shape).astype(dtype)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, np.finfo(dtype).tiny], dtype=dtype)
    mask = rng.random(shape) < 0.2
    values[mask] = rng.choice(special, size=int(mask.sum()))
    return values


@PROPS
@given(
    ids=st.lists(stream_ids, unique=True, max_size=20),
    dropped=st.sets(st.integers(0, 19), max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_table_round_trips_exactly(
    model: LoadedModel, ids: list[str], dropped: set[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    live = engine(model)
    table = live.table
    rows = table.rows_for(ids, now=0.0)
    table.scatter(rows, {
        name: random_values(rng, col.full_shape(len(ids)), np.dtype(col.dtype))
        for name, col in table.columns.items()
    })  # fmt: skip
    table.last_seen[rows] = rng.uniform(-1e9, 1e9, size=len(ids))
    # Removed streams leave holes in the rows and entries on the free list.
    table.remove_rows(int(rows[i]) for i in dropped if i < len(ids))
    kept = table.streams()

    restored = engine(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_snapshot(Path(tmp) / "s.npz", [live])
        assert load_snapshot(Path(tmp) / "s.npz", [restored], now=0.0) == {"m": len(kept)}

    assert sorted(restored.table.streams()) == sorted(kept)
    rows_a = np.array([table.index[s] for s in kept], dtype=np.int64)
    rows_b = np.array([restored.table.index[s] for s in kept], dtype=np.int64)
    a, b = table.gather(rows_a), restored.table.gather(rows_b)
    assert b["resumed"].all()  # a restore marks its streams: their next sample is no gap
    for name in table.columns.keys() - {"resumed"}:
        # Bit patterns, not values: NaN payloads and -0.0 must survive as well.
        assert a[name].dtype == b[name].dtype
        assert a[name].tobytes() == b[name].tobytes(), name
    assert table.last_seen[rows_a].tobytes() == restored.table.last_seen[rows_b].tobytes()
    # The restored table's bookkeeping is whole: every live row is indexed once, none is free.
    assert len(set(restored.table.index.values())) == len(kept)
    assert not set(restored.table.free) & set(restored.table.index.values())
