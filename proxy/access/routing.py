"""Which upstream a request is for, and the repository name there.

In order: containerd's ``?ns=<registry host>`` (sent by every containerd/BuildKit mirror request);
a first path component naming a configured upstream (``/v2/ghcr.io/org/app/...``); otherwise the
default upstream (what a Docker daemon's ``registry-mirrors`` sends). Single-component names get
Docker Hub's ``library/`` prefix on upstreams that use that convention.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.core.errors import NameUnknown
from proxy.core.reference import check_name
from proxy.fetch.settings import DOCKER_HUB, DOCKER_HUB_ALIASES, UpstreamConfig


class Router:
    def __init__(self, upstreams: Mapping[str, UpstreamConfig], default: str) -> None:
        self.upstreams = dict(upstreams)
        self.default = default
        self._by_host: dict[str, str] = {}
        for name, cfg in upstreams.items():
            self._by_host.setdefault(name, name)
            self._by_host.setdefault(cfg.host, name)
            if name in DOCKER_HUB_ALIASES or cfg.host in DOCKER_HUB_ALIASES:
                for alias in DOCKER_HUB_ALIASES:
                    self._by_host.setdefault(alias, name)

    def _unknown(self, what: str) -> NameUnknown:
        return NameUnknown(
            {"requested": what, "upstreams": sorted(self.upstreams)},
            message=f"no upstream is configured for {what!r}",
        )

    def lookup(self, host: str) -> str | None:
        return self._by_host.get(host.lower())

    def route(self, name: str, ns: str | None) -> tuple[str, str]:
        """``(upstream name, repository)`` for the path name ``name`` (already grammar-checked)."""
        if ns:
            upstream = self.lookup(ns)
            if upstream is None:
                raise self._unknown(ns)
            return upstream, self.normalize(upstream, name)
        first, sep, rest = name.partition("/")
        if sep:
            upstream = self.lookup(first)
            if upstream is not None:
                return upstream, self.normalize(upstream, rest)
            if "." in first and first.split(".")[-1] in _HOST_SUFFIXES:
                # Looks like a registry host, but not one we serve: say so rather than asking
                # the default upstream for a repository it cannot have.
                raise self._unknown(first)
        return self.default, self.normalize(self.default, name)

    def normalize(self, upstream: str, repository: str) -> str:
        if "/" not in repository and self.upstreams[upstream].library_prefix:
            repository = f"library/{repository}"
        return check_name(repository)


#: Top-level domains that mark a first path component as a registry host (``ghcr.io/...``).
_HOST_SUFFIXES = frozenset({"io", "com", "org", "net", "dev", "app", "cloud", "example", "local"})

__all__ = ["DOCKER_HUB", "Router"]
