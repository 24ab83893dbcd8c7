"""Small helpers shared by the harness: locating tools, picking ports, waiting for servers."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest


def require_tool(name: str) -> str:
    """Return the absolute path of executable *name*.

    When it is missing the calling test is skipped, or failed when ``CI=true`` (a CI image that
    lacks a tool is a broken CI image, not a reason to go green).
    """
    path = shutil.which(name)
    if path is None:
        message = f"required tool {name!r} is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    There is an unavoidable race between closing the probe socket and the server binding the
    port; it is harmless in practice because the kernel does not hand out the same ephemeral
    port again right away.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 15) -> int:
    """Poll *url* with GET until any HTTP response arrives; return its status code.

    Raises ``TimeoutError`` after *timeout* seconds of refused/reset connections.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                status: int = resp.status
                return status
        except urllib.error.HTTPError as exc:  # any HTTP answer counts, 401 included
            exc.close()
            return exc.code
        except (OSError, urllib.error.URLError) as exc:
            last_error = exc
            time.sleep(0.05)
    raise TimeoutError(f"no HTTP answer from {url} within {timeout}s: {last_error!r}")


_live: set[subprocess.Popen[bytes]] = set()


def track_process(proc: subprocess.Popen[bytes]) -> None:
    """Remember a server process so it is killed at interpreter exit if nobody stopped it.

    A safety net only (an interrupted session, a fixture that never reached teardown); fixtures
    still stop what they start. It cannot help against SIGKILL of the test process.
    """
    _live.add(proc)


def untrack_process(proc: subprocess.Popen[bytes]) -> None:
    """Forget a process that was stopped properly."""
    _live.discard(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL it if it lingers past ``timeout``."""
    untrack_process(proc)
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    _live.clear()
