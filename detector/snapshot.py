"""Snapshots of the engines' stream state: saved atomically, restored on start.

One ``.npz`` file (numpy's zip of ``.npy`` arrays, read with ``allow_pickle=False``
so a snapshot never runs code) holds a JSON header and, per model, the live
streams' ids, every state-table column for those rows and their ``last_seen``.
A model is restored only if its name, fingerprint and column layout all match.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from detector.engine import Engine
from detector.state import Column

log = logging.getLogger(__name__)

SNAPSHOT_VERSION: Final = 1
SNAPSHOT_FORMAT: Final = "rnnsentry-snapshot"
HEADER_KEY: Final = "header"
_KINDS: Final = frozenset("biuf")  # bool, signed, unsigned, float: never objects
_Member = Callable[[Any], np.ndarray]  # a member array by key; SnapshotCorrupt if absent


class SnapshotCorrupt(ValueError):
    """The file is not a snapshot this version can read; the message says why."""


@dataclass
class _Saved:
    """One model's share of a snapshot, checked and ready to restore."""

    name: str
    fingerprint: str
    layout: dict[str, tuple[str, tuple[int, ...], int]]  # column -> (dtype, shape, axis)
    ids: list[str]
    last_seen: np.ndarray  # float64 [N]
    values: dict[str, np.ndarray]  # column -> array with the column's stream axis


def _layout(columns: dict[str, Column]) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """What a column set must agree on to be restored: dtype, trailing shape, stream axis.

    >>> _layout({"h": Column((2, 3), np.float32, 0.0, axis=1)})
    {'h': ('<f4', (2, 3), 1)}
    """
    return {
        name: (np.dtype(col.dtype).str, tuple(int(d) for d in col.shape), int(col.axis))
        for name, col in columns.items()
    }


# --- save ---


def capture(engines: Sequence[Engine], created: float | None = None) -> dict[str, np.ndarray]:
    """Copies of every engine's live streams as named arrays (the file's members).

    Cheap next to writing: call it on the thread that owns the engines, and
    :func:`write_atomic` the result from any thread.
    """
    _check_names(engines)
    models: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for m, engine in enumerate(engines):
        table = engine.table
        ids = list(table.index)
        rows = np.fromiter(table.index.values(), dtype=np.int64, count=len(ids))
        columns = []
        for c, (name, values) in enumerate(table.gather(rows).items()):
            dtype, shape, axis = _layout({name: table.columns[name]})[name]
            key = f"m{m}_c{c}"
            arrays[key] = np.ascontiguousarray(values)
            columns.append({"name": name, "key": key, "dtype": dtype, "shape": shape,
                            "axis": axis})  # fmt: skip
        arrays[f"m{m}_ids"] = _json_bytes(ids)
        arrays[f"m{m}_last_seen"] = table.last_seen[rows].astype(np.float64)
        models.append({
            "name": engine.model.name,
            "fingerprint": engine.model.meta.fingerprint,
            "streams": len(ids),
            "ids": f"m{m}_ids",
            "last_seen": f"m{m}_last_seen",
            "columns": columns,
        })  # fmt: skip
    header = {
        "format": SNAPSHOT_FORMAT,
        "version": SNAPSHOT_VERSION,
        "created": time.time() if created is None else created,
        "models": models,
    }
    arrays[HEADER_KEY] = _json_bytes(header)
    return arrays


