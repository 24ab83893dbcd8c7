"""The benchmark run: stand everything up, measure every figure in turn, stop everything.

Order (each scenario runs ``repeat`` times; within a repetition the subjects take turns, the
starting subject rotating from one repetition to the next so that drift does not favour one)::

    upstream up, content pushed (fresh random content every run)
    distribution, regproxy up; blobs and manifests warmed through both; nginx on regproxy's files
    1. warm blobs (1, 32, 256 MiB)        wrk -t1  distribution | regproxy | nginx
    2. warm manifests (by digest, by tag) wrk      distribution | regproxy

    (each load run also reads every server's busy cores: bench/cores.py)
    3. cold pull                          skopeo   direct | distribution | regproxy  (fresh cache)
    4. N concurrent cold pulls            skopeo   direct | distribution | regproxy  (fresh cache)
    5. one cold huge blob (and one large) curl     distribution | regproxy  (fresh process + cache)
    6. on object storage (bench/s3.py)    SeaweedFS up; distribution-s3 | regproxy-s3 (| regproxy)
       warm blobs, cold pull, streaming a blob held in S3 only
    7. trust policy (bench/trust.py)      regproxy | regproxy-policy (signature required)
       warm manifest by tag, warm pull
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cold, load, report, s3, seed, servers, trust
from bench.procs import install_signal_handlers, stop_all, wait_quiet
from bench.report import Figure, Target

MiB = 1024 * 1024
SCENARIOS = (
    "warm_blobs",
    "warm_manifests",
    "cold_pulls",
    "cold_stream",
    "cold_many",
    "cold_tls",
    "s3",
    "trust",
)
MB = 1000 * 1000
#: wrk busier than this many cores per thread over a run was the limit of that run.
CLIENT_BOUND = 0.9


@dataclass
class Params:
    small_blob: int = 1 * MiB
    #: Warm (figure 1) and cold (peak memory beside the huge blob's).
    large_blob: int = 32 * MiB
    #: Warm only (figure 1).
    xlarge_blob: int = 256 * MiB
    #: The large blob of the object-storage figures (scenario ``s3``; issue #21 names 8 MB).
    s3_large_blob: int = 8 * MB
    #: Cold only: one client (figure 5, TLS figure 7), held in S3 only (figure 8).
    huge_blob: int = 1024 * MiB
    #: ~200 MB in 5 layers, sizes as uneven as real images'.
    layers: list[int] = field(default_factory=lambda: [80 * MB, 60 * MB, 30 * MB, 20 * MB, 10 * MB])
    seconds: float = 5.0
    connections: int = 32
    #: wrk threads for the manifests (and trust) figures.
    threads: int = 2
    #: wrk threads for the warm blob figures: ``wrk -t1 -c32``, as issue #21 measured.
    blob_threads: int = 1
    concurrent_pulls: int = 20
    repeat: int = 3
    tag_ttl: str = "5m"
    pull_timeout: float = 300.0
    #: "wrk" or "bigload" (bench/bigload.py) for the warm blob figures; manifests always use wrk.
    blob_client: str = "wrk"
    #: Replaces ``python -m proxy`` (to A/B a patched regproxy).
    regproxy_cmd: list[str] | None = None
    #: Run only these scenarios (see ``SCENARIOS``); None: all.
    only: list[str] | None = None
    #: Different cold blobs fetched at once (bench/cold.py), and their size.
    many_count: int = 4
    many_blob: int = 64 * MiB

    @classmethod
    def quick(cls) -> Params:
        """Tiny sizes and durations: the smoke run (well under a minute)."""
        return cls(
            small_blob=64 * 1024,
            large_blob=1 * MiB,
            xlarge_blob=2 * MiB,
            s3_large_blob=2 * MiB,
            huge_blob=4 * MiB,
            layers=[200_000, 150_000, 100_000, 50_000, 20_000],
            seconds=1.0,
            connections=8,
            concurrent_pulls=4,
            repeat=1,
            pull_timeout=60.0,
            many_blob=1 * MiB,
        )


def _size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB" if n < 1024 * MiB else f"{n // (1024 * MiB)} GiB"
    if n >= MiB:
        return f"{n / MB:.0f} MB"
    return f"{n // 1024} KiB"


class Bench:
    def __init__(
        self,
        params: Params,
        workdir: Path,
        scratch: Path,
        *,
        profile_dir: Path | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.p = params
        self.workdir = workdir
        self.scratch = scratch
        self.profile_dir = profile_dir
        self.log = log
        self.errors: list[str] = []
        self.figures: dict[str, Figure] = {}
        self.upstream = servers.upstream(workdir)
        self.meter: servers.UpstreamMeter | None = None
        self.dist: servers.Subject | None = None
        self.reg: servers.Subject | None = None
        self.nginx: servers.Subject | None = None
        self.small: seed.Blob | None = None
        self.large: seed.Blob | None = None
        self.xlarge: seed.Blob | None = None
        self.huge: seed.Blob | None = None
        self.image: seed.Image | None = None

    # -- set-up ------------------------------------------------------------------------------

    def setup(self) -> None:
        p = self.p
        t0 = time.perf_counter()
        self.upstream.start()
        self.meter = servers.UpstreamMeter(self.upstream.server.log_path)
        pusher = seed.Pusher(self.upstream.url)
        salt = seed.salt()
        self.small = seed.random_blob(pusher, "bench/blobs", p.small_blob, "small", salt)
        self.large = seed.random_blob(pusher, "bench/blobs", p.large_blob, "large", salt)
        # The 256 MiB blob only serves the warm blob figures.
        warm = p.only is None or "warm_blobs" in p.only
        xlarge_size = p.xlarge_blob if warm else 1024
        self.xlarge = seed.random_blob(pusher, "bench/blobs", xlarge_size, "xlarge", salt)
        # The huge blob is only needed (and only worth the push) for the cold stream.
        streamed = p.only is None or {"cold_stream", "cold_tls", "s3"} & set(p.only)
        huge_size = p.huge_blob if streamed else 1024
        self.huge = seed.random_blob(pusher, "bench/blobs", huge_size, "huge", salt)
        self.image = seed.push_image(pusher, "bench/image", "v1", p.layers, salt)
        self.log(
            f"upstream {self.upstream.url} seeded in {time.perf_counter() - t0:.1f} s: "
            f"blobs {_size(p.small_blob)}, {_size(p.large_blob)}, {_size(xlarge_size)}, "
            f"{_size(huge_size)}; "
            f"image bench/image:v1 {self.image.size / MB:.1f} MB in {len(p.layers)} layers"
        )
        self.dist = servers.distribution(self.workdir, self.upstream.url)
        self.reg = servers.regproxy(self.workdir, self.upstream.url, p.tag_ttl, p.regproxy_cmd)
        self.dist.start()
        self.reg.start()
        for subject in (self.dist, self.reg):
            self._warm(subject)
        assert self.reg.storage is not None
        blobs_dir = self.reg.storage / "blobs" / "sha256"
        for blob in self._warm_blobs():
            _wait_file(blobs_dir / blob.digest[7:9] / blob.digest[7:], blob.size)
        self.nginx = servers.nginx(self.workdir, blobs_dir)
        self.nginx.start()
        for blob in self._warm_blobs():
            got = load.get(self._blob_url(self.nginx, blob))
            if got != blob.size:
                raise RuntimeError(f"nginx served {got} bytes of {blob.size}")

    def _warm(self, subject: servers.Subject) -> None:
        """Fetch the warm-test blobs and manifests through ``subject`` so its cache holds them."""
        assert self.image
        for blob in self._warm_blobs():
            got = load.get(self._blob_url(subject, blob))
            if got != blob.size:
                raise RuntimeError(f"{subject.name} served {got} bytes of {blob.size}")
        for ref in (self.image.tag, self.image.digest):
            load.get(self._manifest_url(subject, ref), headers={"Accept": seed.ACCEPT})

    def _warm_blobs(self) -> list[seed.Blob]:
        assert self.small and self.large and self.xlarge
        return [self.small, self.large, self.xlarge]

    @staticmethod
    def _blob_url(subject: servers.Subject, blob: seed.Blob) -> str:
        return f"{subject.url}/v2/bench/blobs/blobs/{blob.digest}"

    def _manifest_url(self, subject: servers.Subject, reference: str) -> str:
        assert self.image
        return f"{subject.url}/v2/{self.image.repository}/manifests/{reference}"

    # -- helpers -----------------------------------------------------------------------------

    def figure(self, key: str, title: str, unit: str, better: str) -> Figure:
        fig = self.figures.get(key)
        if fig is None:
            fig = self.figures[key] = Figure(key, title, unit, better)
        return fig

    def _turns(self, subjects: list[servers.Subject]) -> Iterator[tuple[int, servers.Subject]]:
        for rep in range(self.p.repeat):
            k = rep % len(subjects)
            for subject in subjects[k:] + subjects[:k]:
                yield rep, subject

    def _measure(
        self,
        figs: list[Figure],
        subject: str,
        fn: Callable[[], list[float]],
    ) -> None:
        """Run one measurement; on failure record the error on every figure it feeds."""
        try:
            values = fn()
        except Exception as exc:  # one failed figure must not lose the others
            message = f"{figs[0].key}/{subject}: {type(exc).__name__}: {exc}"
            self.log(f"  ERROR {message[:500]}")
            self.errors.append(message[:2000])
            for fig in figs:
                fig.errors[subject] = str(exc)[:300]
            return
        for fig, value in zip(figs, values, strict=True):
            fig.add(subject, value)

    @contextlib.contextmanager
    def _profiled(self, name: str) -> Iterator[None]:
        """py-spy record regproxy while the body runs (only with ``--profile``)."""
        if self.profile_dir is None or self.reg is None:
            yield
            return
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{name}.txt"
        spy = shutil.which("py-spy")
        if spy is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        proc = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(self.reg.pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--subprocesses",  # regproxy's workers (--workers N) are its children
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(0.5)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                from bench.profile import summarize

                out.with_suffix(".top.txt").write_text(summarize(out))
                self.log(f"  profile written: {out} (summary {out.with_suffix('.top.txt')})")
            else:
                self.log(f"  py-spy wrote no profile for {name}")

    # -- 1, 2: warm --------------------------------------------------------------------------

    def _blob_load(self, url: str, server_pid: int | None = None) -> load.WrkResult:
        p = self.p
        if p.blob_client == "wrk":
            return load.wrk(
                url,
                seconds=p.seconds,
                connections=p.connections,
                threads=p.blob_threads,
                server_pid=server_pid,
            )
        return load.bigload(
            url, seconds=p.seconds, connections=p.connections, server_pid=server_pid
        )

    def _extra_profile(self, name: str, fn: Callable[[], object]) -> None:
        """With ``--profile``: one more run of ``fn`` for regproxy under py-spy (not counted)."""
        if self.profile_dir is None:
            return
        with self._profiled(name):
            try:
                fn()
            except Exception as exc:
                self.log(f"  profile run {name} failed: {exc}")

    def warm_blobs(self) -> None:
        p = self.p
        assert self.dist and self.reg and self.nginx
        reg = self.reg
        subjects = [self.dist, self.reg, self.nginx]
        keys = ("warm_blob_small", "warm_blob_large", "warm_blob_xlarge")
        for blob, key in zip(self._warm_blobs(), keys, strict=True):
            fig = self.figure(
                key,
                f"Warm blob {_size(blob.size)}, {p.connections} connections",
                "MB/s",
                "higher",
            )
            self.log(f"{fig.title}")
            for _rep, subject in self._turns(subjects):

                def one(
                    subject: servers.Subject = subject, blob: seed.Blob = blob, fig: Figure = fig
                ) -> list[float]:
                    # The previous run's server may still be busy (distribution stores in the
                    # background): not this run's cores.
                    wait_quiet([s.pid for s in subjects])
                    r = self._blob_load(self._blob_url(subject, blob), subject.pid)
                    fig.add_cores(subject.name, r.server_cores, r.client_cores)
                    self.log(
                        f"  {subject.name:12} {r.mb_per_s:10.1f} MB/s ({r.requests} req), "
                        f"{_cores(r)}"
                    )
                    return [r.mb_per_s]

                self._measure([fig], subject.name, one)
            self._mark_client_bound(fig)
            url = self._blob_url(reg, blob)
            self._extra_profile(key, functools.partial(self._blob_load, url))

    def _mark_client_bound(self, fig: Figure) -> None:
        """Note the subjects whose wrk threads were busy all the run: the client set the figure.

        wrk reads 8 KiB per ``read``: on large bodies its one thread fills a core before nginx's
        sendfile or regproxy's does (bench/README.md, "Which client").
        """
        if self.p.blob_client != "wrk":
            return
        limit = CLIENT_BOUND * self.p.blob_threads
        for name, values in fig.client_cores.items():
            if statistics.median(values) >= limit:
                note = "client-bound"
                fig.notes[name] = f"{fig.notes[name]} {note}" if name in fig.notes else note

    def _manifest_load(self, subject: servers.Subject, ref: str) -> load.WrkResult:
        p = self.p
        return load.wrk(
            self._manifest_url(subject, ref),
            seconds=p.seconds,
            connections=p.connections,
            threads=p.threads,
            headers={"Accept": seed.ACCEPT},
            server_pid=subject.pid,
        )

    def warm_manifests(self) -> None:
        p = self.p
        assert self.dist and self.reg and self.image
        reg = self.reg
        for ref, key, title in (
            (self.image.digest, "manifest_digest", "Warm manifest by digest"),
            (self.image.tag, "manifest_tag", "Warm manifest by tag"),
        ):
            fig = self.figure(key, f"{title}, {p.connections} connections", "req/s", "higher")
            self.log(fig.title)
            for subject in (self.dist, self.reg):  # within the tag TTL: answered from cache
                load.get(self._manifest_url(subject, ref), headers={"Accept": seed.ACCEPT})
            for _rep, subject in self._turns([self.dist, self.reg]):

                def one(
                    subject: servers.Subject = subject, ref: str = ref, fig: Figure = fig
                ) -> list[float]:
                    r = self._manifest_load(subject, ref)
                    fig.add_cores(subject.name, r.server_cores, r.client_cores)
                    self.log(
                        f"  {subject.name:12} {r.rps:10.0f} req/s (p99 {r.p99_ms:.1f} ms), "
                        f"{_cores(r)}"
                    )
                    return [r.rps]

                self._measure([fig], subject.name, one)
            self._extra_profile(key, functools.partial(self._manifest_load, reg, ref))

    # -- 3, 4: cold pulls --------------------------------------------------------------------

    def cold_pulls(self) -> None:
        p = self.p
        assert self.dist and self.reg and self.image and self.meter
        reference = f"{self.image.repository}:{self.image.tag}"
        size = self.image.size
        single = self.figure(
            "cold_pull", f"Cold pull, {size / MB:.0f} MB in {len(p.layers)} layers", "s", "lower"
        )
        self.log(single.title)
        # "direct" is a pseudo-subject: the upstream itself, no cache in between.
        subjects = [self.upstream, self.dist, self.reg]
        for _rep, subject in self._turns(subjects):

            def one(subject: servers.Subject = subject) -> list[float]:
                if subject is not self.upstream:
                    subject.fresh()
                wall = load.pull(subject.host, reference, self.scratch, p.pull_timeout)
                self.log(f"  {_name(subject, self.upstream):12} {wall:8.2f} s")
                return [wall]

            self._measure([single], _name(subject, self.upstream), one)
        reg = self.reg

        if self.profile_dir is not None:
            reg.fresh()  # restarted outside the profile: py-spy attaches to the new process
            self._extra_profile(
                "cold_pull", lambda: load.pull(reg.host, reference, self.scratch, p.pull_timeout)
            )

        n = p.concurrent_pulls
        wall = self.figure("concurrent_pull", f"{n} concurrent cold pulls", "s", "lower")
        upstream_bytes = self.figure(
            "concurrent_pull_upstream", f"{n} concurrent cold pulls, upstream bytes", "MB", "lower"
        )
        self.log(wall.title)
        failed: dict[str, list[int]] = {}
        for _rep, subject in self._turns(subjects):

            def many(subject: servers.Subject = subject) -> list[float]:
                assert self.meter
                if subject is not self.upstream:
                    subject.fresh()
                self.meter.mark()
                seconds, failures = load.pull_many(
                    subject.host, reference, self.scratch, n, p.pull_timeout
                )
                fetched = self.meter.read()
                name = _name(subject, self.upstream)
                self.log(
                    f"  {name:12} {seconds:8.2f} s, upstream "
                    f"{fetched['bytes'] / MB:.1f} MB = {fetched['bytes'] / size:.2f}x the image "
                    f"({fetched['blob_gets']} blob GETs)"
                    + (f", {len(failures)} pulls FAILED: {failures[0]}" if failures else "")
                )
                if failures:
                    failed.setdefault(name, []).append(len(failures))
                    self.errors.append(
                        f"concurrent_pull/{name}: {len(failures)} of {n} pulls failed: "
                        f"{failures[0][:300]}"
                    )
                return [seconds, fetched["bytes"] / MB]

            self._measure([wall, upstream_bytes], _name(subject, self.upstream), many)
        one_direct, many_direct = single.median("direct"), wall.median("direct")
        if one_direct and many_direct:
            # What N clients cost without any cache in between: the ceiling on this machine.
            wall.notes["direct"] = f"(= {many_direct / one_direct:.1f}x one direct pull)"
        for name, counts in failed.items():
            note = f"({sum(counts)} of {n * p.repeat} pulls failed)"
            wall.notes[name] = f"{wall.notes[name]} {note}" if name in wall.notes else note
            wall.failures[name] = sum(counts)
        for name in upstream_bytes.samples:
            ratio = (upstream_bytes.median(name) or 0) * MB / size
            upstream_bytes.notes[name] = f"= {ratio:.2f}x image"

    # -- 5: cold stream ----------------------------------------------------------------------

    def cold_stream(self) -> None:
        p = self.p
        assert self.dist and self.reg and self.huge and self.large
        title = f"cold {_size(p.huge_blob)} blob, one client"
        rss = self.figure("stream_rss", f"Peak memory (PSS), {title}", "MB", "lower")
        cpu = self.figure("stream_cpu", f"CPU per GB served, {title}", "CPU s/GB", "lower")
        speed = self.figure("stream_speed", f"Throughput, {title}", "MB/s", "higher")
        rss_large = self.figure(
            "stream_rss_large",
            f"Peak memory (PSS), cold {_size(p.large_blob)} blob, one client",
            "MB",
            "lower",
        )
        self.log(f"Cold stream: {_size(p.huge_blob)} and {_size(p.large_blob)}")
        timeout = max(120.0, p.huge_blob / (20 * MB))
        for _rep, subject in self._turns([self.dist, self.reg]):

            def huge(subject: servers.Subject = subject) -> list[float]:
                assert self.huge
                subject.fresh()
                r = load.stream(
                    self._blob_url(subject, self.huge), subject.pid, self.huge.size, timeout
                )
                self.log(
                    f"  {subject.name:12} {r.mb_per_s:8.0f} MB/s, peak PSS {r.peak_mem_mb:.0f} MB, "
                    f"{r.cpu_s_per_gb:.2f} CPU s/GB"
                )
                return [r.peak_mem_mb, r.cpu_s_per_gb, r.mb_per_s]

            def large(subject: servers.Subject = subject) -> list[float]:
                assert self.large
                subject.fresh()
                r = load.stream(
                    self._blob_url(subject, self.large), subject.pid, self.large.size, timeout
                )
                self.log(
                    f"  {subject.name:12} {_size(p.large_blob)}: peak PSS {r.peak_mem_mb:.0f} MB"
                )
                return [r.peak_mem_mb]

            self._measure([rss, cpu, speed], subject.name, huge)
            self._measure([rss_large], subject.name, large)
        if self.profile_dir is not None:
            reg, huge_blob = self.reg, self.huge
            reg.fresh()
            self._extra_profile(
                "cold_stream",
                lambda: load.stream(
                    self._blob_url(reg, huge_blob), reg.pid, huge_blob.size, timeout
                ),
            )

    # -- 6: on object storage ----------------------------------------------------------------

    def object_storage(self) -> None:
        """distribution and regproxy on one SeaweedFS store (``bench/s3.py``)."""
        s3.S3Scenario(self).run()

    # -- targets -----------------------------------------------------------------------------

    def targets(self) -> list[Target]:
        f = self.figures
        out: list[Target] = []

        def ratio(key: str, a: str, b: str) -> float | None:
            return f[key].ratio(a, b) if key in f else None

        # Issue #21's targets (side by side, default settings, this 2-core machine).
        for key, text, a, b, limit in (
            ("warm_blob_small", "≥ 3x distribution", "regproxy", "distribution", 3.0),
            ("warm_blob_small", "≥ 0.8x nginx", "regproxy", "nginx", 0.8),
            ("warm_blob_large", "≥ 1.2x distribution", "regproxy", "distribution", 1.2),
            ("manifest_digest", "≥ 5x distribution", "regproxy", "distribution", 5.0),
            ("manifest_tag", "≥ 20x distribution", "regproxy", "distribution", 20.0),
        ):
            out.append(Target(key, text, ratio(key, a, b), ">=", limit))
        out.append(
            Target(
                "cold_pull", "≤ 1.2x direct", ratio("cold_pull", "regproxy", "direct"), "<=", 1.2
            )
        )
        many = f["concurrent_pull"].median("regproxy") if "concurrent_pull" in f else None
        failed = bool(f["concurrent_pull"].failures.get("regproxy")) if many else False
        out.append(
            Target(
                "concurrent_pull",
                "≤ 1.2x the same pulls direct",
                ratio("concurrent_pull", "regproxy", "direct"),
                "<=",
                1.2,
                failed,
            )
        )
        up = (
            f["concurrent_pull_upstream"].median("regproxy")
            if "concurrent_pull_upstream" in f
            else None
        )
        assert self.image
        out.append(
            Target(
                "concurrent_pull_upstream",
                "= 1x image",
                up * MB / self.image.size if up is not None else None,
                "<=",
                1.02,
            )
        )
        out.append(
            Target(
                "stream_rss",
                "≤ 150 MB",
                f["stream_rss"].median("regproxy") if "stream_rss" in f else None,
                "<=",
                150.0,
            )
        )
        huge = f["stream_rss"].median("regproxy") if "stream_rss" in f else None
        large = f["stream_rss_large"].median("regproxy") if "stream_rss_large" in f else None
        out.append(
            Target(
                "stream_rss_large",
                f"{_size(self.p.huge_blob)} peak ≤ this + 16 MB",
                huge - large if huge is not None and large is not None else None,
                "<=",
                16.0,
            )
        )
        out.extend(cold.targets(f))
        assert self.huge
        out += s3.targets(f, self.huge.size, self.p.s3_large_blob)
        out += trust.targets(f)
        return out

    # -- whole run ---------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        steps: dict[str, Callable[[], None]] = {
            "warm_blobs": self.warm_blobs,
            "warm_manifests": self.warm_manifests,
            "cold_pulls": self.cold_pulls,
            "cold_stream": self.cold_stream,
            "cold_many": functools.partial(cold.cold_many, self),
            "cold_tls": functools.partial(cold.cold_tls, self),
            "s3": self.object_storage,
            "trust": functools.partial(trust.run, self),
        }
        for name, step in steps.items():
            if self.p.only is None or name in self.p.only:
                step()

    def serve(self, seconds: float) -> None:
        """Set up, print where everything is, and wait (for profiling by hand)."""
        self.setup()
        assert self.dist and self.reg and self.nginx and self.image
        assert self.small and self.large and self.xlarge and self.huge
        info = {
            "upstream": self.upstream.url,
            "distribution": self.dist.url,
            "regproxy": self.reg.url,
            "regproxy_pid": self.reg.pid,
            "distribution_pid": self.dist.pid,
            "nginx": self.nginx.url,
            "nginx_pid": self.nginx.pid,
            "small_blob": f"/v2/bench/blobs/blobs/{self.small.digest}",
            "large_blob": f"/v2/bench/blobs/blobs/{self.large.digest}",
            "xlarge_blob": f"/v2/bench/blobs/blobs/{self.xlarge.digest}",
            "huge_blob": f"/v2/bench/blobs/blobs/{self.huge.digest}",
            "image": f"bench/image:{self.image.tag}",
            "image_digest": self.image.digest,
        }
        print(json.dumps(info, indent=2), flush=True)
        self.log(f"serving for {seconds:.0f} s; Ctrl-C stops everything")
        time.sleep(seconds)


def _wait_file(path: Path, size: int, timeout: float = 120.0) -> None:
    """Until regproxy has published a blob it served cold (it stores after the last byte)."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.stat().st_size == size):
        if time.monotonic() > deadline:
            raise RuntimeError(f"regproxy did not store {path.name} within {timeout:.0f} s")
        time.sleep(0.1)


