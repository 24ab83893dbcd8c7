"""The tested set: constraints.txt (written by scripts/lock, installed by the Dockerfile and
scripts/test) pins every dependency, within pyproject.toml's bounds, and CI runs on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
#: What regproxy leans on closely (private aiohttp and uvloop behaviour, aiobotocore's botocore).
BOUNDED = ("aiohttp", "uvloop", "aiobotocore")


def pins() -> dict[str, Version]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        if match:
            found[canonicalize_name(match.group(1))] = Version(match.group(2))
    return found


def requirements() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return [
        Requirement(r)
        for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]
    ]


def test_constraints_pin_each_requirement_within_its_bounds() -> None:
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in constraints.txt (run scripts/lock)"
        assert req.specifier.contains(pinned[name], prereleases=True), (str(req), pinned[name])
        if name in BOUNDED:
            assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
                f"{req} has no upper bound"
            )


def test_ci_runs_on_the_pinned_set() -> None:
    """Under CI (scripts/test installs with the constraints) every pin is what is installed;
    scripts/lock, run here, would write nothing new."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("only CI installs exactly the pinned set")
    if os.environ.get("PYTHONPATH", "").startswith("/tmp/regproxy-newest"):
        pytest.skip("scripts/test-newest runs on newer releases on purpose")
    wrong = {
        name: (str(version), metadata.version(name))
        for name, version in pins().items()
        if Version(metadata.version(name)) != version
    }
    assert wrong == {}, "installed versions differ from constraints.txt (pinned, installed)"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
