"""Figures, targets, the machine description; the Markdown table and the JSON document."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any

#: Column order of the table; "reference" is nginx for static bytes, a direct pull otherwise,
#: regproxy on its filesystem backend in the object-storage figures, and regproxy with a trust
#: policy in the trust figures (bench/trust.py).
SUBJECTS = ("distribution", "regproxy", "nginx", "direct", "regproxy-fs", "regproxy-policy")
REFERENCES = ("nginx", "direct", "regproxy-fs", "regproxy-policy")


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    #: "higher" or "lower" is better.
    better: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    #: Extra numbers per subject (e.g. upstream bytes as a multiple of the image).
    notes: dict[str, str] = field(default_factory=dict)
    #: Operations that failed per subject (e.g. pulls), over all repetitions.
    failures: dict[str, int] = field(default_factory=dict)
    #: The server's busy cores in each sample (CPU seconds of its process tree / wall time).
    cores: dict[str, list[float]] = field(default_factory=dict)
    #: The load generator's busy cores in each sample.
    client_cores: dict[str, list[float]] = field(default_factory=dict)

    def add(self, subject: str, value: float) -> None:
        self.samples.setdefault(subject, []).append(value)

    def add_cores(self, subject: str, server: float | None, client: float | None) -> None:
        """Busy cores of one sample (call it with the sample, from the measuring function)."""
        if server is not None:
            self.cores.setdefault(subject, []).append(server)
        if client is not None:
            self.client_cores.setdefault(subject, []).append(client)

    def median_cores(self, subject: str) -> float | None:
        values = self.cores.get(subject)
        return statistics.median(values) if values else None

    def median(self, subject: str) -> float | None:
        values = self.samples.get(subject)
        return statistics.median(values) if values else None

    def ratio(self, subject: str, to: str = "distribution") -> float | None:
        a, b = self.median(subject), self.median(to)
        if a is None or b is None or b == 0:
            return None
        return a / b

    def to_json(self) -> dict[str, Any]:
        subjects: dict[str, Any] = {}
        for name, values in self.samples.items():
            subjects[name] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "samples": values,
                "ratio_to_distribution": self.ratio(name),
            }
            if name in self.notes:
                subjects[name]["note"] = self.notes[name]
            if name in self.failures:
                subjects[name]["failures"] = self.failures[name]
            for label, table in (("cores", self.cores), ("client_cores", self.client_cores)):
                if table.get(name):
                    subjects[name][label] = {
                        "median": statistics.median(table[name]),
                        "samples": table[name],
                    }
        for name, error in self.errors.items():
            subjects.setdefault(name, {})["error"] = error
        return {
            "title": self.title,
            "unit": self.unit,
            "better": self.better,
            "subjects": subjects,
        }


@dataclass
class Target:
    key: str
    text: str
    value: float | None
    op: str
    limit: float
    #: Set when the figure only exists because failures were tolerated: never "met".
    failed: bool = False

    @property
    def met(self) -> bool | None:
        if self.failed:
            return False
        if self.value is None:
            return None
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "text": self.text,
            "value": self.value,
            "op": self.op,
            "limit": self.limit,
            "met": self.met,
            "failed": self.failed,
        }


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else "?"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = 0.0
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 1024**2
    except (OSError, StopIteration):
        pass
    try:
        import aiohttp

        aiohttp_version = aiohttp.__version__
    except ImportError:
        aiohttp_version = "?"
    try:
        import uvloop

        uvloop_version = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uvloop_version = "not installed"
    os_name = "?"
    try:
        with open("/etc/os-release") as f:
            os_name = next(
                ln.split("=", 1)[1].strip().strip('"') for ln in f if ln.startswith("PRETTY_NAME")
            )
    except (OSError, StopIteration):
        pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _cmd(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = bool(
        subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--", "proxy", "storage"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp_version,
        "uvloop": uvloop_version,
        "distribution": _cmd(["/usr/bin/docker-registry", "--version"]),
        "nginx": _cmd([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
        "wrk": re.sub(r"\s*\[.*", "", _cmd(["wrk", "--version"])),
        "skopeo": _cmd(["skopeo", "--version"]),
        "curl": " ".join(_cmd(["curl", "--version"]).split()[:2]),
        "regproxy_commit": commit + (" (proxy/ or storage/ modified)" if dirty else ""),
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def loadavg() -> str:
    return _loadavg()


def _cell(fig: Figure, subject: str) -> str:
    if subject in fig.errors and fig.median(subject) is None:
        reason = " ".join(fig.errors[subject].split()).replace("|", "/")
        return f"failed: {reason[:120]}"
    value = fig.median(subject)
    if value is None:
        return ""
    text = _fmt(value)
    if subject != "distribution":
        ratio = fig.ratio(subject)
        if ratio is not None:
            text += f" ({ratio:.2f}x)"
    cores = fig.median_cores(subject)
    if cores is not None:
        text += f", {cores:.2f} cores"
        client = fig.client_cores.get(subject)
        if client:
            text += f" (client {statistics.median(client):.2f})"
    if subject in fig.notes:
        text += f" {fig.notes[subject]}"
    return text


def markdown(
    figures: list[Figure],
    targets: list[Target],
    meta: dict[str, Any],
) -> str:
    m = meta["machine"]
    p = meta["params"]
    lines = [
        f"Command: `{meta['command']}` — {meta['started']}, {meta['duration_s']:.0f} s, "
        f"medians of {p['repeat']} runs (ratio to distribution in brackets; cores: the "
        "server's busy cores under the load, CPU seconds of its processes over the run's wall "
        "time, and the load generator's; client-bound: wrk's threads were busy the whole run).",
        "",
        "| figure | distribution | regproxy | nginx sendfile / direct pull / regproxy fs / "
        "regproxy with policy | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    by_key: dict[str, list[Target]] = {}
    for t in targets:
        by_key.setdefault(t.key, []).append(t)
    for fig in figures:
        ref = next((r for r in REFERENCES if r in fig.samples or r in fig.errors), "direct")
        checks = []
        for t in by_key.get(fig.key, []):
            mark = {True: "met", False: "**missed**", None: "n/a"}[t.met]
            checks.append(f"{t.text}: {_fmt(t.value)} — {mark}")
        arrow = "↑" if fig.better == "higher" else "↓"
        lines.append(
            f"| {fig.title} ({fig.unit} {arrow}) | {_cell(fig, 'distribution')} | "
            f"{_cell(fig, 'regproxy')} | {_cell(fig, ref)} | {'; '.join(checks)} |"
        )
    met = sum(1 for t in targets if t.met)
    lines += [
        "",
        f"Targets met: {met} of {len(targets)}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['os']} "
        f"(kernel {m['kernel']}); load average {m['loadavg_start']} at start, "
        f"{meta.get('loadavg_end', '?')} at end. Python {m['python']}, aiohttp {m['aiohttp']}, "
        f"uvloop {m['uvloop']}; {m['distribution']}; {m['nginx']}; {m['wrk']}; {m['skopeo']}; "
        f"{m['curl']}; regproxy {m['regproxy_commit']}.",
        "",
        f"Load: {p['connections']} connections, {p['seconds']} s per run; blobs with "
        f"{_blob_client(p)}, manifests with wrk ({p['threads']} threads); clients on the same "
        "machine as the servers, over loopback. "
        f"Image: {p['image_desc']}."
        + (f" regproxy command: `{' '.join(p['regproxy_cmd'])}`." if p.get("regproxy_cmd") else ""),
    ]
    if meta.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {e}" for e in meta["errors"]]
    return "\n".join(lines) + "\n"


def _blob_client(p: dict[str, Any]) -> str:
    if p["blob_client"] == "bigload":
        return "bench/bigload.py"
    return f"wrk -t{p.get('blob_threads', p['threads'])}"


def from_json(doc: dict[str, Any]) -> str:
    """The Markdown table of a JSON document written by ``python -m bench``."""
    figures = []
    for key, data in doc["figures"].items():
        fig = Figure(key, data["title"], data["unit"], data["better"])
        for name, entry in data["subjects"].items():
            if "samples" in entry:
                fig.samples[name] = list(entry["samples"])
            if "note" in entry:
                fig.notes[name] = entry["note"]
            if "failures" in entry:
                fig.failures[name] = entry["failures"]
            if "cores" in entry:
                fig.cores[name] = list(entry["cores"]["samples"])
            if "client_cores" in entry:
                fig.client_cores[name] = list(entry["client_cores"]["samples"])
            if "error" in entry:
                fig.errors[name] = entry["error"]
        figures.append(fig)
    targets = [
        Target(t["key"], t["text"], t["value"], t["op"], t["limit"], t.get("failed", False))
        for t in doc["targets"]
    ]
    return markdown(figures, targets, doc)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report FILE.json``: print its Markdown table again."""
    import json
    import sys

    for name in sys.argv[1:] if argv is None else argv:
        with open(name) as f:
            print(from_json(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
