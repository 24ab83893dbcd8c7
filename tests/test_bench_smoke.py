"""The benchmark still runs: ``python -m bench --quick`` end to end, every figure in its JSON.

Tiny sizes and 1-second load runs (well under a minute); no figure is judged here — the targets
are benchmark targets, not assertions. What is asserted is that the run stands up the servers
(SeaweedFS and the two caches on it included), measures every figure for every subject, writes
JSON and Markdown, and stops everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.harness.tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[1]

#: figure -> the subjects it must have a number for.
FIGURES: dict[str, tuple[str, ...]] = {
    "warm_blob_small": ("distribution", "regproxy", "nginx"),
    "warm_blob_large": ("distribution", "regproxy", "nginx"),
    "warm_blob_xlarge": ("distribution", "regproxy", "nginx"),
    "manifest_digest": ("distribution", "regproxy"),
    "manifest_tag": ("distribution", "regproxy"),
    "cold_pull": ("direct", "distribution", "regproxy"),
    "concurrent_pull": ("direct", "distribution", "regproxy"),
    "concurrent_pull_upstream": ("direct", "distribution", "regproxy"),
    "stream_rss": ("distribution", "regproxy"),
    "stream_cpu": ("distribution", "regproxy"),
    "stream_speed": ("distribution", "regproxy"),
    "stream_rss_large": ("distribution", "regproxy"),
    # On one SeaweedFS store: distribution = its s3 driver, regproxy = --storage s3://.
    "s3_warm_blob_small": ("distribution", "regproxy"),
    "s3_warm_blob_large": ("distribution", "regproxy"),
    "s3_cold_pull": ("distribution", "regproxy", "regproxy-fs"),
    "s3_stream_rss": ("distribution", "regproxy"),
    "s3_stream_speed": ("distribution", "regproxy"),
    "s3_stream_rss_large": ("distribution", "regproxy"),
    # bench/cold.py (issue #13)
    "cold_many": ("distribution", "regproxy"),
    "cold_many_cpu": ("distribution", "regproxy"),
    "tls_stream_speed": ("distribution", "regproxy"),
    "tls_stream_cpu": ("distribution", "regproxy"),
    "tls_many": ("distribution", "regproxy"),
    "tls_many_cpu": ("distribution", "regproxy"),
    # bench/trust.py (issue #23): regproxy with and without a policy requiring a signature
    "trust_manifest_tag": ("regproxy", "regproxy-policy"),
    "trust_warm_pull": ("regproxy", "regproxy-policy"),
}

#: Load figures that give the servers' busy cores beside their throughput.
CORES_FIGURES = (
    "warm_blob_small",
    "warm_blob_large",
    "warm_blob_xlarge",
    "manifest_digest",
    "manifest_tag",
    "s3_warm_blob_small",
    "s3_warm_blob_large",
)

TARGETS = {
    "warm_blob_small",
    "warm_blob_large",
    "manifest_digest",
    "manifest_tag",
    "cold_pull",
    "concurrent_pull",
    "concurrent_pull_upstream",
    "stream_rss",
    "stream_rss_large",
    "s3_warm_blob_small",
    "s3_warm_blob_large",
    "s3_cold_pull",
    "s3_stream_rss_large",
    # bench/cold.py (issue #13)
    "stream_speed",
    "stream_cpu",
    "cold_many",
    "tls_stream_speed",
    "tls_many",
    # bench/trust.py (issue #23)
    "trust_manifest_tag",
    "trust_warm_pull",
}


def _servers_left(workdir: Path) -> list[str]:
    """Command lines of processes still running from the bench's workdir."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmdline:
            left.append(cmdline)
    return left


