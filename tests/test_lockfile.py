"""requirements.lock and pyproject.toml cannot drift apart: every direct dependency (the project's
and its `test` extra) is pinned in the lock at a version its specifier allows, and every pin
carries the sha256 hashes that infra/setup.sh installs with (`uv pip install --require-hashes`)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
# The lock is made for CPython 3.11 on Linux x86_64 (README, Installing): markers of pyproject
# requirements are judged there.
LOCK_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# One pin as pip-compile/uv write it: `name[extras]==version \` then `--hash=sha256:...` lines.
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.M)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def locked() -> dict[str, tuple[Version, list[str]]]:
    """Canonical name -> (pinned version, its sha256 hashes)."""
    text = LOCK.read_text()
    starts = list(PIN.finditer(text))
    pins: dict[str, tuple[Version, list[str]]] = {}
    for i, m in enumerate(starts):
        block = text[m.end() : starts[i + 1].start() if i + 1 < len(starts) else len(text)]
        name = canonicalize_name(m[1])
        assert name not in pins, f"{name} is pinned twice in {LOCK.name}"
        pins[name] = (Version(m[2]), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def direct_requirements() -> list[Requirement]:
    project = pyproject()["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    reqs = [Requirement(s) for s in specs]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LOCK_ENV)]


@pytest.fixture(scope="module")
def pins() -> dict[str, tuple[Version, list[str]]]:
    assert LOCK.is_file(), "requirements.lock is missing: see README, Installing"
    return locked()


def test_lock_parses(pins):
    assert len(pins) > 50  # the whole transitive closure, not only the direct dependencies
    assert "torch" in pins and "nvidia-cublas" in pins  # transitive: torch's CUDA runtime


def test_every_direct_dependency_is_pinned_within_its_specifier(pins):
    problems = []
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not in {LOCK.name}")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{req}: {LOCK.name} pins {pins[name][0]}")
    assert not problems, (
        "pyproject.toml and requirements.lock disagree (refresh the lock, README Installing):\n"
        + "\n".join(problems)
    )


def test_every_pin_has_hashes(pins):
    unhashed = sorted(name for name, (_, hashes) in pins.items() if not hashes)
    assert not unhashed, f"pins without --hash (setup.sh uses --require-hashes): {unhashed}"


def test_build_backend_is_locked(pins):
    """setup.sh installs the project with --no-build-isolation: the locked setuptools builds it."""
    build = [Requirement(s) for s in pyproject()["build-system"]["requires"]]
    (setuptools,) = [r for r in build if canonicalize_name(r.name) == "setuptools"]
    assert "setuptools" in pins, "the lock must pin setuptools (setup.sh builds without isolation)"
    assert setuptools.specifier.contains(pins["setuptools"][0])
    # setuptools >= 70.1 builds wheels itself; the `wheel` package in build-system is not needed.
    assert pins["setuptools"][0] >= Version("70.1")
