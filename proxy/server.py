"""Serving the app: the listening socket, shutdown on SIGTERM, and a deadline for request heads.

aiohttp has no timeout for receiving a request's head, so a client sending its headers a byte at a
time (slowloris) would hold a connection, and a file descriptor, for as long as it likes. Each
connection here must deliver a complete request head (up to the blank line) within
``header_timeout`` of its first byte, else it is closed. Between requests of a keep-alive
connection aiohttp's ``keepalive_timeout`` applies. The guard wraps aiohttp's protocol and
forwards everything else to it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import tempfile
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client.multiprocess import mark_process_dead
from yarl import URL

from proxy.app import AccessLogger, create_app
from proxy.config import Config, ConfigError
from proxy.registry.keys import DRAINING
from storage.host import Worker

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0
_END_OF_HEAD = b"\r\n\r\n"


class HeadDeadline(asyncio.Protocol):
    """Closes the connection if a request head does not arrive within ``timeout`` seconds."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None
        self._waiting = True  # for the head of the first request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)
        self._inner.connection_made(transport)

    def _expire(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            peer = self._transport.get_extra_info("peername")
            log.warning("closing a connection whose request head took too long peer=%s", peer)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._waiting:
            seen = self._tail + data
            if _END_OF_HEAD in seen:
                self._waiting = False
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A site whose connections get a :class:`HeadDeadline`, on aiohttp's public site API
    (``BaseSite``: ``start`` registers it with the runner, ``stop`` unregisters it;
    ``runner.server`` is the protocol factory). The listening server is the site's own, not a
    copy of ``TCPSite.start`` and its private fields. Subclasses say where to listen."""

    def __init__(
        self, runner: web.BaseRunner, *, ssl_context: ssl.SSLContext | None, head_timeout: float
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.runner = runner
        self.tls = ssl_context
        self.head_timeout = head_timeout
        self.listener: asyncio.Server | None = None

    @abstractmethod
    async def listen(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
        """Start listening, with ``factory`` making each connection's protocol."""

    def _url(self, host: str, port: int) -> str:
        return str(URL.build(scheme="https" if self.tls else "http", host=host, port=port))

    async def start(self) -> None:
        await super().start()
        server = self.runner.server
        assert server is not None
        timeout = self.head_timeout
        self.listener = await self.listen(lambda: HeadDeadline(server(), timeout))

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await super().stop()


class GuardedTCPSite(GuardedSite):
    """Listens on ``host:port`` (``host`` None: every address, IPv4 and IPv6)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        head_timeout: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, head_timeout=head_timeout)
        self.host = host
        self.port = port

    @property
    def name(self) -> str:
        sockets = self.listener.sockets if self.listener is not None else ()
        port = sockets[0].getsockname()[1] if sockets else self.port  # the port bound
        return self._url(self.host or "0.0.0.0", port)

    async def listen(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(factory, self.host, self.port, ssl=self.tls)


class GuardedSockSite(GuardedSite):
    """Listens on a socket bound already (by a parent process, for instance)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None = None,
        head_timeout: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, head_timeout=head_timeout)
        self.sock = sock

    @property
    def name(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return self._url(host, port)

    async def listen(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(factory, sock=self.sock, ssl=self.tls)


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    access_log_class: type[AbstractAccessLogger],
    head_timeout: float,
    sockets: Sequence[socket.socket] = (),
    peer_socket: socket.socket | None = None,
    ready: Callable[[], None] | None = None,
    on_reload: Callable[[], None] | None = None,
    drain_delay: float = 0.0,
) -> None:
    """Run ``app`` until SIGTERM or SIGINT, then shut down gracefully: /readyz answers 503
    at once, requests are still served for ``drain_delay`` seconds (load balancers take the
    replica out meanwhile; a second signal ends the wait), then the listener closes. SIGHUP
    calls ``on_reload`` (which logs its own failures).

    ``sockets``: listen on these (bound by the parent of the workers) instead of ``host:port``;
    ``peer_socket``: also serve plain HTTP there (a worker's loopback address for the others);
    ``ready``: called once every site listens.
    """
    runner = web.AppRunner(
        app,
        access_log_class=access_log_class,
        access_log=logging.getLogger("proxy.access"),
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        handle_signals=False,
        shutdown_timeout=5.0,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        sites: list[GuardedSite] = [
            GuardedSockSite(runner, sock, ssl_context=ssl_context, head_timeout=head_timeout)
            for sock in sockets
        ] or [
            GuardedTCPSite(
                runner,
                host or None,
                port,
                ssl_context=ssl_context,
                head_timeout=head_timeout,
            )
        ]
        if peer_socket is not None:
            sites.append(GuardedSockSite(runner, peer_socket, head_timeout=head_timeout))
        for site in sites:
            await site.start()
        log.info("listening on %s", ", ".join(site.name for site in sites))
        if ready is not None:
            ready()
        await stop.wait()
        stop.clear()
        draining = app.get(DRAINING)
        if draining is not None:
            draining.set()
        if drain_delay > 0:
            log.info("draining: /readyz answers 503, serving %gs more", drain_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), drain_delay)
    finally:
        await runner.cleanup()


# -- worker processes (serve --workers N) ------------------------------------------------------
#
# The parent binds one listening socket per worker and address (SO_REUSEPORT: the kernel spreads
# new connections over them), then forks the workers; each serves the app on its own socket and
# on a loopback port of its own (for the other workers: ``storage.host``). The parent only
# supervises: a worker that exits is forked again on the same socket, whose backlog kept the
# connections that came meanwhile; SIGTERM (or SIGINT) is passed to every worker, which drain as
# a single process does, and the parent exits once they all have; SIGHUP is passed on too. A
# worker dies with the parent (PR_SET_PDEATHSIG), so a killed parent leaves no process holding
# the port.

STOP_GRACE = 60.0  # seconds the workers have to drain before SIGKILL
RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 5.0)  # after a worker's 1st, 2nd... quick death in a row
HEALTHY_AFTER = 10.0  # a worker that lived this long starts the delays afresh
_PR_SET_PDEATHSIG = 1
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def default_workers() -> int:
    """The CPUs this process may run on (a container's CPU set counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def bind_listeners(
    host: str, port: int, count: int, backlog: int = 1024
) -> list[list[socket.socket]]:
    """``count`` sets of listening sockets on ``host:port`` (every address of it; all
    interfaces for an empty host), each set for one worker, sharing the port by SO_REUSEPORT."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in infos))
    sets: list[list[socket.socket]] = []
    made: list[socket.socket] = []
    try:
        for _ in range(count):
            group = []
            for family, address in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                made.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((*address[:1], port, *address[2:]))
                if port == 0:  # every worker on the port the first one was given
                    port = sock.getsockname()[1]
                sock.listen(backlog)
                sock.setblocking(False)
                group.append(sock)
            sets.append(group)
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return sets


