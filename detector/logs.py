"""How the daemon's processes write their log: readable lines, or one JSON object a line.

``[daemon] log_format = "json"`` (or ``RNNSENTRY_DAEMON__LOG_FORMAT=json``) gives each record
as one JSON object on one line, with ``time`` (ISO 8601, UTC), ``level``, ``logger``,
``message``, ``exception`` (the traceback, when there is one) and, in a scoring process,
``worker``: what a log collector (Loki, Elasticsearch, journald's JSON) reads without a
pattern.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Final

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped).

    >>> record = logging.LogRecord("detector.mqtt", logging.WARNING, __file__, 1,
    ...                            "not connected: %s", ("refused",), None)
    >>> record.created = 0.0
    >>> print(JsonFormatter().format(record))
    {"time": "1970-01-01T00:00:00.000Z", "level": "WARNING", "logger": "detector.mqtt", "message": "not connected: refused"}
    """  # noqa: E501

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        doc: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            doc["worker"] = self.worker
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc)  # ASCII only: a lone surrogate from a topic cannot break it


def formatter(log_format: str, worker: int | None = None) -> logging.Formatter:
    """The formatter of ``log_format`` ("text" or "json") for the main process or a worker."""
    if log_format == "json":
        return JsonFormatter(worker)
    if worker is None:
        return logging.Formatter(TEXT_FORMAT)
    return logging.Formatter(f"%(asctime)s %(levelname)s worker {worker}: %(message)s")


_handler: logging.Handler | None = None  # the stderr handler that configure() added


def configure(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Log at ``level`` on stderr in ``log_format``; called again, it changes both. A root
    logger that has handlers of someone else's (pytest's) keeps them, untouched."""
    global _handler
    root = logging.getLogger()
    if _handler is None and not root.handlers:
        _handler = logging.StreamHandler()
        root.addHandler(_handler)
    if _handler is not None:
        _handler.setFormatter(formatter(log_format, worker))
    root.setLevel(level.upper())
