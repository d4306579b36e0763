"""One batched step of many streams through one model: the data path's core.

``Engine.process`` takes B samples (stream ids, timestamps, raw values), splits
them into rounds so a stream seen twice is stepped in order, gathers the batch's
streams' states once, and per round: checks timestamps (out of order, duplicate,
gap reset), makes ONE onnxruntime call and scores against the previous
predictions; the new states are scattered back once, after the last round. The
daemon, ``replay`` and the evaluation all use it.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from detector.config import StreamConfig
from detector.model import LoadedModel
from detector.scoring import Scorer, ScoringConfig, scorer_column_specs, top_features
from detector.state import Column, StateTable, put_rows, reset_rows, take_rows

log = logging.getLogger(__name__)

# Per-sample outcome codes in BatchResult.status.
SCORED: Final = 0
OUT_OF_ORDER: Final = 1
DUPLICATE: Final = 2
MODEL_NON_FINITE: Final = 3
# An interval between two of a stream's samples longer than this many of the model's sample
# intervals means a sample between them was not seen here (or the stream is sampled slower).
LONG_INTERVAL: Final = 1.5


@dataclass(frozen=True)
class AlertEvent:
    """A raised or cleared alert of one stream, ready to publish."""

    index: int  # position of the sample in the batch
    stream: str
    event: str  # "raised" | "cleared" | "update"
    episode: int
    ts: float
    episode_ts: float  # the sample time its episode was raised at (NaN: from before it was kept)
    likelihood: float
    score: float  # log-scaled, see detector.scoring.log_score
    raw_score: float
    top: list[tuple[str, float, float]]  # (feature, standardised error at this sample, share
    # of the alert's average), the largest shares first
    reason: str = ""  # why a cleared alert ended other than by calm: "evicted" (stream
    # dropped) or "reloaded" (another model took the streams over, afresh)


@dataclass
class BatchResult:
    status: np.ndarray  # int8 [B]: SCORED, OUT_OF_ORDER, DUPLICATE, MODEL_NON_FINITE
    raw: np.ndarray  # [B] raw score (NaN: not scored or no prediction yet)
    likelihood: np.ndarray  # [B] anomaly likelihood (0 during warm-up)
    score: np.ndarray  # [B] log-scaled anomaly score in [0, 1] (0 during warm-up)
    active: np.ndarray  # [B] bool: an alert is active after this sample
    std_errors: np.ndarray  # [B, F]
    contributions: np.ndarray  # [B, F] each feature's part of the most surprising signal
    # (what an alert at the sample names: a spike's errors, a stuck run, the average's parts)
    events: list[AlertEvent] = field(default_factory=list)
    gap_resets: int = 0
    intervals: int = 0  # samples taken that followed one of their stream's (not after a restore)
    long_intervals: int = 0  # of those, more than LONG_INTERVAL sample intervals after it
    new_streams: int = 0
    evicted: int = 0  # streams forgotten to make room (table at max_streams)
    call_sizes: list[int] = field(default_factory=list)  # onnxruntime batch sizes
    call_seconds: list[float] = field(default_factory=list)


def _rounds(streams: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Indices split so that no stream appears twice in a round, order kept; and each
    sample's stream as a number, in order of first appearance (its place in the first
    round, which holds every stream once).

    >>> rounds, place = _rounds(["a", "b", "a", "a"])
    >>> [r.tolist() for r in rounds], place.tolist()
    ([[0, 1], [2], [3]], [0, 1, 0, 0])
    """
    n = len(streams)
    if len(set(streams)) == n:
        every = np.arange(n)
        return [every], every  # the usual case: every stream once
    # A sample's round is how many samples of its stream come before it (batch payloads:
    # a hundred per stream), worked out with sorts rather than a Python loop.
    ids: dict[str, int] = {}  # stream -> a number of its own (its first sample's index)
    codes = np.fromiter(map(ids.setdefault, streams, itertools.count()), np.int64, n)
    by_stream = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    occurrence = np.empty(n, dtype=np.int64)
    occurrence[by_stream] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    by_round = np.argsort(occurrence, kind="stable")
    place = np.unique(codes, return_inverse=True)[1].reshape(n)
    return np.split(by_round, np.cumsum(np.bincount(occurrence))[:-1]), place


