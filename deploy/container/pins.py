"""Print the images' constraints: for every package an image installs (rnnsentry's runtime
dependencies and theirs, no extras), ``name==version`` as installed in this environment.

    .venv/bin/python deploy/container/pins.py onnxruntime-gpu==1.31.1 \\
        > deploy/container/constraints.txt

Each argument is a pin added as given: the CUDA image's onnxruntime-gpu is not installed
here (its release with the same requirements as onnxruntime's, built for CUDA 13).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import distribution
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def canonical(name: str) -> str:
    """A distribution's name as the index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements() -> list[Requirement]:
    """rnnsentry's own runtime requirements, from the pyproject.toml beside this checkout."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def closure(roots: list[str]) -> dict[str, str]:
    """Every installed distribution that ``roots`` need (no extras), by name: its version."""
    found: dict[str, str] = {}
    todo = [canonical(name) for name in roots]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        dist = distribution(name)
        found[name] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    return found


def main(extra: list[str]) -> None:
    pins = closure([r.name for r in runtime_requirements()])
    lines = [f"{name}=={version}" for name, version in pins.items()] + extra
    print("# What the images of deploy/container install, pinned (pip install -c).")
    print("# Made by deploy/container/pins.py from a working environment: run it again to move.")
    print("\n".join(sorted(lines, key=str.lower)))


if __name__ == "__main__":
    main(sys.argv[1:])
