"""detector.snapshot: exact round trips, refused models, corrupt files set aside, atomic writes."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.config import StreamConfig
from detector.engine import BatchResult, Engine
from detector.model import LoadedModel
from detector.scoring import ColumnSpec, Scorer, ScoringConfig
from detector.snapshot import SNAPSHOT_VERSION, load_snapshot, save_snapshot

# Alert quickly on a model that has not seen this random data, so the snapshot
# carries active alerts, hold counters and episode numbers, not only averages.
SCORING = ScoringConfig(warmup_steps=3, short_window=3, long_window=2000,
                        threshold=0.9, clear_threshold=0.6,
                        clear_steps=2)  # fmt: skip
STREAMS = ["pump-1", "plant/site 7/machine/telemetry", "naïve/温度/🚀", "", 'a\\b"c\n']
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LoadedModel:
    return LoadedModel.load(tiny_model, name="pump")


@pytest.fixture(scope="module")
def other_model(tiny_model: Path) -> LoadedModel:
    return LoadedModel.load(tiny_model, name="fan")


def engine(model: LoadedModel, max_streams: int = 64, ttl_s: float = math.inf) -> Engine:
    return Engine(model, SCORING, StreamConfig(max_streams=max_streams, idle_ttl_s=ttl_s))


def batches(
    model: LoadedModel, streams: list[str], steps: int, start: int, seed: int
) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """Random samples in raw units, a spike now and then; the first stream twice per batch."""
    rng = np.random.default_rng(seed)
    meta = model.meta
    centre = np.asarray(meta.normalisation.centre)
    scale = np.asarray(meta.normalisation.scale)
    out = []
    for k in range(start, start + steps):
        names = [*streams, streams[0]]
        ts = np.full(len(names), T0 + k)
        ts[-1] += 0.5
        z = rng.normal(size=(len(names), meta.n_features))
        z[rng.random(len(names)) < 0.15] *= 8.0
        out.append((names, ts, centre + scale * z))
    return out


def run(eng: Engine, feed: list[tuple[list[str], np.ndarray, np.ndarray]]) -> list[BatchResult]:
    return [eng.process(names, ts, x, now=float(ts.max())) for names, ts, x in feed]


def assert_same_results(a: list[BatchResult], b: list[BatchResult]) -> None:
    for ra, rb in zip(a, b, strict=True):
        for name in ("status", "raw", "likelihood", "active", "std_errors"):
            np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name), strict=True)
        assert ra.events == rb.events


def assert_same_streams(a: Engine, b: Engine, streams: list[str] | None = None) -> None:
    streams = sorted(a.table.index) if streams is None else streams
    assert sorted(b.table.index) == sorted(streams)
    rows_a = np.array([a.table.index[s] for s in streams], dtype=np.int64)
    rows_b = np.array([b.table.index[s] for s in streams], dtype=np.int64)
    cols_a, cols_b = a.table.gather(rows_a), b.table.gather(rows_b)
    assert cols_a.keys() == cols_b.keys()
    for name in cols_a.keys() - {"resumed"}:  # a restore marks its streams (mark_resumed)
        np.testing.assert_array_equal(cols_a[name], cols_b[name], strict=True)
    np.testing.assert_array_equal(a.table.last_seen[rows_a], b.table.last_seen[rows_b])


def test_restored_engine_scores_like_an_uninterrupted_one(model: LoadedModel,
                                                          tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "state.npz"
    live = engine(model)
    # Save at a moment when an active alert is counting down to its clear, so the
    # snapshot carries hold counters and episode numbers, not only averages.
    for k, feed in enumerate(batches(model, STREAMS, 300, 0, seed=1)):
        run(live, [feed])
        cols = live.table.arrays
        if k >= 20 and (cols["active"] & (cols["below"] > 0)).any():
            break
    else:
        pytest.fail("no alert was clearing within 300 steps: make SCORING more sensitive")
    assert save_snapshot(path, [live]) == path.stat().st_size

    restored = engine(model)
    assert load_snapshot(path, [restored], now=T0 + k) == {"pump": len(STREAMS)}
    assert_same_streams(live, restored)

    after = batches(model, STREAMS, 40, k + 1, seed=2)
    expected, got = run(live, after), run(restored, after)
    assert any(r.events for r in expected)
    assert_same_results(expected, got)
    assert_same_streams(live, restored)


def test_odd_stream_ids_round_trip(model: LoadedModel, tmp_path: Path) -> None:
    ids = ["a/b/c", "/", "//x//", "机器/ü", "🚀", "\x00", "\ud800 lone surrogate", " ", "\u202e"]
    live = engine(model)
    run(live, batches(model, ids, 2, 0, seed=3))
    save_snapshot(tmp_path / "s.npz", [live])
    restored = engine(model)
    assert load_snapshot(tmp_path / "s.npz", [restored], now=T0) == {"pump": len(ids)}
    assert_same_streams(live, restored, ids)


def test_an_empty_engine_round_trips(model: LoadedModel, tmp_path: Path) -> None:
    save_snapshot(tmp_path / "s.npz", [engine(model)])
    restored = engine(model)
    assert load_snapshot(tmp_path / "s.npz", [restored]) == {"pump": 0}
    assert len(restored.table) == 0


def test_two_models_share_one_file(model: LoadedModel, other_model: LoadedModel,
                                   tmp_path: Path) -> None:  # fmt: skip
    pump, fan = engine(model), engine(other_model)
    run(pump, batches(model, ["p1", "p2", "p3"], 5, 0, seed=4))
    run(fan, batches(other_model, ["f1", "p1"], 5, 0, seed=5))
    save_snapshot(tmp_path / "s.npz", [pump, fan])
    pump2, fan2 = engine(model), engine(other_model)
    assert load_snapshot(tmp_path / "s.npz", [fan2, pump2], now=T0) == {"fan": 2, "pump": 3}
    assert_same_streams(pump, pump2)
    assert_same_streams(fan, fan2)


def test_a_changed_model_is_not_restored_and_the_others_are(
    model: LoadedModel, other_model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pump, fan = engine(model), engine(other_model)
    run(pump, batches(model, ["p1"], 3, 0, seed=6))
    run(fan, batches(other_model, ["f1"], 3, 0, seed=7))
    save_snapshot(tmp_path / "s.npz", [pump, fan])

    retrained = LoadedModel.load(other_model.path, name="fan")
    retrained.meta = dataclasses.replace(retrained.meta, graph_sha256="0" * 64)
    pump2, fan2 = engine(model), engine(retrained)
    with caplog.at_level(logging.WARNING, logger="detector.snapshot"):
        assert load_snapshot(tmp_path / "s.npz", [pump2, fan2], now=T0) == {"pump": 1, "fan": 0}
    assert len(fan2.table) == 0
    assert_same_streams(pump, pump2)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "fan" in warning and "fingerprint" in warning


def with_columns(monkeypatch: pytest.MonkeyPatch, **changes: ColumnSpec) -> None:
    """A later (or earlier) scorer: its parts' columns with ``changes`` on top."""
    original = Scorer.column_specs
    monkeypatch.setattr(Scorer, "column_specs", staticmethod(lambda f: original(f) | changes))