@dataclass
class _Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    quick_deaths: int = 0
    restart_at: float | None = None


def run_workers(
    count: int,
    sockets: list[list[socket.socket]],
    worker: Callable[[int, list[socket.socket], Callable[[], None]], None],
    *,
    metrics_dir: str | None = None,
    stop_grace: float = STOP_GRACE,
) -> int:
    """Fork ``count`` workers (``worker(index, its sockets, ready)`` runs in each, ``ready``
    called once it listens), keep them running until SIGTERM/SIGINT, then drain them.

    Worker 0 starts first and the others once it is ready, so a start-up error (the store
    cannot be opened) is reported once, by worker 0, which exits with the code a single
    process would have: that is then the parent's. Returns 0 after a drain.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    ready_r, ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    parent = os.getpid()
    slots = [_Slot(i) for i in range(count)]
    by_pid: dict[int, _Slot] = {}
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork

    def fork(slot: _Slot) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's stack
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                _die_with(parent, prctl)
                os.close(ready_r)
                for i, group in enumerate(sockets):
                    if i != slot.index:
                        for sock in group:
                            sock.close()
                worker(slot.index, sockets[slot.index], lambda: _say_ready(ready_w, slot.index))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                log.exception("worker %d failed: %s", slot.index, exc)
            finally:
                logging.shutdown()
                os._exit(code)
        slot.pid, slot.started, slot.ready, slot.restart_at = pid, time.monotonic(), False, None
        by_pid[pid] = slot

    stopping_since: float | None = None
    result = 0
    started_all = all_ready = False
    try:
        fork(slots[0])
        while by_pid or (stopping_since is None and any(s.restart_at for s in slots)):
            got = signal.sigtimedwait(_SIGNALS, 0.2)
            now = time.monotonic()
            if got is not None and got.si_signo == signal.SIGHUP:
                for pid in by_pid:  # each worker reloads (proxy.cli: the policy)
                    _signal(pid, signal.SIGHUP)
            elif got is not None and got.si_signo != signal.SIGCHLD:
                if stopping_since is None:
                    log.info("draining %d workers", len(by_pid))
                    stopping_since = now
                    _close(sockets)  # once each worker closes its own, new connections are refused
                for pid in by_pid:  # a second signal ends the workers' drain delay
                    _signal(pid, signal.SIGTERM)
            _read_ready(ready_r, slots)
            if not started_all and slots[0].ready and stopping_since is None:
                started_all = True
                for slot in slots[1:]:
                    fork(slot)
                log.info("started %d workers pids=%s", count, ",".join(str(s.pid) for s in slots))
            if not all_ready and all(s.ready for s in slots):
                all_ready = True
                log.info("serving with %d workers", count)
            for pid, code in _reap():
                found = by_pid.pop(pid, None)
                if metrics_dir is not None:
                    mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
                if found is None or stopping_since is not None:
                    continue
                slot = found
                if not started_all:  # worker 0 could not start: it said why
                    log.debug("worker 0 exited with %s during start-up", code)
                    result = code or 1
                    stopping_since = now
                    for other in by_pid:
                        _signal(other, signal.SIGTERM)
                    continue
                lived = now - slot.started
                slot.quick_deaths = 0 if lived >= HEALTHY_AFTER else slot.quick_deaths + 1
                delay = RESTART_DELAYS[min(slot.quick_deaths, len(RESTART_DELAYS) - 1)]
                log.warning(
                    "worker %d (pid %d) exited with %s after %.1f s: restarting in %.1f s",
                    slot.index,
                    pid,
                    code,
                    lived,
                    delay,
                )
                slot.restart_at = now + delay
            if stopping_since is None:
                for slot in slots:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        fork(slot)
            elif now - stopping_since > stop_grace:
                for pid in by_pid:
                    _signal(pid, signal.SIGKILL)
    finally:
        for pid in by_pid:
            _signal(pid, signal.SIGKILL)
        _reap(block=True)
        os.close(ready_r)
        os.close(ready_w)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if started_all:
        log.info("workers stopped")
    return result


def _close(sockets: list[list[socket.socket]]) -> None:
    for group in sockets:
        for sock in group:
            sock.close()


def _die_with(parent: int, prctl: Any) -> None:
    """Have the kernel SIGKILL this process when its parent dies."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _say_ready(fd: int, index: int) -> None:
    os.write(fd, bytes([index % 256]))


