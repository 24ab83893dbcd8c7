"""The README's run command works as written on a stock Debian 12 Python, outside any virtualenv.

Debian 12 and Ubuntu 24.04 mark their system Python as externally managed (PEP 668): a bare
``pip install .`` there fails with "externally-managed-environment". The test takes the command
from the README's "Run it" block, runs it with the system ``python3`` (``/usr/bin/python3`` when
there is one) first on ``PATH``, in a copy of the source tree, with the listen address moved to a
free loopback port, and waits for ``GET /v2/``. It needs PyPI (pip installs the dependencies).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness.tools import free_port

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 240.0


def run_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Run it (") :]
    match = re.search(r"```sh\n(.+?)\n```", section, re.DOTALL)
    assert match, "no sh block after 'Run it'"
    return match.group(1).strip()


def system_python() -> Path:
    debian = Path("/usr/bin/python3")
    found = debian if debian.exists() else shutil.which("python3")
    assert found, "no python3"
    return Path(found)


def test_readme_run_command_installs_and_serves(tmp_path: Path) -> None:
    command = run_command()
    assert "0.0.0.0:5000" in command
    port = free_port()
    command = command.replace("0.0.0.0:5000", f"127.0.0.1:{port}")
    tree = tmp_path / "regproxy"
    tree.mkdir()
    for name in ("proxy", "storage"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(system_python())
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env["PATH"] = f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=tree,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + INSTALL_TIMEOUT
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                    status = resp.status
                    body = resp.read()
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        assert status == 200 and body == b"{}", log.read_text()[-4000:]
        assert (tree / ".venv" / "bin" / "regproxy").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)