def _cores(r: load.WrkResult) -> str:
    server = "?" if r.server_cores is None else f"{r.server_cores:.2f}"
    client = "?" if r.client_cores is None else f"{r.client_cores:.2f}"
    return f"server {server} cores, client {client} cores"


def _name(subject: servers.Subject, upstream: servers.Subject) -> str:
    return "direct" if subject is upstream else subject.name


def main(
    params: Params,
    *,
    command: str,
    out: Path | None,
    md_out: Path | None,
    workdir: Path | None,
    keep: bool,
    profile_dir: Path | None,
    serve: float | None = None,
) -> dict[str, Any]:
    install_signal_handlers()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    meta: dict[str, Any] = {
        "command": command,
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
    }
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="regproxy-bench-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    scratch_parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else work
    scratch = Path(tempfile.mkdtemp(prefix="regproxy-bench-pulls-", dir=scratch_parent))
    bench = Bench(
        params,
        work,
        scratch,
        profile_dir=profile_dir,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    bench.log(f"workdir {work}, pull scratch {scratch}")
    try:
        if serve is not None:
            bench.serve(serve)
            return {}
        bench.run()
    finally:
        stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
        if own_workdir and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif keep:
            bench.log(f"kept {work}")
    meta["duration_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = report.loadavg()
    assert bench.image is not None
    params_json = asdict(params)
    params_json["image_desc"] = (
        f"{bench.image.size / MB:.1f} MB, {len(params.layers)} gzipped-tar layers "
        f"({', '.join(_size(x) for x in params.layers)}), pulled with skopeo copy to dir: in "
        f"{'tmpfs' if scratch_parent == shm else 'the workdir'}"
    )
    meta["params"] = params_json
    meta["errors"] = bench.errors
    figures = list(bench.figures.values())
    targets = bench.targets()
    doc = {
        "schema": 1,
        **meta,
        "image": {
            "reference": f"{bench.image.repository}:{bench.image.tag}",
            "digest": bench.image.digest,
            "size": bench.image.size,
            "layers": [layer.size for layer in bench.image.layers],
        },
        "figures": {fig.key: fig.to_json() for fig in figures},
        "targets": [t.to_json() for t in targets],
    }
    md = report.markdown(figures, targets, meta)
    print(md)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    if md_out is not None:
        md_out.parent.mkdir(parents=True, exist_ok=True)
        md_out.write_text(md)
    return doc
