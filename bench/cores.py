"""Busy cores: a server's CPU seconds over a run's wall time, its whole process tree counted.

A server may be several processes: nginx's master and its workers, regproxy with ``--workers N``.
Its busy cores over a run are the CPU seconds (``utime + stime`` from ``/proc/PID/stat``, every
thread included) that the server process and all its descendants used during the run, divided
by the run's wall time. A process that starts during the run counts from 0; one that ends during
the run loses what it used before it ended (its parent is credited only once it reaps it), so a
worker that dies mid-run is under-counted: none does in a benchmark run.

The client's busy cores come from ``getrusage(RUSAGE_CHILDREN)`` of the bench process: what the
load generators it ran to completion (and reaped) used. A client near 1.0 core with ``wrk -t1``
is a client at its limit, not a server.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of ``pid`` and each of its descendants, by pid.

    One pass over ``/proc`` (``/proc/PID/task/TID/children`` is not in every kernel).
    """
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        got = _stat(int(entry.name))
        if got is not None:
            parents[int(entry.name)], cpu[int(entry.name)] = got
    if pid not in cpu:
        return {}
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        tree[p] = cpu[p]
        todo.extend(children.get(p, ()))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds so far of ``pid`` and every process under it."""
    return sum(tree_cpu(pid).values())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Busy:
    """Filled in when a :func:`busy` block ends."""

    wall: float = 0.0
    #: The server's CPU seconds over the block / its wall time (None: no server pid given).
    server_cores: float | None = None
    #: What the child processes the block ran and reaped used, over its wall time.
    client_cores: float = 0.0


@contextmanager
def busy(server_pid: int | None) -> Iterator[Busy]:
    """Measure the server's (and the clients') busy cores over the ``with`` block."""
    result = Busy()
    before = tree_cpu(server_pid) if server_pid is not None else {}
    client0 = _children_cpu()
    t0 = time.perf_counter()
    yield result
    result.wall = time.perf_counter() - t0
    result.client_cores = (_children_cpu() - client0) / result.wall
    if server_pid is not None:
        after = tree_cpu(server_pid)
        used = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
        result.server_cores = used / result.wall
