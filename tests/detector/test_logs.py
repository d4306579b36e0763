"""The JSON log format: one object a line, the traceback inside it; and its setting."""

from __future__ import annotations

import io
import json
import logging

from detector.config import build_config
from detector.logs import JsonFormatter


def test_an_exception_goes_into_its_one_line() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(worker=3))
    log = logging.getLogger("tests.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError("bad\nbatch")
        except ValueError:
            log.exception("batch of %d messages failed", 7)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "batch of 7 messages failed"
    assert (record["level"], record["logger"], record["worker"]) == ("ERROR", "tests.json", 3)
    assert record["exception"].startswith("Traceback")
    assert "ValueError: bad\nbatch" in record["exception"]


def test_the_format_is_text_or_json() -> None:
    config, problems = build_config({"daemon": {"log_format": "json"}})
    assert problems == [] and config.daemon.log_format == "json"
    assert build_config({})[0].daemon.log_format == "text"
    _, problems = build_config({"daemon": {"log_format": "xml"}})
    assert problems == ["daemon.log_format: one of text, json"]
