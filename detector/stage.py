"""The scoring stage: a micro-batch of raw messages in, scored samples and alerts out.

Per message: the topic's route (memoised), the payload parsed into the target model's
pending samples; then per model one ``Engine.process`` call, the metrics, and what the
:class:`~detector.publisher.Publisher` sends. Rejections are counted by reason and logged
at most once per reason every ten seconds, and a model whose streams this process sees only
in part (:class:`PartialStreams`) is said at most every ten minutes. It keeps no thread and
takes no lock: its caller runs one batch at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np

from detector.config import Config, MqttConfig
from detector.engine import (
    DUPLICATE,
    LONG_INTERVAL,
    MODEL_NON_FINITE,
    OUT_OF_ORDER,
    SCORED,
    Engine,
)
from detector.errors import ConfigError, ModelFileError, PayloadError
from detector.link import Inbound
from detector.metrics import Metrics
from detector.model import LoadedModel
from detector.payload import PlainForm, parse_into
from detector.publisher import Publisher, publishable
from detector.routing import Router

log = logging.getLogger(__name__)

_STATUS_REASON = {OUT_OF_ORDER: "out_of_order", DUPLICATE: "duplicate",
                  MODEL_NON_FINITE: "model_non_finite"}  # fmt: skip
_REJECTION_LOG_EVERY_S = 10.0
_ROUTE_MEMO_MAX = 131_072  # topics remembered (~200 bytes each, 26 MB at most); cleared when full
# Route targets below 0 are refusals, each with its rejection reason.
REFUSED: Final = {-1: "unknown_route", -2: "unpublishable"}
_UNROUTABLE: Final = (-1, "")  # a memoised "no template matches this topic"
_PARTIAL_WINDOW = 200  # intervals between a stream's samples judged at a time, per model
_PARTIAL_SHARE = 0.25  # more of them long than this: the streams are seen in part
_PARTIAL_LOG_EVERY_S = 600.0


class Routes:
    """Each topic's (model index, stream), memoised: a model index of -1 when no template
    matches, -2 when the stream's alerts could not be published (see REFUSED). With
    ``shard``, ``shards`` also holds the process that owns each routed topic's stream. The
    loop that routes a message takes ``memo.get(topic) or resolve(topic)``."""

    def __init__(self, router: Router, mqtt: MqttConfig,
                 shard: Callable[[str], int] | None = None) -> None:  # fmt: skip
        self.router = router
        self.mqtt = mqtt
        self.shard = shard
        self.memo: dict[str, tuple[int, str]] = {}
        self.shards: dict[str, int] = {}

    def resolve(self, topic: str) -> tuple[int, str]:
        if len(self.memo) >= _ROUTE_MEMO_MAX:
            self.memo.clear()
            self.shards.clear()
        found = self.router.route(topic)
        if found is None:
            route = _UNROUTABLE
        elif not publishable(found[1], self.mqtt):
            route = (-2, found[1])
        else:
            route = found
            if self.shard is not None:
                self.shards[topic] = self.shard(found[1])
        self.memo[topic] = route
        return route


class RateLimitedLog:
    """At most one warning per reason per interval, saying how many were not logged.

    >>> r = RateLimitedLog(10.0)
    >>> [r.note("decode", "x", now=t) for t in (0.0, 1.0, 11.0)]
    [True, False, True]
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def note(self, reason: str, detail: str, count: int = 1, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last.get(reason, -math.inf) < self.every_s:
            self._quiet[reason] = self._quiet.get(reason, 0) + count
            return False
        self._last[reason] = now
        quiet = self._quiet.pop(reason, 0)
        log.warning("rejected (%s): %s%s", reason, detail,
                    f" [+{quiet} more since the last such line]" if quiet else "")  # fmt: skip
        return True


class PartialStreams:
    """Says when this process sees only part of a model's streams' samples: more than a
    quarter of a window of intervals between a stream's samples were longer than
    LONG_INTERVAL of the model's sample intervals. A stream seen whole has next to none; a
    round-robin shared subscription deals each stream out to n daemons and leaves each
    1 - 1/n of them long (half at least, and out of order none). One line per model every
    ten minutes at most.

    >>> p = PartialStreams()
    >>> p.note("m", 1.5, 200, 40, now=0.0), p.note("m", 1.5, 200, 100, now=1.0)
    (False, True)
    >>> p.note("m", 1.5, 200, 100, now=2.0), p.note("m", 1.5, 200, 100, now=601.0)
    (False, True)
    """

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}  # model -> [intervals, long ones] this window
        self._said_at: dict[str, float] = {}

    def note(self, model: str, long_s: float, intervals: int, long: int,
             now: float | None = None) -> bool:  # fmt: skip
        counts = self._counts.setdefault(model, [0, 0])
        counts[0] += intervals
        counts[1] += long
        if counts[0] < _PARTIAL_WINDOW:
            return False
        seen, late = counts
        counts[0] = counts[1] = 0
        now = time.monotonic() if now is None else now
        if late <= _PARTIAL_SHARE * seen:
            return False
        if now - self._said_at.get(model, -math.inf) < _PARTIAL_LOG_EVERY_S:
            return False
        self._said_at[model] = now
        log.warning(
            "model %s: %d of the last %d intervals between a stream's samples were longer than"
            " %g s (%g of the model's sample interval): this daemon sees only part of its"
            " streams' samples. A round-robin shared subscription deals each stream out to"
            " several daemons (partition by stream instead: EMQX's hash_topic or a NATS"
            " partition mapping, README \"Scaling out\"); else the streams are sampled more"
            " slowly than the model expects, or samples are lost on the way",
            model, late, seen, long_s, LONG_INTERVAL,
        )  # fmt: skip
        return True