def test_a_column_kept_in_another_shape_starts_afresh_and_the_rest_is_restored(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    live = engine(model)
    run(live, batches(model, ["p1"], 3, 0, seed=8))
    save_snapshot(tmp_path / "s.npz", [live])
    # A later version of the scorer that keeps one of its columns in another shape: the
    # stream keeps its network state and the rest of its statistics.
    with_columns(monkeypatch, n_scored=((2,), np.int64, 0))
    newer = engine(model)
    with caplog.at_level(logging.INFO, logger="detector.snapshot"):
        assert load_snapshot(tmp_path / "s.npz", [newer], now=T0) == {"pump": 1}
    assert "n_scored" in caplog.text
    row, old_row = newer.table.rows_for(["p1"], T0), live.table.rows_for(["p1"], T0)
    assert newer.table.arrays["n_scored"][row].tolist() == [[0, 0]]
    h = newer.table.columns["warm"].axis
    np.testing.assert_array_equal(
        np.take(newer.table.arrays["warm"], row, axis=h),
        np.take(live.table.arrays["warm"], old_row, axis=h),
    )


def test_a_spread_saved_in_float64_is_restored_in_float32(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade that keeps a column at a lower float precision (the input spread went from
    float64 to float32) takes the saved values, cast, not afresh; an integer column does
    not become a float one."""
    f = model.meta.n_features
    with_columns(monkeypatch, input_var=((f,), np.float64, 1.0), warm=((), np.float64, 0.0))
    older = engine(model)
    run(older, batches(model, ["p1"], 40, 0, seed=8))
    row = older.table.rows_for(["p1"], T0)
    older.table.arrays["input_var"][row] = np.linspace(0.5, 2.0, f) + 1e-12
    save_snapshot(tmp_path / "s.npz", [older])
    monkeypatch.undo()
    newer = engine(model)
    assert newer.table.arrays["input_var"].dtype == np.float32
    assert load_snapshot(tmp_path / "s.npz", [newer], now=T0) == {"pump": 1}
    got = newer.table.arrays["input_var"][newer.table.rows_for(["p1"], T0)]
    np.testing.assert_allclose(got[0], np.linspace(0.5, 2.0, f), rtol=1e-6)
    assert newer.table.arrays["warm"][newer.table.rows_for(["p1"], T0)].tolist() == [0]


def test_a_column_the_snapshot_lacks_starts_afresh_and_the_rest_is_restored(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    live = engine(model)
    run(live, batches(model, ["p1", "p2"], 6, 0, seed=8))
    save_snapshot(tmp_path / "s.npz", [live])
    # An upgrade whose scorer keeps one more per-stream column: the streams keep their
    # network state and statistics, and the new column starts at its initial value.
    with_columns(monkeypatch, spare=((), np.float64, 7.5))
    newer = engine(model)
    with caplog.at_level(logging.INFO, logger="detector.snapshot"):
        assert load_snapshot(tmp_path / "s.npz", [newer], now=T0) == {"pump": 2}
    assert "spare" in caplog.text
    rows = newer.table.rows_for(["p1", "p2"], T0)
    assert newer.table.arrays["spare"][rows].tolist() == [7.5, 7.5]
    old_rows = live.table.rows_for(["p1", "p2"], T0)
    for name in live.table.columns.keys() - {"resumed"}:  # a restore marks its streams
        np.testing.assert_array_equal(
            np.take(newer.table.arrays[name], rows, axis=newer.table.columns[name].axis),
            np.take(live.table.arrays[name], old_rows, axis=live.table.columns[name].axis),
        )
    # And back: the older version drops the column it does not know.
    save_snapshot(tmp_path / "s2.npz", [newer])
    monkeypatch.undo()
    older = engine(model)
    assert load_snapshot(tmp_path / "s2.npz", [older], now=T0) == {"pump": 2}
    assert "spare" not in older.table.columns


def test_an_engine_that_already_has_streams_is_left_alone(model: LoadedModel,
                                                          tmp_path: Path) -> None:  # fmt: skip
    live = engine(model)
    run(live, batches(model, ["p1"], 3, 0, seed=9))
    save_snapshot(tmp_path / "s.npz", [live])
    busy = engine(model)
    run(busy, batches(model, ["other"], 1, 100, seed=10))
    assert load_snapshot(tmp_path / "s.npz", [busy], now=T0) == {"pump": 0}
    assert busy.table.streams() == ["other"]


def test_over_max_streams_keeps_the_most_recently_seen(model: LoadedModel,
                                                       tmp_path: Path) -> None:  # fmt: skip
    live = engine(model)
    names = [f"s{i}" for i in range(6)]
    for i, name in enumerate(names):  # s5 seen last
        run(live, batches(model, [name], 2, 10 * i, seed=i))
    save_snapshot(tmp_path / "s.npz", [live])
    small = engine(model, max_streams=3)
    assert load_snapshot(tmp_path / "s.npz", [small], now=T0 + 100) == {"pump": 3}
    assert_same_streams(live, small, ["s3", "s4", "s5"])


def test_streams_idle_past_the_ttl_are_not_restored(model: LoadedModel, tmp_path: Path) -> None:
    live = engine(model)
    run(live, batches(model, ["old"], 1, 0, seed=11))
    run(live, batches(model, ["new"], 1, 50, seed=12))
    save_snapshot(tmp_path / "s.npz", [live])
    restored = engine(model, ttl_s=30.0)
    assert load_snapshot(tmp_path / "s.npz", [restored], now=T0 + 60) == {"pump": 1}
    assert_same_streams(live, restored, ["new"])


def test_a_missing_file_gives_nothing(model: LoadedModel, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with caplog.at_level(logging.INFO, logger="detector.snapshot"):
        assert load_snapshot(tmp_path / "absent.npz", [engine(model)]) == {}
    assert "no snapshot" in caplog.text
    assert list(tmp_path.iterdir()) == []


# --- corrupt files ---


def members(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def header_edit(**changes: Any) -> Any:
    def edit(data: bytes) -> bytes:
        arrays = members(data)
        header = json.loads(arrays["header"].tobytes())
        header.update(changes)
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        out = io.BytesIO()
        np.savez(out, **arrays)
        return out.getvalue()

    return edit


def member_edit(key: str, value: Any) -> Any:
    def edit(data: bytes) -> bytes:
        arrays = members(data)
        arrays[key] = value
        out = io.BytesIO()
        np.savez(out, **arrays)  # object arrays are pickled here: the loader must refuse them
        return out.getvalue()

    return edit


def flip_middle(data: bytes) -> bytes:
    """One bit pattern flipped halfway into the largest member's stored bytes (a flip in
    a zip header field that nothing reads, such as a file time, would change nothing)."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[start + 26 : start + 30])
    mid = start + 30 + name_len + extra_len + info.compress_size // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]


WRONG_COUNT = {"name": "pump", "fingerprint": "x", "streams": 99, "ids": "m0_ids",
               "last_seen": "m0_last_seen", "columns": []}  # fmt: skip
MUTILATIONS = {
    "garbage": lambda data: b"\x00not a snapshot at all" * 10,
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "cut short by a byte": lambda data: data[:-1],
    "flipped byte": flip_middle,
    "future version": header_edit(version=SNAPSHOT_VERSION + 1),
    "other format": header_edit(format="something-else"),
    "no models": header_edit(models=None),
    "stream count off": header_edit(models=[WRONG_COUNT]),
    "pickled object array": member_edit("m0_ids", np.array([{"a": 1}], dtype=object)),
    "no header": member_edit("header", np.zeros(0, np.uint8)),
    "wrong column shape": member_edit("m0_c0", np.zeros((1, 2, 3), np.float32)),
}


@pytest.mark.parametrize("mutilate", MUTILATIONS.values(), ids=list(MUTILATIONS))
def test_an_unreadable_file_is_set_aside(
    mutilate: Any, model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.npz"
    live = engine(model)
    run(live, batches(model, ["p1", "p2"], 3, 0, seed=13))
    save_snapshot(path, [live])
    bad = mutilate(path.read_bytes())
    path.write_bytes(bad)
    fresh = engine(model)
    with caplog.at_level(logging.WARNING, logger="detector.snapshot"):
        assert load_snapshot(path, [fresh], now=T0) == {}
    assert len(fresh.table) == 0
    assert not path.exists()
    (aside,) = tmp_path.glob("s.npz.corrupt-*")
    assert aside.read_bytes() == bad
    assert "unreadable" in caplog.text and str(aside) in caplog.text


def test_random_bytes_are_called_what_they_are(
    model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    with caplog.at_level(logging.WARNING, logger="detector.snapshot"):
        assert load_snapshot(path, [engine(model)], now=T0) == {}
    assert "not a snapshot file" in caplog.text and "pickle" not in caplog.text


# --- writing ---


def test_the_file_is_a_plain_npz_with_a_json_header(model: LoadedModel, tmp_path: Path) -> None:
    live = engine(model)
    run(live, batches(model, ["a/b"], 2, 0, seed=14))
    save_snapshot(tmp_path / "s.npz", [live])
    arrays = members((tmp_path / "s.npz").read_bytes())
    header = json.loads(arrays["header"].tobytes())
    assert header["version"] == SNAPSHOT_VERSION
    (entry,) = header["models"]
    assert entry["name"] == "pump" and entry["fingerprint"] == model.meta.fingerprint
    assert json.loads(arrays[entry["ids"]].tobytes()) == ["a/b"]
    h = next(c for c in entry["columns"] if c["name"] == "h")
    assert arrays[h["key"]].shape == (model.meta.layers, 1, model.meta.hidden_size)


def failing(*args: Any, **kwargs: Any) -> Any:
    raise OSError("disk on fire")


@pytest.mark.parametrize("step", ["replace", "fsync", "write_array"])
def test_a_failed_write_keeps_the_previous_snapshot(
    step: str, model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.npz"
    live = engine(model)
    run(live, batches(model, ["p1"], 2, 0, seed=15))
    save_snapshot(path, [live])
    previous = path.read_bytes()
    run(live, batches(model, ["p1", "p2"], 2, 2, seed=16))
    target = np.lib.format if step == "write_array" else os
    monkeypatch.setattr(target, step, failing)
    with pytest.raises(OSError, match="disk on fire"):
        save_snapshot(path, [live])
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_loading_removes_temporary_files_of_interrupted_writes(model: LoadedModel,
                                                               tmp_path: Path) -> None:  # fmt: skip
    live = engine(model)
    run(live, batches(model, ["p1"], 2, 0, seed=18))
    save_snapshot(tmp_path / "s[1].npz", [live])
    (tmp_path / ".s[1].npz.k3j_x9.tmp").write_bytes(b"half a snapsh")
    (tmp_path / ".other.npz.k3j_x9.tmp").write_bytes(b"not ours")
    assert load_snapshot(tmp_path / "s[1].npz", [engine(model)], now=T0) == {"pump": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.npz.k3j_x9.tmp", "s[1].npz"]


def test_saving_into_a_missing_directory_raises_oserror(model: LoadedModel,
                                                        tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(OSError):
        save_snapshot(tmp_path / "no" / "such" / "dir" / "s.npz", [engine(model)])


def test_two_engines_of_one_model_name_are_refused(model: LoadedModel,
                                                           tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(ValueError, match="model name"):
        save_snapshot(tmp_path / "s.npz", [engine(model), engine(model)])
    assert list(tmp_path.iterdir()) == []
    save_snapshot(tmp_path / "s.npz", [engine(model)])
    with pytest.raises(ValueError, match="model name"):
        load_snapshot(tmp_path / "s.npz", [engine(model), engine(model)])


def test_saving_again_replaces_the_file(model: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    live = engine(model)
    save_snapshot(path, [live])
    run(live, batches(model, ["p1", "p2"], 2, 0, seed=17))
    save_snapshot(path, [live])
    restored = engine(model)
    assert load_snapshot(path, [restored], now=T0) == {"pump": 2}
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]


def test_the_time_a_restore_rewinds_is_not_a_gap(model: LoadedModel, tmp_path: Path) -> None:
    """Samples scored after the snapshot, then a crash and a restart: the next sample comes
    long after the restored state's last one, which is the daemon's absence, not the
    sensor's; a silence after that is a gap again."""
    live = engine(model)
    run(live, batches(model, ["p1", "p2"], 5, 0, seed=21))
    save_snapshot(tmp_path / "s.npz", [live])
    fresh = engine(model)
    load_snapshot(tmp_path / "s.npz", [fresh], now=T0 + 5)
    limit = fresh.max_gap_s
    assert limit is not None and math.isfinite(limit)
    late = T0 + 5 + 6 * limit  # e.g. a minute of snapshot interval plus the restart
    names, _, x = batches(model, ["p1", "p2"], 1, 9, seed=22)[0]
    first = fresh.process(names[:2], np.array([late, late]), x[:2], now=late)
    assert first.gap_resets == 0
    assert np.isnan(first.raw).all()  # not scored against the prediction of long ago ...
    then = fresh.process(names[:2], np.array([late + 1, late + 1]), x[:2], now=late + 1)
    assert np.isfinite(then.raw).all()  # ... but the next sample is, with no warm-up
    assert (then.likelihood > 0).all()
    later = late + 6 * limit  # the sensors then fall silent: that is a gap
    again = fresh.process(names[:2], np.array([later, later]), x[:2], now=later)
    assert again.gap_resets == 2


def test_alert_ids_do_not_repeat_after_a_crash_and_a_restore(
    model: LoadedModel, tmp_path: Path
) -> None:
    """Alerts raised after the last snapshot are forgotten by a crash; the ones raised after
    the restore must not take their ids (the episode count alone would)."""
    from detector.publisher import alert_id
    from tests.support import tiny_fleet

    rows = tiny_fleet(n_streams=1, n_steps=200, seed=12, start_step=600).values[0]
    for spike in (30, 70, 130, 170):
        rows[spike] += 40.0 * rows[:20].std(axis=0)

    def raised(eng: Engine, steps: range) -> set[str]:
        out = set()
        for t in steps:
            result = eng.process(["p1"], np.array([T0 + t]), rows[t : t + 1], now=T0 + t)
            out |= {alert_id(e) for e in result.events if e.event == "raised"}
        return out

    live = engine(model)
    raised(live, range(10))
    save_snapshot(tmp_path / "s.npz", [live])
    before = raised(live, range(10, 100))
    restored = engine(model)  # the crash: what was raised after the snapshot is gone
    load_snapshot(tmp_path / "s.npz", [restored], now=T0 + 100)
    after = raised(restored, range(100, 200))
    assert len(before) == 2 and after and not before & after