def test_bench_quick_run_reports_every_figure(tmp_path: Path) -> None:
    for tool in ("docker-registry", "nginx", "wrk", "skopeo", "curl", "weed"):
        require_tool(tool)
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    workdir = tmp_path / "work"
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--out",
            str(out),
            "--md",
            str(md),
            "--workdir",
            str(workdir),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # ~60 s idle; the trust scenario (issue #23) adds ~8 s, a loaded CI more
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert not _servers_left(workdir), "the bench left servers running"

    doc = json.loads(out.read_text())
    assert doc["machine"]["cores"] >= 1
    assert doc["image"]["size"] > 0 and len(doc["image"]["layers"]) == 5
    assert set(doc["figures"]) == set(FIGURES)
    for key, subjects in FIGURES.items():
        figure = doc["figures"][key]
        assert figure["unit"] and figure["better"] in ("higher", "lower"), key
        for subject in subjects:
            entry = figure["subjects"].get(subject)
            assert entry is not None, f"{key} has no {subject}"
            if subject == "distribution" and "median" not in entry:
                # distribution's proxy may fail (it answers 500 under concurrency): recorded,
                # not hidden; regproxy and the references must always have a number.
                assert entry.get("error"), f"{key}/{subject}: neither a number nor an error"
                continue
            assert isinstance(entry.get("median"), int | float), f"{key}/{subject}: {entry}"
            assert entry["median"] >= 0, f"{key}/{subject}"
            if subject != "distribution" and "median" in figure["subjects"].get("distribution", {}):
                assert entry["ratio_to_distribution"] is not None, f"{key}/{subject}"
    # Busy cores beside every load figure's throughput: the server's process tree (nginx's
    # workers are its master's children) and the load generator's.
    for key in CORES_FIGURES:
        for subject, entry in doc["figures"][key]["subjects"].items():
            if "median" not in entry:
                continue
            assert 0 < entry["cores"]["median"] <= (os.cpu_count() or 1) + 0.5, (key, subject)
            assert len(entry["cores"]["samples"]) == len(entry["samples"]), (key, subject)
            assert entry["client_cores"]["median"] > 0, (key, subject)
    assert {t["key"] for t in doc["targets"]} == TARGETS
    for target in doc["targets"]:
        distribution = doc["figures"][target["key"]]["subjects"].get("distribution", {})
        assert target["value"] is not None or "error" in distribution, target

    table = md.read_text()
    assert table.startswith("Command: `python -m bench --quick")
    assert "| Warm blob" in table and "Machine:" in table
    (row,) = [ln for ln in table.splitlines() if ln.startswith("| Warm blob 2 MiB")]
    assert row.count(" cores") == 3, row  # distribution, regproxy, nginx


def test_a_subject_that_failed_is_reported_with_its_reason() -> None:
    """A row whose subject could not run says why, instead of a number or a crash."""
    from bench.report import Figure, Target, markdown

    fig = Figure("s3_warm_blob_small", "On S3: warm blob 1 MiB", "MB/s", "higher")
    fig.add("distribution", 67.0)
    fig.errors["regproxy"] = "regproxy-s3 did not start: error: unrecognized | --work-dir"
    target = Target("s3_warm_blob_small", "≥ 5x distribution-on-S3", fig.ratio("regproxy"), ">=", 5)
    meta = {
        "command": "python -m bench --only s3",
        "started": "now",
        "duration_s": 1.0,
        "machine": {
            k: "?"
            for k in (
                "cpu",
                "cores",
                "memory_gb",
                "os",
                "kernel",
                "python",
                "aiohttp",
                "uvloop",
                "distribution",
                "nginx",
                "wrk",
                "skopeo",
                "curl",
                "regproxy_commit",
                "loadavg_start",
            )
        },
        "params": {
            "repeat": 1,
            "connections": 1,
            "seconds": 1,
            "blob_client": "bigload",
            "threads": 1,
            "image_desc": "-",
        },
    }
    (row,) = [ln for ln in markdown([fig], [target], meta).splitlines() if "warm blob" in ln]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "67.0"
    assert cells[2] == "failed: regproxy-s3 did not start: error: unrecognized / --work-dir"
    assert cells[4].endswith("n/a")


BURNER = """
import os, sys, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
if os.fork() == 0:  # a worker: the server's child
    burn(float(sys.argv[1]))
    os._exit(0)
burn(float(sys.argv[1]))
os.wait()
"""


def test_busy_cores_count_every_process_of_a_server() -> None:
    """A server of two busy processes counts both: its forked worker's CPU is in its cores.

    What regproxy's --workers N and nginx's master + workers need.
    """
    import time

    from bench.cores import busy

    def cpu_seconds(pid: int) -> float:  # this process only, not its children
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    proc = subprocess.Popen([sys.executable, "-c", BURNER, "1.5"])
    try:
        time.sleep(0.3)  # forked and burning
        own0 = cpu_seconds(proc.pid)
        with busy(proc.pid) as got:
            time.sleep(0.8)
        own = (cpu_seconds(proc.pid) - own0) / got.wall  # the parent process alone
        assert got.server_cores is not None and own > 0.05
        # The worker burns as hard as its parent; on a loaded machine both get less than a core
        # each, but the worker's share is there beside the parent's.
        assert got.server_cores >= 1.5 * own, (got, own)
        assert got.server_cores <= (os.cpu_count() or 1) + 0.1, got
    finally:
        proc.wait(10)
