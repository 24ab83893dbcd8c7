"""Fixtures over the real-component harness (``tests/harness``).

=================  =========  ==============================================================
fixture            scope      what
=================  =========  ==============================================================
tmp_short          function   a short directory under /tmp (unix sockets have a 108-byte path)
registry           function   a fresh, empty distribution 2.8 registry (``Registry``)
seeded_registry    session    one registry holding ``STANDARD_IMAGES`` (``SeededRegistry``);
                              read-only: never push to it, delete from it or stop it
token_registry     function   registry behind a ``TokenIssuer`` with one image (``TokenRegistry``)
front              function   factory: ``front(upstream, **kw) -> Front`` (started, stopped at
                              teardown); ``ssl_context=local_ca.server_context()`` serves HTTPS
local_ca           session    a throwaway CA (``LocalCA``): server contexts for 127.0.0.1, and
                              ``.env()``, the ``SSL_CERT_FILE`` that makes a proxy trust it
proxy_factory      function   factory: ``proxy_factory(upstream_url, **kw) -> ProxyProcess``
seaweed            session    one SeaweedFS ``weed mini`` S3 store (``SeaweedS3``); a test that
                              stops it starts it again (``s3`` does too); bucket per test:
                              ``s3`` or ``seaweed.bucket()``
rgw                session    one Ceph RADOS Gateway on a one-node cluster (``RadosGateway``,
                              Debian's radosgw/ceph-mon/ceph-osd); ``stop()`` ends radosgw only
object_store       function   each real S3 server in turn, ``seaweedfs`` then ``rgw`` (an
                              ``S3Store``, started again if a test stopped it)
s3                 function   a fresh bucket + prefix on ``seaweed`` (``S3Location``; ``.url``
                              is ``s3://BUCKET/PREFIX``, ``.env()`` the proxy's AWS_* variables)
s3_front           function   factory: ``s3_front() -> S3Front`` before ``seaweed`` (faults,
                              counts); ``s3_front(store=object_store)`` before another store
=================  =========  ==============================================================

Every server listens on 127.0.0.1 only and is stopped by the fixture that started it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.harness.front import Front
from tests.harness.images import SeededRegistry, seed_image, seed_standard_images
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry, start_registry
from tests.harness.rgw import RadosGateway
from tests.harness.s3front import S3Front
from tests.harness.s3store import S3Location, S3Store, empty_bucket
from tests.harness.seaweed import SeaweedS3
from tests.harness.tlsca import LocalCA, make_ca
from tests.harness.tokens import TokenIssuer, TokenRegistry


def _uvloop() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:

        def missing() -> asyncio.AbstractEventLoop:
            message = "uvloop, the loop regproxy serves on, is not installed"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message)
            pytest.skip(message)

        return missing
    return uvloop.new_event_loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The event loop of each async test: asyncio's own; a test marked ``served_loop`` (code of
    the server that depends on the loop, as the sendfile path does) runs on uvloop, which
    ``regproxy serve`` installs, and on asyncio's loop, its fallback."""
    if item.get_closest_marker("served_loop") is not None:
        return {"uvloop": _uvloop(), "asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A fresh short directory under /tmp, removed afterwards (for unix sockets)."""
    path = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A fresh empty upstream registry without auth."""
    reg = start_registry(tmp_path / "registry")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def seeded_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededRegistry]:
    """The shared upstream with ``STANDARD_IMAGES``; see ``SeededRegistry.images``."""
    reg = start_registry(tmp_path_factory.mktemp("seeded-registry"))
    try:
        yield SeededRegistry(reg, seed_standard_images(reg))
    finally:
        reg.stop()


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[TokenRegistry]:
    """Registry demanding Bearer tokens from a fresh issuer; ``library/alpine:3.19`` pushed.

    Anonymous clients may pull; ``creds`` (alice) may push. The issuer's records are reset
    after seeding, so ``issuer.issued`` starts empty.
    """
    creds = ("alice", "alice-secret")
    issuer = TokenIssuer(users=dict([creds]))
    issuer.start()
    reg: Registry | None = None
    try:
        reg = start_registry(tmp_path / "token-registry", token_issuer=issuer)
        image = seed_image(reg, "library/alpine", "3.19", creds=creds)
        issuer.reset()
        yield TokenRegistry(reg, issuer, creds, image)
    finally:
        if reg is not None:
            reg.stop()
        issuer.stop()


@pytest.fixture
def front() -> Iterator[Callable[..., Front]]:
    """Factory: ``front(upstream, **kw)`` starts a ``Front`` to a URL or a ``Registry``."""
    started: list[Front] = []

    def make(upstream: Any, **kwargs: Any) -> Front:
        instance = Front(upstream, **kwargs)
        started.append(instance)
        instance.start()
        return instance

    try:
        yield make
    finally:
        for instance in reversed(started):
            instance.stop()


@pytest.fixture(scope="session")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """A CA for TLS servers on 127.0.0.1; a proxy trusts it with ``env=local_ca.env()``."""
    return make_ca(tmp_path_factory.mktemp("local-ca"))


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: ``proxy_factory(upstream_url, **kw)`` -> a started ``ProxyProcess``.

    Keyword arguments go to ``ProxyProcess``; ``storage`` defaults to a fresh directory per
    proxy. All proxies are stopped at teardown.
    """
    started: list[ProxyProcess] = []

    def make(upstream_url: str, **kwargs: Any) -> ProxyProcess:
        kwargs.setdefault("storage", tmp_path / f"proxy-storage-{len(started)}")
        proc = ProxyProcess(upstream_url, **kwargs)
        started.append(proc)
        proc.start()
        return proc

    try:
        yield make
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1, stopped at teardown."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """The shared SeaweedFS S3 store; a test that stops or kills it must ``start()`` it again."""
    store = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    try:
        store.start()
        yield store
    finally:
        store.close()


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RadosGateway]:
    """The shared RADOS Gateway (one cluster per session: ~2 s to stand up); a test that stops or
    kills radosgw must ``start()`` it again (``object_store`` does)."""
    store = RadosGateway(tmp_path_factory.mktemp("rgw"))
    try:
        store.start()
        yield store
    finally:
        store.close()


#: The real S3 servers a test parametrized over ``object_store`` runs against, by test id.
OBJECT_STORES = {"seaweedfs": "seaweed", "rgw": "rgw"}


@pytest.fixture(params=list(OBJECT_STORES))
def object_store(request: pytest.FixtureRequest) -> S3Store:
    """SeaweedFS, then the RADOS Gateway: the session's store, running (started again if an
    earlier test stopped it). Buckets are the test's: ``object_store.bucket()``."""
    store: S3Store = request.getfixturevalue(OBJECT_STORES[request.param])
    store.start()
    return store


@pytest.fixture
def s3(seaweed: SeaweedS3) -> Iterator[S3Location]:
    """A fresh bucket and prefix on the shared store, emptied and deleted at teardown.

    Starts the store again first if an earlier test stopped or killed it (``start()`` is
    idempotent and keeps the endpoint and data).
    """
    seaweed.start()
    bucket = seaweed.create_bucket()
    try:
        yield S3Location(seaweed, bucket, "regproxy")
    finally:
        empty_bucket(seaweed, bucket)


@pytest.fixture
def s3_front(request: pytest.FixtureRequest) -> Iterator[Callable[..., S3Front]]:
    """Factory: ``s3_front()`` starts an ``S3Front`` before the shared SeaweedFS (stopped after);
    ``s3_front(ssl_context)`` serves HTTPS; ``s3_front(store=object_store)`` fronts that store."""
    started: list[S3Front] = []

    def make(ssl_context: ssl.SSLContext | None = None, store: S3Store | None = None) -> S3Front:
        if store is None:
            store = request.getfixturevalue("seaweed")
        instance = S3Front(store.endpoint, ssl_context=ssl_context)
        started.append(instance)
        instance.start()
        return instance

    try:
        yield make
    finally:
        for instance in reversed(started):
            instance.stop()
