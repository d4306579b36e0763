"""The alert journal: what each process last published of each stream's alert, so that a
restart from an older snapshot neither repeats nor orphans an alert.

A snapshot holds each stream's alert as it was when the snapshot was taken. A raise or a
clear published after that, then lost to a crash, would leave the broker's subscribers
with an alert the restored state does not know (never cleared) or with a cleared one the
state still holds (cleared twice). So every raised and cleared event is appended to a
journal beside the snapshot (``<snapshot>.alerts.<process>``, one JSON line each, flushed
to the operating system before the event is handed to MQTT: it survives the process,
not the machine). At start, after the snapshot, each stream's latest journal entry is
laid over its restored state when it is not older than that state. After a snapshot is
written, each journal keeps only what came after its capture, so it stays small.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from detector.engine import AlertEvent, Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """A stream's alert as last published: raised or cleared, its episode, the sample time
    it was raised at (the alert id's) and the sample time of the event."""

    raised: bool
    episode: int
    episode_ts: float
    ts: float


def journal_path(snapshot: str | Path, index: int) -> Path:
    """Process ``index``'s journal beside ``snapshot``."""
    return Path(f"{snapshot}.alerts.{index}")


def _journals(snapshot: str | Path) -> list[tuple[int, Path]]:
    """Every journal file beside ``snapshot`` with its process index."""
    path = Path(snapshot)
    prefix = f"{path.name}.alerts."
    found = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            found.append((int(name[len(prefix) :]), path.parent / name))
    return sorted(found)


def read_journals(snapshot: str | Path) -> dict[tuple[str, str], Entry]:
    """Each (model, stream)'s latest entry over every journal beside ``snapshot``: the
    latest by sample time, then by order in its file. A torn or foreign line is skipped."""
    latest: dict[tuple[str, str], Entry] = {}
    for _, path in _journals(snapshot):
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            log.warning("cannot read the alert journal %s: %s", path, exc.strerror)
            continue
        skipped = 0
        for line in lines:
            try:
                doc = json.loads(line)
                key = (str(doc["model"]), str(doc["stream"]))
                since = doc["episode_ts"]
                entry = Entry(doc["event"] == "raised", int(doc["episode"]),
                              math.nan if since is None else float(since),
                              float(doc["ts"]))  # fmt: skip
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            seen = latest.get(key)
            if seen is None or entry.ts >= seen.ts:
                latest[key] = entry
        if skipped:
            log.warning("alert journal %s: %d line(s) not readable, skipped", path, skipped)
    return latest


def apply_journal(
    entries: dict[tuple[str, str], Entry], engines: Sequence[Engine], now: float,
    keep: Callable[[str], bool] | None = None,
) -> int:  # fmt: skip
    """Lay the journal's entries over the restored streams (``keep``: only those it accepts);
    returns how many alerts changed."""
    by_name = {e.model.name: e for e in engines}
    changed = 0
    for (model, stream), entry in entries.items():
        engine = by_name.get(model)
        if engine is None or (keep is not None and not keep(stream)):
            continue
        changed += engine.adopt_alert(stream, entry.raised, entry.episode, entry.episode_ts,
                                      entry.ts, now)  # fmt: skip
    return changed


def remove_stale(snapshot: str | Path, processes: int) -> None:
    """Remove the journals of process indexes this run does not have (a run with more
    processes left them); call once a snapshot holds what they said."""
    for index, path in _journals(snapshot):
        if index >= processes:
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot remove the old alert journal %s: %s", path, exc.strerror)


class AlertJournal:
    """One process's journal: ``record`` appends; ``mark`` (with a snapshot's capture) and
    ``compact`` (once that snapshot is written) trim it. ``on_error`` is told of each
    failed write (the event is still published)."""

    def __init__(self, path: Path, on_error: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.on_error = on_error
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._mark = 0  # where the journal ended at the last capture

    def record(self, model: str, event: AlertEvent) -> None:
        if event.event not in ("raised", "cleared"):
            return
        line = json.dumps({
            "model": model, "stream": event.stream, "event": event.event,
            "episode": event.episode, "ts": event.ts,
            "episode_ts": None if math.isnan(event.episode_ts) else event.episode_ts,
        }).encode() + b"\n"  # fmt: skip
        with self._lock:
            try:
                if self._file is None:
                    self._file = open(self.path, "ab")  # noqa: SIM115 (kept open; close())
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                self.on_error()
                log.error("cannot write the alert journal %s: %s", self.path, exc.strerror)

    def mark(self) -> None:
        """Note where the journal ends now, as a snapshot's state is captured."""
        with self._lock:
            try:
                self._mark = self.path.stat().st_size
            except OSError:
                self._mark = 0

    def compact(self) -> None:
        """Keep only what was recorded after the mark: the snapshot written holds the rest."""
        with self._lock:
            mark, self._mark = self._mark, 0
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return
            except OSError as exc:
                log.warning("cannot read the alert journal %s: %s", self.path, exc.strerror)
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                with open(tmp, "wb") as out:
                    out.write(data[mark:])
                    out.flush()
                    os.fsync(out.fileno())
                if self._file is not None:
                    self._file.close()
                    self._file = None
                os.replace(tmp, self.path)
            except OSError as exc:
                self.on_error()
                log.error("cannot trim the alert journal %s: %s", self.path, exc.strerror)
                tmp.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
