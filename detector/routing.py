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
        levels = template.split("/")
        filters: list[str] = []
        regex: list[str] = []
        names = 0
        for i, level in enumerate(levels):
            m = _PLACEHOLDER.match(level)
            if m is None:
                if "{" in level or "}" in level or "+" in level or "#" in level:
                    raise ValueError(f"topic template {template!r}: bad level {level!r}")
                filters.append(level)
                regex.append(re.escape(level))
                continue
            names += 1
            if m.group(1) == "stream":
                # Multi-level: '#' must end a filter, so the filter stops here.
                filters.append("#")
                regex.append("(.+)")
                if i < len(levels) - 1:
                    regex.extend(re.escape(lv) if not _PLACEHOLDER.match(lv) else "([^/]+)"
                                 for lv in levels[i + 1 :])  # fmt: skip
                    names += sum(1 for lv in levels[i + 1 :] if _PLACEHOLDER.match(lv))
                break
            filters.append("+")
            regex.append("([^/]+)")
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
