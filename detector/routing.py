"""Topic templates: which model a message goes to, and which stream it belongs to.

In a template, ``{stream}`` matches one or more topic levels and any other
``{name}`` exactly one; the stream id is the placeholders' values joined by
``/``. Each template yields an MQTT subscription filter and a matcher.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True)
class TopicTemplate:
    """A compiled template.

    >>> t = TopicTemplate.parse("plant/{site}/{machine}/telemetry")
    >>> t.filter, t.match("plant/north/p7/telemetry")
    ('plant/+/+/telemetry', 'north/p7')
    >>> TopicTemplate.parse("sensors/{stream}").match("sensors/a/b")
    'a/b'
    """

    template: str
    filter: str
    pattern: re.Pattern[str]

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        filters: list[str] = []
        regex: list[str] = []
        names = 0
        open_ended = False  # after {stream} the filter has ended with '#'
        for level in template.split("/"):
            m = _PLACEHOLDER.match(level)
            if m is None:
                if any(c in level for c in "{}+#"):
                    raise ValueError(f"topic template {template!r}: bad level {level!r}")
                part, pattern = level, re.escape(level)
            elif m.group(1) == "stream":
                if open_ended:
                    raise ValueError(f"topic template {template!r}: {{stream}} appears twice")
                part, pattern = "#", "(.+)"
                names += 1
            else:
                part, pattern = "+", "([^/]+)"
                names += 1
            if not open_ended:
                filters.append(part)
            open_ended = open_ended or part == "#"
            regex.append(pattern)
        if names == 0:
            raise ValueError(f"topic template {template!r} has no {{stream}} placeholder")
        return cls(template, "/".join(filters), re.compile("^" + "/".join(regex) + "$"))

    def match(self, topic: str) -> str | None:
        m = self.pattern.match(topic)
        if m is None:
            return None
        return "/".join(m.groups())


class Router:
    """Routes a topic to (route index, stream id); the first matching template wins."""

    def __init__(self, templates: list[tuple[str, int]]) -> None:
        self.routes = [(TopicTemplate.parse(t), target) for t, target in templates]

    @property
    def filters(self) -> list[str]:
        return sorted({t.filter for t, _ in self.routes})

    def route(self, topic: str) -> tuple[int, str] | None:
        for template, target in self.routes:
            stream = template.match(topic)
            if stream is not None:
                return target, stream
        return None
