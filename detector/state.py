"""The state table: every stream's per-stream arrays, a row each.

Columns are preallocated numpy arrays (grown by doubling up to ``max_streams``),
with a dict from stream id to row and a free list. When full, the least
recently seen streams are evicted in a small chunk; ``evict_idle`` drops
streams unseen for a TTL. The owner (one worker thread) needs no locks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Column:
    """A per-stream array: trailing shape, dtype, initial value, and the stream axis."""

    shape: tuple[int, ...]
    dtype: Any
    fill: Any
    axis: int = 0  # where the stream axis goes (RNN state is [L, N, H]: axis 1)

    def full_shape(self, n: int) -> tuple[int, ...]:
        dims = list(self.shape)
        dims.insert(self.axis, n)
        return tuple(dims)


def take_rows(columns: dict[str, Column], arrays: dict[str, Any], rows: np.ndarray,
              names: Iterable[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Copies of the named columns (default: all of ``columns``) of ``arrays`` at ``rows``,
    along each column's stream axis: :meth:`StateTable.gather`, or of a batch's own copy."""
    return {
        name: arrays[name].take(rows, axis=columns[name].axis)
        for name in (names if names is not None else columns)
    }


def put_rows(columns: dict[str, Column], arrays: dict[str, Any], rows: np.ndarray,
             values: dict[str, Any]) -> None:  # fmt: skip
    """``values`` into ``arrays`` at ``rows``, along each column's stream axis."""
    for name, value in values.items():
        axis = columns[name].axis
        if axis == 0:
            arrays[name][rows] = value
        else:
            index: tuple[Any, ...] = (slice(None),) * axis + (rows,)
            arrays[name][index] = value


def reset_rows(columns: dict[str, Column], arrays: dict[str, Any], rows: np.ndarray,
               names: Iterable[str] | None = None) -> None:  # fmt: skip
    """The named columns (default: all) of ``arrays`` at ``rows`` back to their initial
    values."""
    if len(rows) == 0:
        return
    for name in names if names is not None else columns:
        col = columns[name]
        index: tuple[Any, ...] = (slice(None),) * col.axis + (rows,)
        arrays[name][index] = col.fill


class StateTable:
    """Rows of per-stream state; ``gather`` and ``scatter`` move whole batches.

    >>> t = StateTable({"x": Column((), np.float64, 0.0)}, max_streams=4)
    >>> rows = t.rows_for(["a", "b", "a"], now=1.0)
    >>> rows.tolist(), len(t)
    ([0, 1, 0], 2)
    """

    def __init__(
        self, columns: dict[str, Column], max_streams: int, initial_capacity: int = 1024
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.columns = dict(columns)
        self.max_streams = max_streams
        self.capacity = max(1, min(initial_capacity, max_streams))
        self.arrays = {
            name: np.full(col.full_shape(self.capacity), col.fill, dtype=col.dtype)
            for name, col in self.columns.items()
        }
        self.last_seen = np.full(self.capacity, -np.inf)
        self.ids: list[str | None] = [None] * self.capacity
        self.index: dict[str, int] = {}
        self.free: list[int] = list(range(self.capacity - 1, -1, -1))
        self.evicted = 0
        self.on_remove: Callable[[np.ndarray], None] | None = None  # told of rows it drops

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, stream: str) -> bool:
        return stream in self.index

    # --- rows ---

    def rows_for(self, streams: Sequence[str], now: float) -> np.ndarray:
        """Rows for these streams (new ones created, fresh), all marked seen at ``now``."""
        index = self.index
        rows = np.fromiter((index.get(s, -1) for s in streams), np.int64, len(streams))
        new = rows < 0
        if not new.any():
            self.last_seen[rows] = now
            return rows
        # Known streams are marked first, so that making room for new ones cannot evict
        # a stream of this very call; each new row is marked as it is made.
        self.last_seen[rows[~new]] = now
        for i in np.flatnonzero(new).tolist():
            stream = streams[i]
            row = index.get(stream)  # an earlier sample of this call may have made it
            rows[i] = self._new_row(stream, now) if row is None else row
        return rows

    def _new_row(self, stream: str, now: float) -> int:
        if not self.free:
            if self.capacity < self.max_streams:
                self._grow(min(self.capacity * 2, self.max_streams))
            else:
                self._evict_oldest(now)
        row = self.free.pop()
        self.index[stream] = row
        self.ids[row] = stream
        self.last_seen[row] = now
        return row

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        for name, col in self.columns.items():
            pad = np.full(col.full_shape(extra), col.fill, dtype=col.dtype)
            self.arrays[name] = np.concatenate([self.arrays[name], pad], axis=col.axis)
        self.last_seen = np.concatenate([self.last_seen, np.full(extra, -np.inf)])
        self.ids.extend([None] * extra)
        self.free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity = capacity

    def _evict_oldest(self, now: float) -> None:
        # Evict a chunk at once so that a stream of new ids costs O(1) amortised.
        chunk = max(1, len(self.index) // 64)
        candidates = np.argpartition(self.last_seen, chunk - 1)[:chunk]
        victims = [int(r) for r in candidates if self.last_seen[r] < now]
        if not victims:
            raise RuntimeError("state table is full of streams seen in this very batch")
        self.remove_rows(victims)

    def remove_rows(self, rows: Iterable[int]) -> None:
        rows = [r for r in rows if self.ids[r] is not None]
        if rows and self.on_remove is not None:
            self.on_remove(np.asarray(rows, dtype=np.int64))
        for row in rows:
            stream = self.ids[row]
            if stream is None:
                continue
            del self.index[stream]
            self.ids[row] = None
            self.last_seen[row] = -np.inf
            self.free.append(row)
            self.evicted += 1
        self.reset_rows(np.asarray(rows, dtype=np.int64))

    def evict_idle(self, now: float, ttl_s: float) -> int:
        """Drop streams not seen for ``ttl_s`` seconds; returns how many."""
        live = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        stale = live[self.last_seen[live] < now - ttl_s]
        self.remove_rows(int(r) for r in stale)
        return len(stale)

    # --- values ---

    def gather(self, rows: np.ndarray, names: Iterable[str] | None = None) -> dict[str, Any]:
        """Copies of the named columns for these rows (stream axis as each column's)."""
        return take_rows(self.columns, self.arrays, rows, names)

    def scatter(self, rows: np.ndarray, values: dict[str, Any]) -> None:
        put_rows(self.columns, self.arrays, rows, values)

    def reset_rows(self, rows: np.ndarray, names: Iterable[str] | None = None) -> None:
        """Put these rows' columns back to their initial values."""
        reset_rows(self.columns, self.arrays, rows, names)

    def streams(self) -> list[str]:
        return list(self.index)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + self.last_seen.nbytes
