"""Scenario ``trust``: what the trust policy (issue #23) costs a warm pull.

A second regproxy, ``regproxy-policy``, runs on the same upstream with ``policy:`` requiring a
cosign signature of ``bench/*`` by one ECDSA P-256 key; ``bench/image:v1`` is signed as cosign
stores a signature (simple-signing payload blob, ``sha256-<hex>.sig`` manifest; made here with
``cryptography``). Both are warmed (the policy one verifies the signature once and records the
verdict), then take turns:

* warm manifest by tag, wrk, requests/s (the request a pull's check is on: the sharpest view);
* warm pull, ``skopeo copy`` of the whole image from the warm cache, wall time.

Targets: within 5 % of regproxy without a policy.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING

import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench import load, seed, servers
from bench.report import Figure, Target

if TYPE_CHECKING:
    from bench.run import Bench

MB = 1000 * 1000
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
NAME = "regproxy-policy"


def _descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def sign(
    pusher: seed.Pusher, host: str, image: seed.Image, key: ec.EllipticCurvePrivateKey
) -> None:
    """Push a cosign signature of ``image`` (as ``cosign sign --key`` stores one)."""
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": f"{host}/{image.repository}"},
                "image": {"docker-manifest-digest": image.digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
        separators=(",", ":"),
    ).encode()
    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    config = json.dumps(
        {
            "architecture": "",
            "os": "",
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(payload).hexdigest()],
            },
            "config": {},
        },
        separators=(",", ":"),
    ).encode()
    pusher.push_bytes(image.repository, payload)
    pusher.push_bytes(image.repository, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [
                _descriptor(
                    SIMPLE_SIGNING,
                    payload,
                    annotations={"dev.cosignproject.cosign/signature": signature},
                )
            ],
        },
        separators=(",", ":"),
    ).encode()
    tag = image.digest.replace(":", "-") + ".sig"
    pusher.push_manifest(image.repository, tag, manifest, OCI_MANIFEST)


def run(bench: Bench) -> None:
    p = bench.p
    assert bench.reg and bench.image
    image = bench.image
    d = bench.workdir / "trust"
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    public = d / "cosign.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    sign(seed.Pusher(bench.upstream.url), bench.upstream.host, image, key)
    config = d / "regproxy.yaml"
    policy = [{"repository": "bench/*", "require_signature": {"keys": [str(public)]}}]
    config.write_text(yaml.safe_dump({"policy": policy}))
    subject = servers.regproxy(
        d, bench.upstream.url, p.tag_ttl, p.regproxy_cmd, name=NAME, extra=["--config", str(config)]
    )
    subject.start()
    try:
        bench._warm(subject)  # verifies the signature once; every later answer is recorded
        reference = f"{image.repository}:{image.tag}"
        for s in (bench.reg, subject):
            load.pull(s.host, reference, bench.scratch, p.pull_timeout)
        manifests = bench.figure(
            "trust_manifest_tag",
            f"Warm manifest by tag, signature required, {p.connections} connections",
            "req/s",
            "higher",
        )
        bench.log(manifests.title)
        for _rep, s in bench._turns([bench.reg, subject]):

            def one(s: servers.Subject = s) -> list[float]:
                r = bench._manifest_load(s, image.tag)
                bench.log(f"  {s.name:16} {r.rps:10.0f} req/s (p99 {r.p99_ms:.1f} ms)")
                return [r.rps]

            bench._measure([manifests], s.name, one)
        pulls = bench.figure(
            "trust_warm_pull",
            f"Warm pull, signature required, {image.size / MB:.0f} MB",
            "s",
            "lower",
        )
        bench.log(pulls.title)
        for _rep, s in bench._turns([bench.reg, subject]):

            def pull(s: servers.Subject = s) -> list[float]:
                wall = load.pull(s.host, reference, bench.scratch, p.pull_timeout)
                bench.log(f"  {s.name:16} {wall:8.2f} s")
                return [wall]

            bench._measure([pulls], s.name, pull)
    finally:
        subject.stop()


def targets(f: dict[str, Figure]) -> list[Target]:
    def ratio(key: str) -> float | None:
        return f[key].ratio(NAME, "regproxy") if key in f else None

    return [
        Target(
            "trust_manifest_tag",
            "≥ 0.95x regproxy without policy",
            ratio("trust_manifest_tag"),
            ">=",
            0.95,
        ),
        Target(
            "trust_warm_pull",
            "≤ 1.05x regproxy without policy",
            ratio("trust_warm_pull"),
            "<=",
            1.05,
        ),
    ]