class Engine:
    """Owns one model's state table and scorer; single-threaded by design."""

    def __init__(
        self,
        model: LoadedModel,
        scoring: ScoringConfig | None = None,
        streams: StreamConfig | None = None,
    ) -> None:
        self.model = model
        self.scoring = scoring or ScoringConfig()
        self.stream_config = streams or StreamConfig()
        self.scorer = Scorer(self.scoring, model.meta.calibration)
        self.max_gap_s = self.stream_config.gap_limit(model.meta.sample_interval_s)
        self.long_interval_s = LONG_INTERVAL * (model.meta.sample_interval_s or math.inf)
        meta = model.meta
        f = meta.n_features
        columns: dict[str, Column] = {
            name: Column(meta.state_shape(name), np.float32, 0.0, axis=1)
            for name in meta.state_names
        }
        columns["mean"] = Column((f,), np.float32, 0.0)
        columns["log_var"] = Column((f,), np.float32, 0.0)
        columns["has_pred"] = Column((), np.bool_, False)
        columns["last_ts"] = Column((), np.float64, math.nan)
        # Restored from a snapshot and not stepped since: the time since its last sample
        # includes the daemon's own absence (the samples scored after the snapshot, the
        # restart), not a silence of the sensor's, so the next sample is not a gap; it steps
        # the network without being scored against the prediction saved with the state.
        columns["resumed"] = Column((), np.bool_, False)
        columns["episode_ts"] = Column((), np.float64, math.nan)  # the sample time of the
        # current (or last) alert's raise: with the stream, its id, unique across restarts
        for name, (shape, dtype, fill) in scorer_column_specs(f).items():
            columns[name] = Column(shape, dtype, fill)
        self.table = StateTable(columns, self.stream_config.max_streams)
        self.table.on_remove = self._closing
        # Cleared events of active streams that were evicted, for the next caller to publish.
        self.pending_events: list[AlertEvent] = []
        # Reset on a gap: the network's memory and the scorer's averages, not the stream's
        # long-run statistics or its alert episode.
        self._gap_reset = [*meta.state_names, "mean", "log_var", "has_pred",
                           *self.scorer.gap_reset]  # fmt: skip
        self._step_cols = [*meta.state_names, "mean", "log_var", "has_pred"]

    def process(
        self, streams: list[str], ts: np.ndarray, x: np.ndarray, now: float | None = None
    ) -> BatchResult:
        """Step B samples; ``x`` [B, F] raw units (finite), ``ts`` [B] epoch seconds."""
        n = len(streams)
        f = self.model.meta.n_features
        result = BatchResult(
            status=np.zeros(n, np.int8),
            raw=np.full(n, np.nan),
            likelihood=np.zeros(n),
            score=np.zeros(n),
            active=np.zeros(n, np.bool_),
            std_errors=np.full((n, f), np.nan),
            contributions=np.full((n, f), np.nan),
        )
        if n == 0:
            return result
        now = time.time() if now is None else now
        ts = np.asarray(ts, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        rounds, place = _rounds(streams)
        # The batch's streams' rows, made once (a batch payload's hundred samples of a stream
        # are a hundred rounds), and one copy of their columns that every round works on:
        # gathered before the first, scattered after the last.
        table = self.table
        before, evicted = len(table), table.evicted
        # each round's streams; the first round holds every stream once
        names = [streams] if len(rounds) == 1 else [[streams[i] for i in r.tolist()]
                                                    for r in rounds]  # fmt: skip
        rows = table.rows_for(names[0], now)
        result.evicted += table.evicted - evicted
        result.new_streams += len(table) - before + (table.evicted - evicted)
        if self.pending_events:
            result.events.extend(self.take_pending())
        local = table.gather(rows)
        for idx, round_streams in zip(rounds, names, strict=True):
            self._round(idx, place[idx], local, round_streams, ts[idx], x[idx], result)
        table.scatter(rows, local)
        return result

    def _round(
        self,
        idx: np.ndarray,
        at: np.ndarray,
        local: dict[str, np.ndarray],
        streams: list[str],
        ts: np.ndarray,
        x: np.ndarray,
        result: BatchResult,
    ) -> None:
        """One round: samples ``idx`` of the batch, whose streams are at ``at`` in ``local``
        (the batch's copy of their columns, updated in place)."""
        last = local["last_ts"][at]
        resumed = local["resumed"][at]
        since = ts - last  # NaN for a new stream
        with np.errstate(invalid="ignore"):
            ooo = ts < last
            dup = ts == last
            gap = since > self.max_gap_s
            # What a restored stream's first sample follows includes the daemon's absence.
            result.intervals += int(np.count_nonzero((since > 0.0) & ~resumed))
            long = (since > self.long_interval_s) & ~resumed
            result.long_intervals += int(np.count_nonzero(long))
        absent = gap & resumed  # the daemon's own absence, not the sensor's silence
        gap &= ~resumed
        result.status[idx[ooo]] = OUT_OF_ORDER
        result.status[idx[dup]] = DUPLICATE
        if gap.any():
            reset_rows(self.table.columns, local, at[gap], self._gap_reset)
            result.gap_resets += int(gap.sum())
        keep = ~(ooo | dup)
        if not keep.any():
            return
        if not keep.all():
            idx, at, ts, x = idx[keep], at[keep], ts[keep], x[keep]
            streams = [streams[j] for j in np.flatnonzero(keep)]

        # Every stream of the copy, in its order (a round of a batch of single samples, or
        # of a batch payload's streams that sent alike): the copy's own arrays, no gather.
        whole = len(at) == len(local["last_ts"]) and bool((at == np.arange(len(at))).all())
        cols = dict(local) if whole else take_rows(self.table.columns, local, at)
        if resumed.any():
            if absent.any():
                # The prediction it holds was for a sample that came while the daemon was
                # away: this sample steps the network but is not scored against it.
                cols["has_pred"] = cols["has_pred"] & ~absent[keep]
            cols["resumed"] = np.zeros_like(cols["resumed"])
        model = self.model
        z_train = model.normalise(x)
        z = self.scorer.model_inputs(cols, z_train)  # over the stream's own input spread
        fed_z = self.scorer.model_feed(cols, z)  # an outlier held back
        fed = x if fed_z is z_train else model.denormalise(fed_z)
        t0 = time.perf_counter()
        out = model.step(fed, [cols[s] for s in model.meta.state_names])
        result.call_seconds.append(time.perf_counter() - t0)
        result.call_sizes.append(len(at))

        finite = np.isfinite(out.mean).all(1) & np.isfinite(out.log_var).all(1)
        for state in out.states:
            finite &= np.isfinite(state).all(axis=(0, 2))
        if not finite.all():
            # A network that produced NaN leaves the stream's previous state in place.
            result.status[idx[~finite]] = MODEL_NON_FINITE
            idx, at, ts = idx[finite], at[finite], ts[finite]
            z, z_train = z[finite], z_train[finite]
            streams = [streams[j] for j in np.flatnonzero(finite)]
            cols = take_rows(self.table.columns, cols, np.flatnonzero(finite))
            out.mean, out.log_var = out.mean[finite], out.log_var[finite]
            out.states = [s[:, finite] for s in out.states]
            whole = False  # the finite rows alone go back into the copy
            if len(at) == 0:
                return

        scores = self.scorer.step_batch(
            cols, z, cols["mean"], cols["log_var"], cols["has_pred"], z_train
        )
        for name, state in zip(model.meta.state_names, out.states, strict=True):
            cols[name] = state
        cols["mean"], cols["log_var"] = out.mean, out.log_var
        cols["has_pred"] = np.ones(len(at), np.bool_)
        cols["last_ts"] = ts
        if scores.raised.any():
            cols["episode_ts"] = np.where(scores.raised, ts, cols["episode_ts"])
        if whole:
            local.update(cols)
        else:
            put_rows(self.table.columns, local, at, cols)

        result.raw[idx] = scores.raw
        result.likelihood[idx] = scores.likelihood
        result.score[idx] = scores.score
        result.active[idx] = scores.active
        result.std_errors[idx] = scores.std_errors
        result.contributions[idx] = scores.contributions
        for k in np.flatnonzero(scores.raised | scores.cleared | scores.updated):
            result.events.append(
                self._event(int(k), idx, streams, ts, scores, float(cols["episode_ts"][k]))
            )

    def _event(
        self, k: int, idx: np.ndarray, streams: list[str], ts: np.ndarray, scores: Any,
        episode_ts: float,
    ) -> AlertEvent:  # fmt: skip
        features = self.model.meta.features
        errors, parts = scores.std_errors[k], scores.contributions[k]
        total = float(np.sum(parts))
        shares = parts / total if total > 0 else np.zeros_like(parts)
        top = [
            (features[i], float(errors[i]), float(shares[i]))
            for i in top_features(parts, self.scoring.top_k)
        ]
        i = int(idx[k])
        return AlertEvent(
            index=i,
            stream=streams[k],
            event="raised" if scores.raised[k] else "cleared" if scores.cleared[k] else "update",
            episode=int(scores.episode[k]),
            ts=float(ts[k]),
            episode_ts=episode_ts,
            likelihood=float(scores.likelihood[k]),
            score=float(scores.score[k]),
            raw_score=float(scores.raw[k]),
            top=top,
        )

    def _closing(self, rows: np.ndarray, reason: str = "evicted") -> None:
        """Rows about to be let go (evicted, or left behind by a reload's new network): an
        active alert among them is cleared with ``reason``, so that every raised alert has
        its cleared even when its stream is forgotten."""
        a, ids = self.table.arrays, self.table.ids
        for row in rows[a["active"][rows]].tolist():
            self.pending_events.append(AlertEvent(
                index=-1, stream=str(ids[row]), event="cleared",
                episode=int(a["episodes"][row]), ts=float(a["last_ts"][row]),
                episode_ts=float(a["episode_ts"][row]), likelihood=math.nan, score=0.0,
                raw_score=math.nan, top=[], reason=reason,
            ))  # fmt: skip

    def take_pending(self) -> list[AlertEvent]:
        """The cleared events of evicted streams not yet handed out."""
        events, self.pending_events = self.pending_events, []
        return events

    def adopt_alert(self, stream: str, raised: bool, episode: int, episode_ts: float,
                    ts: float, now: float) -> bool:  # fmt: skip
        """Set a stream's alert to what was last published of it (the alert journal), if
        that came at or after the stream's state (a restore from an older snapshot). A
        raised alert of a stream the state does not hold makes its row. True: changed."""
        table = self.table
        row = table.index.get(stream)
        if row is None:
            if not raised:
                return False
            row = int(table.rows_for([stream], now)[0])
        a = table.arrays
        if ts < a["last_ts"][row]:  # the state is newer than the event
            return False
        if bool(a["active"][row]) == raised and a["episode_ts"][row] == episode_ts:
            return False
        a["active"][row] = raised
        a["below"][row] = 0
        a["episodes"][row] = max(int(a["episodes"][row]), episode)
        a["episode_ts"][row] = episode_ts
        return True

    def mark_resumed(self, rows: np.ndarray) -> None:
        """These rows were restored from a snapshot: their next sample is no gap."""
        self.table.arrays["resumed"][rows] = True

    def adopt_state(self, old: Engine) -> bool:
        """Take over ``old``'s streams if it ran the same network (the graph's fingerprint)
        with per-stream arrays of the same shapes. True: taken over.

        Used by a reload: a file reloaded unchanged keeps every stream as it was. A stream's
        state is its network's (the recurrent states, the error scale and tails, the long-run
        statistics, all in that network's terms), so a retrained model, even of the same
        shapes, starts every stream afresh from its own calibration and warm-up, as a new
        stream starts. An alert open on one is cleared (reason ``reloaded``), so that each
        raised alert has its cleared; those events, and ``old``'s pending ones, wait in
        ``pending_events``.
        """
        same = (self.model.meta.fingerprint == old.model.meta.fingerprint
                and self.table.columns == old.table.columns)  # fmt: skip
        if same:
            self.table = old.table
            self.table.on_remove = self._closing
        else:
            live = np.fromiter(old.table.index.values(), np.int64, len(old.table))
            old._closing(live, reason="reloaded")
        self.pending_events = old.take_pending()
        return same

    def evict_idle(self, now: float) -> int:
        """Forget streams idle for ``idle_ttl_s``; their open alerts wait in
        ``pending_events``."""
        return self.table.evict_idle(now, self.stream_config.idle_ttl_s)


def take_over(engines: Sequence[Engine], previous: Sequence[Engine]) -> None:
    """A reload: each new engine takes the streams of the engine it replaces (the same
    ``[[models]]`` entry, whatever name the new file carries) by ``Engine.adopt_state``, and
    says where they start afresh."""
    for engine, old in zip(engines, previous, strict=True):
        if not engine.adopt_state(old) and len(old.table):
            was, now = old.model.meta, engine.model.meta
            why = (f"another network ({now.fingerprint}, was {was.fingerprint})"
                   if now.fingerprint != was.fingerprint else "another state shape")  # fmt: skip
            log.info("model %s: %s: its %d stream(s) start afresh, from its calibration and"
                     " warm-up; alerts open on them are cleared (reason reloaded)",
                     engine.model.name, why, len(old.table))  # fmt: skip