@dataclass
class Pending:
    """Samples of one batch bound for one model."""

    streams: list[str]
    ts: list[float]
    values: list[float]  # flat: the model's n_features values per sample, in feature order
    received: list[float]
    again: list[int]  # the samples the broker sent before (a redelivery; rare)


def load_engines(config: Config) -> tuple[list[Engine], Router]:
    """Load and check every configured model file, with the router to them; raises
    ModelFileError naming the bad file, ConfigError for two models of one name."""
    rt = config.runtime
    engines: list[Engine] = []
    routes: list[tuple[str, int]] = []
    for i, mc in enumerate(config.models):
        try:
            model = LoadedModel.load(mc.path, mc.name or None, rt.providers, rt.intra_op_threads)
        except ModelFileError as exc:  # named by its setting, as every start-up error is
            raise ModelFileError(f"models[{i}].path: {exc}") from None
        engines.append(Engine(model, config.scoring, config.streams))
        routes.extend((topic, i) for topic in mc.topics)
    names = [e.model.name for e in engines]
    for name in sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"two models are named {name!r}: give each a name in [[models]]")
    return engines, Router(routes)


class ScoringStage:
    """Routes, parses, steps and publishes micro-batches for a set of models."""

    def __init__(self, config: Config, metrics: Metrics, publisher: Publisher) -> None:
        self.config = config
        self.metrics = metrics
        self.publisher = publisher
        self.engines: list[Engine] = []
        self.router = Router([])
        self._forms: list[PlainForm] = []
        self.routes = Routes(self.router, config.mqtt)
        self._rejection_log = RateLimitedLog(_REJECTION_LOG_EVERY_S)
        self.partial = PartialStreams()

    def install(self, engines: list[Engine], router: Router) -> None:
        """Serve these models from the next batch on; the route memo starts afresh. The
        alerts a reload cleared (``detector.engine.take_over``) are published now."""
        self.engines, self.router = engines, router
        self._forms = [PlainForm.of(tuple(e.model.meta.features)) for e in engines]
        self.routes = Routes(router, self.config.mqtt)
        self._publish_pending()

    def streams_active(self) -> int:
        return sum(len(e.table) for e in self.engines)

    def evict_idle(self, now: float) -> None:
        """Forget streams idle for their TTL; an alert open on one is cleared."""
        m = self.metrics
        m.evictions.inc(sum(e.evict_idle(now) for e in self.engines))
        self._publish_pending()
        self.gauge_streams()

    def _publish_pending(self) -> None:
        """The cleared alerts of streams the engines let go (evicted, or taken over afresh)."""
        decided = time.time()
        for engine in self.engines:
            for event in engine.take_pending():
                self.publisher.alert(engine.model, event, decided)

    def gauge_streams(self, alerts: bool = True) -> None:
        """Set the gauges of streams in memory and, with ``alerts`` (a pass over every row:
        only when an alert may have begun or ended), of streams in alert."""
        self.metrics.streams_active.set(self.streams_active())
        if alerts:
            # A forgotten stream's row is reset, so a set flag is a live stream in alert.
            active = sum(int(np.count_nonzero(e.table.arrays["active"])) for e in self.engines)
            self.metrics.alerts_active.set(active)

    def process(self, batch: list[Inbound]) -> None:
        """Route, parse, step and publish one micro-batch.

        The loop runs once per message, so it stays small: a memoised route, then
        ``parse_into``, which decodes once and says why when it rejects.
        """
        m = self.metrics
        pending: dict[int, Pending] = {}
        limits = self.config.payload
        engines, forms = self.engines, self._forms
        routes, resolve = self.routes.memo, self.routes.resolve
        for topic, payload, received, again in batch:
            target, stream = routes.get(topic) or resolve(topic)
            if target < 0:
                why = REFUSED[target]
                m.reject(why)
                self._rejection_log.note(why, f"{topic[:200]!r}")
                continue
            p = pending.get(target)
            if p is None:
                p = pending[target] = Pending([], [], [], [], [])
            try:
                k, ignored = parse_into(payload, forms[target], received, limits, p.ts, p.values)
            except PayloadError as exc:
                m.reject(exc.reason)
                self._rejection_log.note(exc.reason, f"{topic}: {exc.detail}")
                continue
            if ignored:
                m.ignored_values.inc(ignored)
            if k == 1:
                p.streams.append(stream)
                p.received.append(received)
            else:
                p.streams.extend([stream] * k)
                p.received.extend([received] * k)
            if again:
                p.again.extend(range(len(p.streams) - k, len(p.streams)))
        alerts = False
        for target, p in pending.items():
            if p.streams:
                alerts |= self._step(engines[target], p)
        self.gauge_streams(alerts)

    def _step(self, engine: Engine, p: Pending) -> bool:
        """Step one model's samples; True if an alert was raised or cleared."""
        m = self.metrics
        n = len(p.streams)
        x = np.array(p.values, dtype=np.float64).reshape(n, engine.model.meta.n_features)
        ts = np.array(p.ts, dtype=np.float64)
        # A time far ahead of its receipt, or before 1970, would become the stream's last
        # time and have every later sample rejected as out of order: refused here.
        received = np.array(p.received, dtype=np.float64)
        again = None
        if p.again:
            again = np.zeros(n, np.bool_)
            again[p.again] = True
        sane = (ts > 0.0) & (ts <= received + self.config.payload.max_ahead_s)
        if not sane.all():
            bad = int(n - np.count_nonzero(sane))
            m.reject("bad_timestamp", bad)
            why = f"{bad} sample(s) in one batch: a time before 1970 or too far ahead of now"
            self._rejection_log.note("bad_timestamp", why, bad)
            keep = np.flatnonzero(sane)
            p = Pending([p.streams[i] for i in keep], ts[keep].tolist(), [], [], [])
            x, ts, received, n = x[keep], ts[keep], received[keep], len(keep)
            if again is not None:
                again = again[keep]
            if not n:
                return False
        result = engine.process(p.streams, ts, x)
        # The engine knows a sample it scored only by its stream's last time; a sample the
        # broker sends again (after a reconnect, or its own restart, before it read our
        # acknowledgement) may be older than that, and is a duplicate, not one out of order.
        if again is not None:
            result.status[again & (result.status == OUT_OF_ORDER)] = DUPLICATE
        decided = time.time()
        m.batch_size.observe_many(np.asarray(result.call_sizes, dtype=np.float64))
        m.inference_seconds.observe_many(np.asarray(result.call_seconds, dtype=np.float64))
        scored = result.status == SCORED
        n_scored = int(np.count_nonzero(scored))
        m.messages.labels("scored").inc(n_scored)
        if n_scored < n:
            for code, reason in _STATUS_REASON.items():
                count = int(np.count_nonzero(result.status == code))
                if count:
                    m.reject(reason, count)
                    self._rejection_log.note(reason, f"{count} sample(s) in one batch", count)
        if result.intervals:
            self.partial.note(engine.model.name, engine.long_interval_s, result.intervals,
                              result.long_intervals)  # fmt: skip
        if result.gap_resets:
            m.gap_resets.inc(result.gap_resets)
        if result.evicted:
            m.evictions.inc(result.evicted)
        m.decision_latency.observe_many(decided - received)
        for event in result.events:
            self.publisher.alert(engine.model, event, decided)
        self.publisher.announce(engine.model, p.streams, p.ts, result.active)
        self.publisher.scores(p.streams, p.ts, result, scored)
        return any(event.event != "update" for event in result.events)