def _read_ready(fd: int, slots: list[_Slot]) -> None:
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return
    for index in data:
        for slot in slots:
            if slot.index % 256 == index:
                slot.ready = True


def _reap(*, block: bool = False) -> list[tuple[int, int]]:
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        done.append((pid, os.waitstatus_to_exitcode(status)))
    return done


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def serve_workers(
    config: Config,
    count: int,
    ssl_context: ssl.SSLContext | None,
    *,
    reloader: Callable[[web.Application], Callable[[], None]],
    reporting: Callable[[Callable[[], int]], int],
) -> int:
    """``regproxy serve`` as ``count`` workers: bind, make the run directory, run them.

    ``reloader(app)`` is a worker's SIGHUP action; ``reporting(call)`` runs a worker's life and
    turns its error into one line and an exit code (as ``regproxy`` does for one process).
    """
    if config.auth.enabled and config.auth.token.signing_key is None:
        # one key for every worker, or a token issued by one would fail on the others
        log.warning(
            "no auth.token.signing_key_file: tokens are signed with a random key of this serve "
            "(shared by its workers) and fail on other replicas and after a restart"
        )
        token_config = dataclasses.replace(config.auth.token, signing_key=secrets.token_bytes(32))
        config = dataclasses.replace(
            config, auth=dataclasses.replace(config.auth, token=token_config)
        )
    host, port = config.listen_address
    try:
        sockets = bind_listeners(host, port, count)
    except OSError as exc:
        raise ConfigError("listen", f"cannot listen on {config.listen}: {exc.strerror}") from None
    run_dir = _run_dir(config)
    (run_dir / "metrics").mkdir()
    token = secrets.token_hex(16)

    def worker(index: int, listeners: list[socket.socket], ready: Callable[[], None]) -> None:
        raise SystemExit(reporting(lambda: one(index, listeners, ready)))

    def one(index: int, listeners: list[socket.socket], ready: Callable[[], None]) -> int:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s w{index} %(levelname)s %(name)s %(message)s")
            )
        peer = socket.create_server(("127.0.0.1", 0))
        peer.setblocking(False)
        info = Worker(
            index=index,
            count=count,
            run_dir=run_dir,
            token=token,
            peer_url=f"http://127.0.0.1:{peer.getsockname()[1]}",
        )
        app = create_app(config, worker=info)
        asyncio.run(
            serve(
                app,
                host=host,
                port=port,
                ssl_context=ssl_context,
                access_log_class=AccessLogger,
                head_timeout=config.head_timeout,
                sockets=listeners,
                peer_socket=peer,
                ready=ready,
                on_reload=reloader(app),
                drain_delay=config.drain_delay,
            )
        )
        return 0

    log.debug("workers' run directory %s", run_dir)
    try:
        return run_workers(
            count,
            sockets,
            worker,
            metrics_dir=str(run_dir / "metrics"),
            stop_grace=config.drain_delay + STOP_GRACE,
        )
    finally:
        _close(sockets)
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_dir(config: Config) -> Path:
    """A fresh directory for the workers' locks and metrics: in ``$TMPDIR``, else (a read-only
    root filesystem) ``/dev/shm``, else beside the cache. It is ``flock``ed for as long as this
    ``serve`` lives; one left by a ``serve`` that was killed is removed here."""
    places: list[str | None] = [None, "/dev/shm"]
    places.append(str(config.work.path if config.s3 else config.storage))
    error: OSError | None = None
    for place in places:
        try:
            run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=place))
        except OSError as exc:
            error = exc
            continue
        lock = os.open(run_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o600)  # held until exit
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for other in run_dir.parent.glob(f"{RUN_PREFIX}*"):
            if other != run_dir and other.is_dir() and not _locked(other / ".lock"):
                shutil.rmtree(other, ignore_errors=True)
        return run_dir
    assert error is not None
    raise error


RUN_PREFIX = "regproxy-run-"


def _locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # no lock file: being made right now, or left for a minute by a crash
        try:
            return time.time() - path.parent.stat().st_mtime < 60
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