def merge_captures(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One snapshot of several processes' captures (:func:`capture`) of the same models,
    each holding streams the others do not: the streams of all, in one file."""
    if len(parts) == 1:
        return parts[0]
    headers = [json.loads(p[HEADER_KEY].tobytes().decode("ascii")) for p in parts]
    header = headers[0]
    out: dict[str, np.ndarray] = {}
    for m, model in enumerate(header["models"]):
        mine = [h["models"][m] for h in headers]
        ids: list[str] = []
        for part, doc in zip(parts, mine, strict=True):
            ids.extend(json.loads(part[doc["ids"]].tobytes().decode("ascii")))
        out[model["ids"]] = _json_bytes(ids)
        out[model["last_seen"]] = np.concatenate(
            [part[doc["last_seen"]] for part, doc in zip(parts, mine, strict=True)])  # fmt: skip
        for c, column in enumerate(model["columns"]):
            out[column["key"]] = np.concatenate(
                [part[doc["columns"][c]["key"]] for part, doc in zip(parts, mine, strict=True)],
                axis=column["axis"],
            )
        model["streams"] = len(ids)
    out[HEADER_KEY] = _json_bytes(header)
    return out


def _check_names(engines: Sequence[Engine]) -> None:
    names = [e.model.name for e in engines]
    if len(set(names)) != len(names):
        raise ValueError(f"two engines share a model name: {sorted(names)}")


def _json_bytes(doc: Any) -> np.ndarray:
    # ASCII-only JSON: any str (even a lone surrogate) survives the round trip.
    return np.frombuffer(json.dumps(doc, allow_nan=False).encode("ascii"), dtype=np.uint8)


def write_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> int:
    """Write ``arrays`` as an ``.npz`` that replaces ``path`` whole or not at all.

    A temporary file in the same directory is written and fsynced, renamed over
    ``path``, and the directory fsynced so the rename survives a power cut.
    Returns the file's size; raises OSError (nothing left behind) on failure.
    """
    path = Path(path)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            # What np.savez writes, with pickling refused outright.
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, array in arrays.items():
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return size


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_snapshot(path: str | Path, engines: Sequence[Engine]) -> int:
    """Write every engine's live streams atomically (temp file in the same dir, fsync,
    rename, fsync the dir); returns bytes written."""
    arrays = capture(engines)
    size = write_atomic(path, arrays)
    log.debug(
        "snapshot of %d streams in %d models written to %s (%d bytes)",
        sum(len(e.table) for e in engines), len(engines), path, size,
    )  # fmt: skip
    return size


# --- load ---


def load_snapshot(
    path: str | Path, engines: Sequence[Engine], now: float | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, int]:  # fmt: skip
    """Restore into fresh engines; returns {model name: streams restored}. ``keep``: only
    the streams it accepts (a worker process takes its own partition).

    Streams idle for longer than an engine's ``idle_ttl_s`` at ``now`` are
    left out, and at most ``max_streams`` (the most recently seen) are kept.
    A missing file gives {}; a file that cannot be read as a snapshot is
    renamed to ``<path>.corrupt-<unix time>`` and gives {}. Temporary files of
    interrupted writes are removed. Raises OSError only when an existing file
    cannot be read.
    """
    _check_names(engines)
    path = Path(path)
    _remove_leftovers(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info("no snapshot at %s: starting with no stream state", path)
        return {}
    try:
        created, saved = parse_snapshot(data)
    except SnapshotCorrupt as exc:
        _set_aside(path, str(exc))
        return {}
    now = time.time() if now is None else now
    by_name = {s.name: s for s in saved}
    restored: dict[str, int] = {}
    for engine in engines:
        name = engine.model.name
        entry = by_name.pop(name, None)
        if entry is None:
            log.info("snapshot %s holds no state for model %s", path, name)
            restored[name] = 0
            continue
        why = _mismatch(entry, engine)
        if why:
            log.warning("snapshot %s: model %s not restored: %s", path, name, why)
            restored[name] = 0
            continue
        restored[name] = _restore(entry, engine, now, keep)
    for entry in by_name.values():
        log.info("snapshot %s: model %s is not loaded now; its state is dropped",
                 path, entry.name)  # fmt: skip
    log.info(
        "snapshot %s from %.0f s ago restored: %s",
        path, now - created, ", ".join(f"{k}={v} streams" for k, v in restored.items()),
    )  # fmt: skip
    return restored


def _remove_leftovers(path: Path) -> None:
    # Temporary files of writes cut short by a crash (kill -9, power loss).
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            tmp.unlink()
            log.info("removed %s, left over from an interrupted snapshot write", tmp)
        except OSError as exc:
            log.warning("cannot remove %s: %s", tmp, exc)


def _mismatch(entry: _Saved, engine: Engine) -> str:
    """Why this engine cannot take this saved state ('' when it can)."""
    fingerprint = engine.model.meta.fingerprint
    if entry.fingerprint != fingerprint:
        return f"model fingerprint {fingerprint} differs from the snapshot's {entry.fingerprint}"
    # Columns on one side only, or kept in another shape, are a newer or older scorer's
    # (see _restore): the model, which the fingerprint vouches for, is the same.
    if len(engine.table):
        return f"its state table already holds {len(engine.table)} streams"
    return ""


def _same_column(
    saved: tuple[str, tuple[int, ...], int], mine: tuple[str, tuple[int, ...], int]
) -> bool:
    """A saved column this version can take: the same layout, or the same shape and axis in
    another float precision (a spread that went from float64 to float32).

    >>> _same_column(("<f8", (8,), 0), ("<f4", (8,), 0))
    True
    >>> _same_column(("<i8", (), 0), ("<f8", (), 0))
    False
    """
    if saved == mine:
        return True
    floats = all(np.dtype(d).kind == "f" for d in (saved[0], mine[0]))
    return floats and saved[1:] == mine[1:]


def _restore(
    entry: _Saved, engine: Engine, now: float, keep: Callable[[str], bool] | None = None
) -> int:
    """Put the saved streams into the engine's table. A column this version keeps and the
    snapshot lacks, or keeps in another shape (an upgrade), starts at its initial value, as
    for a new stream; a saved column this version does not keep is dropped. A column saved
    at another float precision is cast."""
    table = engine.table
    layout = _layout(table.columns)
    usable = {k for k in entry.values.keys() & layout.keys()
              if _same_column(entry.layout[k], layout[k])}  # fmt: skip
    new = sorted(table.columns.keys() - usable)
    old = sorted(entry.values.keys() - usable)
    if new or old:
        log.info("model %s: state columns %s start afresh, saved columns %s are dropped",
                 entry.name, new or "none", old or "none")  # fmt: skip
    cfg = engine.stream_config
    with np.errstate(invalid="ignore"):
        live = entry.last_seen >= now - cfg.idle_ttl_s
    others = 0  # streams another process takes
    if keep is not None:
        mine = np.fromiter(map(keep, entry.ids), np.bool_, count=len(entry.ids))
        others = len(mine) - int(np.count_nonzero(mine))
        live &= mine
    alive = np.flatnonzero(live)
    # Newest first, so the cut at max_streams keeps the most recently seen.
    keep_rows = alive[np.argsort(-entry.last_seen[alive], kind="stable")][: table.max_streams]
    dropped = len(entry.ids) - others - len(keep_rows)
    if dropped:
        log.info("model %s: %d saved streams idle past the TTL or over max_streams not restored",
                 entry.name, dropped)  # fmt: skip
    if len(keep_rows) == 0:
        return 0
    rows = table.rows_for([entry.ids[i] for i in keep_rows], now)
    table.scatter(rows, {
        name: np.take(values, keep_rows, axis=table.columns[name].axis)
        for name, values in entry.values.items()
        if name in usable
    })  # fmt: skip
    table.last_seen[rows] = entry.last_seen[keep_rows]
    engine.mark_resumed(rows)
    return len(keep_rows)


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.warning("snapshot %s is unreadable (%s) and cannot be set aside: %s", path, why, exc)
        return
    log.warning("snapshot %s is unreadable (%s); moved to %s, starting with no stream state",
                path, why, aside)  # fmt: skip


def parse_snapshot(data: bytes) -> tuple[float, list[_Saved]]:
    """The creation time and every model's saved state; SnapshotCorrupt if unreadable."""
    if not data.startswith(b"PK\x03\x04"):  # numpy would guess at pickled data
        raise SnapshotCorrupt("not a snapshot file (it does not start as a zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            members = set(npz.files)

            def member(key: Any) -> np.ndarray:
                if not isinstance(key, str) or key not in members:
                    raise SnapshotCorrupt(f"member {key!r} is missing")
                value: np.ndarray = npz[key]
                return value

            header = _json_member(member(HEADER_KEY), "header")
            return _parse(header, member)
    except SnapshotCorrupt:
        raise
    except Exception as exc:  # any failure to decode bytes we were handed is corruption
        raise SnapshotCorrupt(f"{type(exc).__name__}: {exc}") from None


def _json_member(array: np.ndarray, what: str) -> Any:
    if array.dtype != np.uint8 or array.ndim != 1:
        raise SnapshotCorrupt(f"{what} is not a byte array")
    return json.loads(array.tobytes().decode("ascii"))


def _parse(header: Any, member: _Member) -> tuple[float, list[_Saved]]:
    if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotCorrupt("not an rnnsentry snapshot")
    version = header.get("version")
    if version != SNAPSHOT_VERSION:
        raise SnapshotCorrupt(
            f"snapshot version {version!r} (this rnnsentry reads {SNAPSHOT_VERSION})"
        )
    created = header.get("created")
    models = header.get("models")
    if not isinstance(created, (int, float)) or not isinstance(models, list):
        raise SnapshotCorrupt("header lacks created time or models")
    saved = [_parse_model(doc, member) for doc in models]
    if len({s.name for s in saved}) != len(saved):
        raise SnapshotCorrupt("a model appears twice")
    return float(created), saved


def _parse_model(doc: Any, member: _Member) -> _Saved:
    if not isinstance(doc, dict):
        raise SnapshotCorrupt("a model entry is not an object")
    name, fingerprint, n = doc.get("name"), doc.get("fingerprint"), doc.get("streams")
    if not isinstance(name, str) or not isinstance(fingerprint, str) or not _is_count(n):
        raise SnapshotCorrupt("a model entry lacks name, fingerprint or streams")
    ids = _json_member(member(doc.get("ids")), f"{name}: stream ids")
    if (not isinstance(ids, list) or len(ids) != n or len(set(ids)) != n
            or not all(isinstance(s, str) for s in ids)):  # fmt: skip
        raise SnapshotCorrupt(f"{name}: stream ids are not {n} distinct strings")
    last_seen = member(doc.get("last_seen"))
    if last_seen.dtype != np.float64 or last_seen.shape != (n,):
        raise SnapshotCorrupt(f"{name}: last_seen is not float64 [{n}]")
    columns = doc.get("columns")
    if not isinstance(columns, list):
        raise SnapshotCorrupt(f"{name}: no column list")
    layout: dict[str, tuple[str, tuple[int, ...], int]] = {}
    values: dict[str, np.ndarray] = {}
    for col in columns:
        cname, dtype, shape, axis = _column_entry(col, name)
        if cname in layout:
            raise SnapshotCorrupt(f"{name}: column {cname!r} appears twice")
        array = member(col["key"])
        want = Column(shape, dtype, 0, axis).full_shape(n)
        if array.dtype.str != dtype or array.dtype.kind not in _KINDS or array.shape != want:
            raise SnapshotCorrupt(
                f"{name}: column {cname!r} is {array.dtype.str} {array.shape}, "
                f"the header says {dtype} {want}"
            )
        layout[cname] = (dtype, shape, axis)
        values[cname] = array
    return _Saved(name, fingerprint, layout, ids, last_seen, values)


def _column_entry(col: Any, model: str) -> tuple[str, str, tuple[int, ...], int]:
    if isinstance(col, dict):
        cname, dtype, shape, axis = (col.get(k) for k in ("name", "dtype", "shape", "axis"))
        if (isinstance(cname, str) and isinstance(dtype, str) and isinstance(shape, list)
                and all(_is_count(d) for d in shape) and isinstance(axis, int)
                and 0 <= axis <= len(shape)):  # fmt: skip
            return cname, dtype, tuple(shape), axis
    raise SnapshotCorrupt(f"{model}: a malformed column entry")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
