"""Static checks of the daemon's images (no container engine runs here): the Dockerfiles are
parsed; every file they copy exists and is sent in the build context (.dockerignore), every
package they install is pinned in constraints.txt, and both carry the OCI labels."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "deploy" / "container"
DOCKERFILES = [CONTAINER / "Dockerfile", CONTAINER / "Dockerfile.cuda"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# onnxruntime-gpu is not installed here; each release requires what onnxruntime's does.
INSTEAD_OF = {"onnxruntime-gpu": "onnxruntime"}
OCI_LABELS = {"title", "description", "version", "licenses", "revision", "created", "base.name"}


def pins_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pins", CONTAINER / "pins.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments out."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment within a continued instruction is dropped too, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        found.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside an instruction"
    return found


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, from its FROM on."""
    out: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(path):
        if keyword == "FROM":
            out.append([])
        assert out, f"{path.name}: {keyword} before FROM"
        out[-1].append((keyword, args))
    return out


def words(args: str) -> list[str]:
    """An instruction's arguments, in its JSON (exec) form or its shell form."""
    return list(json.loads(args)) if args.startswith("[") else shlex.split(args)


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not from a stage)."""
    out = []
    for keyword, args in instructions(path):
        if keyword in ("COPY", "ADD"):
            parts = words(args)
            flags = [p for p in parts if p.startswith("--")]
            rest = [p for p in parts if not p.startswith("--")]
            if not any(f.startswith("--from=") for f in flags):
                out.append((rest[:-1], rest[-1]))
    return out


def labels(stage: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "LABEL":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                found[key] = value
    return found


def pip_installs(path: Path) -> list[list[str]]:
    """The words of each ``pip install`` command of the Dockerfile's RUN instructions."""
    out = []
    for keyword, args in instructions(path):
        if keyword == "RUN":
            for command in re.split(r"&&|;", args):
                parts = shlex.split(command)
                if "pip" in " ".join(parts[:1]) and parts[1:2] == ["install"]:
                    out.append(parts[2:])
    return out


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore's patterns as (is an exception, regex), in order."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):  # Go's filepath.Match, and ** for any number of folders
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def is_ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves ``relative`` out: the last pattern that matches it or
    a folder above it decides."""
    parts = relative.strip("/").split("/")
    ignored = False
    for negate, regex in patterns:
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_the_build_context_is_the_root_that_holds_the_dockerignore() -> None:
    services = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    build = services["rnnsentry"]["build"]
    assert (ROOT / "deploy" / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).exists()


def test_the_context_leaves_out_environments_history_caches_and_output() -> None:
    patterns = dockerignore()
    for path in (".venv/bin/python", ".git/HEAD", ".pytest_cache/v/x", ".mypy_cache/x.json",
                 ".ruff_cache/x", ".hypothesis/examples/x", "detector/__pycache__/cli.pyc",
                 "training/scoring/__pycache__/x.pyc", "bench/figures/nab.png", "tests/unit/x.py",
                 "out/model.onnx", "pytest-of-root/pytest-1/x", "deploy/model.onnx",
                 "rnnsentry.egg-info/PKG-INFO"):  # fmt: skip
        assert is_ignored(path, patterns), path
    assert not is_ignored("detector/scoring/alerts.py", patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_file_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    patterns = dockerignore()
    copied = [source for sources, _ in copies(dockerfile) for source in sources]
    assert "deploy/container/constraints.txt" in copied
    for source in copied:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")
                                               if "__pycache__" not in p.parts]  # fmt: skip
        assert files, source
        for file in files:
            assert not is_ignored(str(file.relative_to(ROOT)), patterns), file


def installed_names(dockerfile: Path) -> set[str]:
    """Every distribution the Dockerfile's pip commands install (but rnnsentry itself)."""
    pins = pins_module()
    names: set[str] = set()
    for parts in pip_installs(dockerfile):
        assert "-c" in parts, f"{dockerfile.name}: pip install without constraints: {parts}"
        takes_value = {"-c", "--constraint", "--prefix", "-r", "--requirement", "--target"}
        wanted = [p for i, p in enumerate(parts)
                  if not p.startswith("-") and parts[i - 1] not in takes_value]  # fmt: skip
        if "." in wanted:
            wanted.remove(".")
            if "--no-deps" not in parts:
                wanted += [r.name for r in pins.runtime_requirements()]
        for name in map(pins.canonical, wanted):
            names.add(name)
            names |= set(pins.closure([INSTEAD_OF.get(name, name)])) - {INSTEAD_OF.get(name)}
    return names


def constraints() -> dict[str, Version]:
    pinned: dict[str, Version] = {}
    for raw in (CONTAINER / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and name not in pinned, f"not one exact pin: {line}"
            pinned[name] = Version(version)
    return pinned


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_package_the_image_installs_is_pinned(dockerfile: Path) -> None:
    names = installed_names(dockerfile)
    assert {"numpy", "paho-mqtt", "prometheus-client", "protobuf"} <= names
    assert ("onnxruntime-gpu" in names) == dockerfile.name.endswith(".cuda")
    assert ("onnxruntime" in names) != dockerfile.name.endswith(".cuda")  # never both
    assert "torch" not in names
    pinned = constraints()
    assert names <= pinned.keys(), names - pinned.keys()


def test_the_pins_satisfy_the_package_requirements() -> None:
    pins = pins_module()
    pinned = constraints()
    gpu = [Requirement(text) for text in PYPROJECT["project"]["optional-dependencies"]["gpu"]]
    for requirement in [*pins.runtime_requirements(), *gpu]:
        version = pinned[pins.canonical(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_carries_the_oci_labels_and_runs_the_daemon_unprivileged(
    dockerfile: Path,
) -> None:
    final = stages(dockerfile)[-1]
    found = labels(final)
    prefix = "org.opencontainers.image."
    assert {k.removeprefix(prefix) for k in found if k.startswith(prefix)} >= OCI_LABELS
    assert found[prefix + "version"] == PYPROJECT["project"]["version"]
    assert found[prefix + "licenses"] == PYPROJECT["project"]["license"]["text"]
    base = final[0][1].split()[0]
    assert found[prefix + "base.name"].endswith("/" + base)
    final_words: dict[str, Any] = {k: a for k, a in final}
    assert words(final_words["ENTRYPOINT"]) == ["rnnsentry", "run"]
    assert re.fullmatch(r"\d+", final_words["USER"]) and final_words["USER"] != "0"
    assert "torch" not in dockerfile.read_text().replace("No torch", "")
