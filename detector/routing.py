"""Topic templates: which model a message goes to, and which stream it belongs to.

In a template, ``{stream}`` matches one or more topic levels and any other
``{name}`` exactly one; the stream id is the placeholders' values joined by
``/``. A ``+`` level matches one level and is no part of the id (a partition
number, say). A ``$share/<group>/`` prefix stays in the subscription filter, and
topics, which the broker delivers without it, are matched against the rest.
Each template yields an MQTT subscription filter and a matcher.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_SHARED = re.compile(r"^\$share/([^/+#]+)/")  # a shared subscription's group


@dataclass(frozen=True)
class TopicTemplate:
    """A compiled template.

    >>> t = TopicTemplate.parse("plant/{site}/{machine}/telemetry")
    >>> t.filter, t.match("plant/north/p7/telemetry")
    ('plant/+/+/telemetry', 'north/p7')
    >>> TopicTemplate.parse("sensors/{stream}").match("sensors/a/b")
    'a/b'
    >>> t = TopicTemplate.parse("$share/rnnsentry/part/+/sensors/{stream}")
    >>> t.filter, t.match("part/3/sensors/p7"), t.match("part/5/sensors/p7")
    ('$share/rnnsentry/part/+/sensors/#', 'p7', 'p7')
    """

    template: str
    filter: str
    pattern: re.Pattern[str]

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        shared = _SHARED.match(template)
        if shared is None and template.startswith("$share/"):
            raise ValueError(f"topic template {template!r}: a shared subscription is"
                             " '$share/<group>/<template>'")  # fmt: skip
        share = shared.group(0) if shared else ""
        filters: list[str] = []
        regex: list[str] = []
        names = 0
        open_ended = False  # after {stream} the filter has ended with '#'
        for level in template[len(share) :].split("/"):
            m = _PLACEHOLDER.match(level)
            if level == "+":
                part, pattern = "+", "[^/]+"  # matched, not captured: no part of the stream id
            elif m is None:
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
        compiled = re.compile("^" + "/".join(regex) + "$")
        return cls(template, share + "/".join(filters), compiled)

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
