"""``regproxy serve --workers N``: N processes on one port and one cache.

The parent binds one listening socket per worker and address (SO_REUSEPORT: the kernel spreads
new connections over them), then forks the workers; each serves the app
(:func:`proxy.server.serve`) on its own socket and on a loopback port of its own, where the other
workers reach it (``storage.host``). The parent only supervises: a worker that exits is forked
again on the same socket, whose backlog kept the connections that came meanwhile; SIGTERM (or
SIGINT) is passed to every worker, which drain as a single process does, and the parent exits
once they all have; SIGHUP is passed on too. A worker dies with the parent (PR_SET_PDEATHSIG),
so a killed parent leaves no process holding the port.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.multiprocess import mark_process_dead

from proxy.app import AccessLogger, create_app, drain
from proxy.config import Config, ConfigError
from proxy.server import serve
from storage.host import Worker

log = logging.getLogger(__name__)

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
                drain=lambda: drain(app, config.drain_timeout),
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
            stop_grace=max(config.drain_delay, config.drain_timeout) + STOP_GRACE,
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
