"""A real upstream: distribution 2.8 (``/usr/bin/docker-registry``) on 127.0.0.1.

Layout under *workdir*::

    workdir/
      config.yml      generated configuration (filesystem storage, delete enabled)
      data/           storage rootdirectory
      registry.log    stdout+stderr of the registry
      auth.crt        token issuer certificate bundle (token auth only)
      htpasswd        bcrypt htpasswd file (htpasswd auth only)

The port is chosen once; ``stop()``/``start()`` restarts on the same port and data, so tests can
simulate an upstream outage and recovery.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Self

from tests.harness.tools import (
    free_port,
    require_tool,
    stop_process,
    track_process,
    wait_http,
)

if TYPE_CHECKING:
    from tests.harness.tokens import TokenIssuer

REGISTRY_BINARY = "docker-registry"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class Registry:
    """A running (or stopped) distribution registry process."""

    def __init__(
        self,
        workdir: Path,
        config_path: Path,
        port: int,
        *,
        token_issuer: TokenIssuer | None = None,
        htpasswd: tuple[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.config_path = config_path
        self.port = port
        self.root = workdir / "data"
        self.log_path = workdir / "registry.log"
        self.token_issuer = token_issuer
        #: Credentials accepted by this registry (htpasswd), for pushes and tests.
        self.htpasswd = htpasswd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (for ``docker://HOST/REPO:TAG`` references)."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the registry (same port, config and data as before) and wait for ``/v2/``."""
        if self.running:
            return
        binary = require_tool(REGISTRY_BINARY)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [binary, "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        track_process(self._proc)
        try:
            wait_http(f"{self.url}/v2/", timeout=START_TIMEOUT)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"registry did not start; log:\n{self.logs()[-4000:]}") from None

    def stop(self) -> None:
        """SIGTERM the registry, SIGKILL it if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc, STOP_TIMEOUT)

    def logs(self) -> str:
        """Everything the registry has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Registry {self.url} root={self.root}>"


def _htpasswd_line(user: str, password: str) -> str:
    try:
        import bcrypt
    except ImportError:  # pragma: no cover - the brief allows installing it on demand
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "bcrypt"],
            check=True,
            timeout=120,
        )
        import bcrypt
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}\n"


def start_registry(
    workdir: Path,
    *,
    token_issuer: TokenIssuer | None = None,
    htpasswd: tuple[str, str] | None = None,
) -> Registry:
    """Write a config under *workdir* and start a registry on a free 127.0.0.1 port.

    With *token_issuer* the registry demands Bearer tokens from it (the issuer must be started
    first so its realm URL is known). With *htpasswd* ``(user, password)`` it demands Basic auth.
    """
    if token_issuer is not None and htpasswd is not None:
        raise ValueError("choose token auth or htpasswd auth, not both")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(workdir / "data")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": "regproxy-test-secret",
            # Relative Location headers on uploads: otherwise distribution builds them from the
            # Host header, and a push through a Front (which sends its own Host) would bypass it.
            "relativeurls": True,
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": False}},
    }
    if token_issuer is not None:
        if not token_issuer.running:
            raise ValueError("start the token issuer before the registry (its port is the realm)")
        bundle = token_issuer.write_cert(workdir / "auth.crt")
        config["auth"] = {
            "token": {
                "realm": token_issuer.realm,
                "service": token_issuer.service,
                "issuer": token_issuer.issuer,
                "rootcertbundle": str(bundle),
            }
        }
    elif htpasswd is not None:
        path = workdir / "htpasswd"
        path.write_text(_htpasswd_line(*htpasswd))
        config["auth"] = {"htpasswd": {"realm": "regproxy-test", "path": str(path)}}
    config_path = workdir / "config.yml"
    # JSON is valid YAML; it avoids a PyYAML dependency in the harness.
    config_path.write_text(json.dumps(config, indent=2))
    registry = Registry(workdir, config_path, port, token_issuer=token_issuer, htpasswd=htpasswd)
    registry.start()
    return registry
