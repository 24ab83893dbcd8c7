"""The trust policy (issue #23): deny, allowed tags and cosign signatures on the pull path.

Signatures are made by ``tests.harness.cosign`` exactly as cosign's specification describes
(the real cosign binary cannot be installed here) and pushed to a real distribution 2.8
upstream; pulls go through a real proxy process with skopeo (refusals show skopeo's own
output), and a Docker daemon and podman in ``test_trust_clients``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from proxy.config import ConfigError, build_config
from proxy.trust import cosign as verifier
from proxy.trust.settings import load_key
from tests.harness import cosign
from tests.harness.clients import Dockerd, Podman
from tests.harness.front import FlipByte, Front, blob, manifest
from tests.harness.images import SeededImage, build_image, push_image, skopeo
from tests.harness.proxyproc import REPO_ROOT, ProxyProcess
from tests.harness.push import sha256_digest
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry, start_registry

ACCEPT = ",".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


# -- configuration and verification without servers -----------------------------------------


def test_policy_config_errors_name_the_key(tmp_path: Path) -> None:
    key = cosign.generate_key().write_public(tmp_path / "cosign.pub")
    private = tmp_path / "cosign.key"
    private.write_bytes(
        cosign.generate_key().private.private_bytes(
            cosign.serialization.Encoding.PEM,
            cosign.serialization.PrivateFormat.PKCS8,
            cosign.serialization.NoEncryption(),
        )
    )
    cases = {
        "policy[1].require_signature.keys[0]: cannot read /nonexistent/k.pub: No such file": [
            {"repository": "a/*", "deny": True},
            {"repository": "b/*", "require_signature": {"keys": ["/nonexistent/k.pub"]}},
        ],
        "policy[0].require_signature.keys[1]: " + f"{private} is not a PEM public key: holds a "
        "private key": [
            {"repository": "b/*", "require_signature": {"keys": [str(key), str(private)]}},
        ],
        "policy[0]: needs deny: true, allow_tags or require_signature": [{"repository": "x"}],
        "policy[0].repository: is required": [{"deny": True}],
        "policy[0].alow_tags: unknown setting": [{"repository": "x", "alow_tags": ["1"]}],
        "policy[0].allow_tags[0]: 'a b' is not a valid glob": [
            {"repository": "x", "allow_tags": ["a b"]}
        ],
        "policy[0]: deny refuses everything": [
            {"repository": "x", "deny": True, "allow_tags": ["1"]}
        ],
        "policy: must be a list": {"repository": "x"},
    }
    for expected, section in cases.items():
        with pytest.raises(ConfigError) as err:
            build_config({"policy": section})
        assert expected in str(err.value), str(err.value)
    config = build_config(
        {"policy": [{"repository": "a/*", "require_signature": {"keys": [str(key)]}}]}
    )
    assert config.policy.entries[0].keys[0].kind == "ecdsa-p256"
    # The fingerprint follows the keys' contents, not only their paths.
    cosign.generate_key().write_public(key)
    again = build_config(
        {"policy": [{"repository": "a/*", "require_signature": {"keys": [str(key)]}}]}
    )
    assert again.policy.fingerprint != config.policy.fingerprint


@pytest.mark.parametrize("kind", ["ecdsa", "ed25519", "rsa"])
def test_verify_layer_outcomes(tmp_path: Path, kind: str) -> None:
    signer = cosign.generate_key(kind)
    key = load_key(str(signer.write_public(tmp_path / "k.pub")), "k")
    other = load_key(str(cosign.generate_key(kind).write_public(tmp_path / "o.pub")), "o")
    digest = "sha256:" + "ab" * 32

    def check(sig: cosign.Signature, keys: tuple[object, ...]) -> verifier.Outcome:
        layers = verifier.signature_layers(json.dumps({"layers": [sig.layer()]}).encode())
        assert len(layers) == 1
        outcome, _ = verifier.verify_layer(layers[0], sig.payload, digest, keys)  # type: ignore[arg-type]
        return outcome

    good = cosign.make_signature(signer, "r/x", digest)
    assert check(good, (key,)) is verifier.Outcome.VERIFIED
    assert check(good, (other,)) is verifier.Outcome.BAD_SIGNATURE
    assert check(good, (other, key)) is verifier.Outcome.VERIFIED
    over = cosign.make_signature(signer, "r/x", digest, over="sha256:" + "cd" * 32)
    assert check(over, (key,)) is verifier.Outcome.WRONG_DIGEST
    assert check(cosign.make_signature(signer, "r/x", digest, tamper=True), (key,)) is (
        verifier.Outcome.BAD_SIGNATURE
    )
    # bytes that do not hash to the descriptor never reach the signature check
    layer = verifier.signature_layers(json.dumps({"layers": [good.layer()]}).encode())[0]
    outcome, _ = verifier.verify_layer(layer, good.payload.replace(b"r/x", b"r/y"), digest, (key,))
    assert outcome is verifier.Outcome.BAD_PAYLOAD


# -- through a proxy ---------------------------------------------------------------------------


@dataclass
class World:
    registry: Registry
    front: Front
    proxy: ProxyProcess
    images: dict[str, SeededImage]
    keys: dict[str, cosign.CosignKey]
    key_paths: dict[str, Path]
    config: Path
    signatures: dict[str, bytes]


def _policy(paths: dict[str, Path], names: tuple[str, ...]) -> dict[str, object]:
    return {
        "policy": [
            {
                "repository": "myorg/*",
                "require_signature": {"keys": [str(paths[n]) for n in names]},
            },
            {"repository": "library/alpine", "allow_tags": ["3.*"]},
            {"repository": "denied/*", "deny": True},
        ],
        "platforms": {
            "rules": [
                {
                    "repository": "myorg/multi",
                    "sources": {"linux/arm64/v8": "myorg/multi-arm:{tag}"},
                },
                {"repository": "myorg/half", "sources": {"linux/arm64/v8": "myorg/half-arm:{tag}"}},
                # no policy entry matches open/*: its sources' policies still do
                {"repository": "open/half", "sources": {"linux/arm64/v8": "myorg/half-arm:{tag}"}},
            ]
        },
    }


SPECS: dict[str, dict[str, object]] = {
    "myorg/signed:1": {},
    "myorg/signed2:1": {},
    "myorg/inspected:1": {"fmt": "docker"},
    "myorg/unsigned:1": {},
    "myorg/otherkey:1": {},
    "myorg/overdigest:1": {},
    "myorg/tampered:1": {},
    "myorg/ed:1": {"platforms": ("linux/amd64",), "single": True},
    "myorg/rsa:1": {"fmt": "docker"},
    "myorg/referrer:1": {},
    "myorg/flipsig:1": {},
    "myorg/flippayload:1": {},
    "myorg/multi:1": {"platforms": ("linux/amd64",), "single": True},
    "myorg/multi-arm:1": {"platforms": ("linux/arm64/v8",)},
    "myorg/half:1": {"platforms": ("linux/amd64",), "single": True},
    "myorg/half-arm:1": {"platforms": ("linux/arm64/v8",), "single": True},
    "open/half:1": {"platforms": ("linux/amd64",), "single": True},
    "library/alpine:3.19": {},
    "library/alpine:edge": {},
    "denied/thing:1": {},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("trust")
    registry = start_registry(tmp / "registry")
    front = Front(registry)
    proxy: ProxyProcess | None = None
    try:
        front.start()

        def push(reference: str) -> SeededImage:
            repository, _, tag = reference.rpartition(":")
            kwargs = {"platforms": ("linux/amd64", "linux/arm64/v8"), **SPECS[reference]}
            return push_image(registry, build_image(repository, tag, **kwargs))  # type: ignore[arg-type]

        with ThreadPoolExecutor(max_workers=6) as pool:
            images = dict(zip(SPECS, pool.map(push, SPECS), strict=True))
        keys = {
            k: cosign.generate_key(kind)
            for k, kind in (("a", "ecdsa"), ("b", "ecdsa"), ("ed", "ed25519"), ("rsa", "rsa"))
        }
        paths = {k: key.write_public(tmp / f"{k}.pub") for k, key in keys.items()}
        url = registry.url
        sigs: dict[str, bytes] = {}

        def sign(ref: str, key: str, **kw: object) -> None:
            image = images[ref]
            sigs[ref] = cosign.sign(url, image.repository, image.digest, keys[key], **kw)  # type: ignore[arg-type]

        for ref in (
            "myorg/inspected:1",
            "myorg/signed:1",
            "myorg/signed2:1",
            "myorg/flipsig:1",
            "myorg/flippayload:1",
            "myorg/multi:1",
            "myorg/multi-arm:1",
            "myorg/half:1",
        ):
            sign(ref, "a")
        sign("myorg/otherkey:1", "b")
        sign("myorg/overdigest:1", "a", over=images["myorg/signed:1"].digest)
        sign("myorg/tampered:1", "a", tamper=True)
        sign("myorg/ed:1", "ed")
        sign("myorg/rsa:1", "rsa")
        ref_image = images["myorg/referrer:1"]
        sign(
            "myorg/referrer:1",
            "a",
            referrer=True,
            subject_type=ref_image.media_type,
            subject_size=len(ref_image.raw),
        )
        config = tmp / "regproxy.yaml"
        config.write_text(yaml.safe_dump(_policy(paths, ("a", "ed", "rsa"))))
        proxy = ProxyProcess(front.url, tmp / "storage", extra_args=["--config", str(config)])
        proxy.start()
        yield World(registry, front, proxy, images, keys, paths, config, sigs)
    finally:
        if proxy is not None:
            proxy.stop()
        front.stop()
        registry.stop()


def get(url: str, accept: str = ACCEPT) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    body = get(f"{proxy.url}/metrics")[2].decode()
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def skopeo_fails(proxy: ProxyProcess, reference: str) -> str:
    with pytest.raises(RuntimeError) as err:
        skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{proxy.host}/{reference}")
    return str(err.value)


def test_signed_image_is_pulled_and_verified_once(world: World, tmp_path: Path) -> None:
    image = world.images["myorg/signed:1"]
    before = metric(world.proxy, "regproxy_trust_verifications_total", result="verified")
    skopeo(
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--quiet",
        f"docker://{world.proxy.host}/myorg/signed:1",
        f"dir:{tmp_path / 'out'}",
    )
    assert (tmp_path / "out" / "manifest.json").read_bytes() == image.raw
    for child in image.children.values():  # covered by the signed index
        assert (
            tmp_path / "out" / f"{child.digest.removeprefix('sha256:')}.manifest.json"
        ).read_bytes() == child.raw
    after = metric(world.proxy, "regproxy_trust_verifications_total", result="verified")
    assert after == before + 1
    # warm: served from the recorded verdict, no verification, no signature request upstream
    world.front.reset()
    status, headers, body = get(f"{world.proxy.url}/v2/myorg/signed/manifests/1")
    assert (status, body, headers["X-Cache"]) == (200, image.raw, "HIT")
    assert metric(world.proxy, "regproxy_trust_verifications_total", result="verified") == after
    assert [r for r in world.front.requests if ".sig" in r.path] == []
    # the signature itself is metadata: readable through the proxy, as cosign reads it
    sig_tag = image.digest.replace(":", "-") + ".sig"
    status, _, body = get(f"{world.proxy.url}/v2/myorg/signed/manifests/{sig_tag}")
    assert (status, body) == (200, world.signatures["myorg/signed:1"])


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("myorg/unsigned:1", "no signature found"),
        ("myorg/otherkey:1", "no signature by these keys"),
        ("myorg/overdigest:1", "signed, but over another digest"),
        ("myorg/tampered:1", "no signature by these keys"),
    ],
)
def test_refused_with_the_reason(world: World, reference: str, reason: str) -> None:
    image = world.images[reference]
    refused = metric(world.proxy, "regproxy_trust_refusals_total", rule="require_signature")
    out = skopeo_fails(world.proxy, reference)
    expected = (
        f"{image.repository}@{image.digest} has no signature by the keys of policy entry 1 "
        f"(myorg/*): {reason}"
    )
    assert expected in out, out
    status, _, body = get(f"{world.proxy.url}/v2/{image.repository}/manifests/{image.digest}")
    error = json.loads(body)["errors"][0]
    assert (status, error["code"], error["message"]) == (403, "DENIED", expected)
    assert metric(world.proxy, "regproxy_trust_refusals_total", rule="require_signature") == (
        refused + 2
    )
    # nothing of the refused image was handed out meanwhile, and no verdict was kept
    for child in image.children.values():
        assert get(f"{world.proxy.url}/v2/{image.repository}/manifests/{child.digest}")[0] == 403


@pytest.mark.parametrize("reference", ["myorg/ed:1", "myorg/rsa:1", "myorg/referrer:1"])
def test_ed25519_rsa_and_referrer_signatures(world: World, reference: str) -> None:
    image = world.images[reference]
    raw = skopeo(
        "inspect", "--raw", "--tls-verify=false", f"docker://{world.proxy.host}/{reference}"
    )
    assert raw.encode() == image.raw
    for child in image.children.values():
        status, _, body = get(f"{world.proxy.url}/v2/{image.repository}/manifests/{child.digest}")
        assert (status, body) == (200, child.raw)


def test_platform_manifest_by_digest_needs_a_verified_index(world: World) -> None:
    image = world.images["myorg/signed2:1"]
    child = image.child("linux/arm64/v8")
    url = f"{world.proxy.url}/v2/myorg/signed2/manifests/{child.digest}"
    status, _, body = get(url)
    assert status == 403, body
    assert "no signature found" in json.loads(body)["errors"][0]["message"]
    assert get(f"{world.proxy.url}/v2/myorg/signed2/manifests/1")[0] == 200
    assert get(url)[:3:2] == (200, child.raw)


def test_allow_tags_and_deny(world: World) -> None:
    url = world.proxy.url
    assert get(f"{url}/v2/library/alpine/manifests/3.19")[0] == 200
    out = skopeo_fails(world.proxy, "library/alpine:edge")
    assert (
        "library/alpine:edge is not an allowed tag of policy entry 2 (library/alpine) "
        "(allow_tags: 3.*)" in out
    ), out
    edge = world.images["library/alpine:edge"]
    assert get(f"{url}/v2/library/alpine/manifests/{edge.digest}")[:3:2] == (200, edge.raw)
    out = skopeo_fails(world.proxy, "denied/thing:1")
    assert "denied/thing is denied by policy entry 3 (denied/*)" in out, out
    thing = world.images["denied/thing:1"]
    assert get(f"{url}/v2/denied/thing/manifests/{thing.digest}")[0] == 403
    assert metric(world.proxy, "regproxy_trust_refusals_total", rule="deny", entry="3") == 2


def test_synthesized_index_passes_when_every_platform_does(world: World) -> None:
    url = world.proxy.url
    status, _, body = get(f"{url}/v2/myorg/multi/manifests/1")
    assert status == 200, body
    doc = json.loads(body)
    arm = world.images["myorg/multi-arm:1"].child("linux/arm64/v8")
    assert [m["digest"] for m in doc["manifests"]] == [
        world.images["myorg/multi:1"].digest,
        arm.digest,
    ]
    # the arm64 child, asked under the pulled repository, is covered
    assert get(f"{url}/v2/myorg/multi/manifests/{arm.digest}")[:3:2] == (200, arm.raw)
    half_arm = world.images["myorg/half-arm:1"]
    out = skopeo_fails(world.proxy, "myorg/half:1")
    assert (
        f"myorg/half:1 includes myorg/half-arm:1 ({half_arm.digest}), which has no signature by "
        "the keys of policy entry 1 (myorg/*): no signature found" in out
    ), out
    # under a repository no entry matches, the source's policy decides, for the index and for
    # the platform manifest asked for by digest
    status, _, body = get(f"{url}/v2/open/half/manifests/1")
    assert status == 403, body
    assert json.loads(body)["errors"][0]["message"].startswith(
        "open/half:1 includes myorg/half-arm:1"
    )
    status, _, body = get(f"{url}/v2/open/half/manifests/{half_arm.digest}")
    assert status == 403, body
    assert json.loads(body)["errors"][0]["message"] == (
        f"open/half@{half_arm.digest} comes from myorg/half-arm and has no signature by the keys "
        "of policy entry 1 (myorg/*): no signature found"
    )
    # the pulled repository's own platform, by digest: no policy, served
    own = world.images["open/half:1"]
    assert get(f"{url}/v2/open/half/manifests/{own.digest}")[:3:2] == (200, own.raw)


def test_signature_with_a_flipped_byte_is_never_trusted(world: World) -> None:
    url = world.proxy.url
    for reference, match, reason in (
        (
            "myorg/flipsig:1",
            lambda image: manifest(signature_digest(world, image), "GET"),
            "signature could not be fetched (upstream sent content that failed verification)",
        ),
        (
            "myorg/flippayload:1",
            lambda image: blob(payload_digest(world, image)),
            "signature payload does not match its descriptor",
        ),
    ):
        image = world.images[reference]
        rule = world.front.add_fault(match(image), FlipByte(offset=40))
        status, _, body = get(f"{url}/v2/{image.repository}/manifests/1")
        assert rule.applied == 1
        assert status == 403, body
        message = json.loads(body)["errors"][0]["message"]
        assert message.endswith(
            f"has no signature by the keys of policy entry 1 (myorg/*): {reason}"
        )
        # upstream now serves the true bytes: verified then, as nothing bad was kept
        assert get(f"{url}/v2/{image.repository}/manifests/1")[:3:2] == (200, image.raw)


def signature_digest(world: World, image: SeededImage) -> str:
    """The signature manifest's digest: fetched by it once its tag answered a HEAD."""
    return sha256_digest(world.signatures[f"{image.repository}:{image.tag}"])


def payload_digest(world: World, image: SeededImage) -> str:
    doc = json.loads(world.signatures[f"{image.repository}:{image.tag}"])
    return str(doc["layers"][0]["digest"])


def regproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "NO_PROXY": "127.0.0.1"},
        check=False,
    )


def test_policy_check_and_inspect_commands(world: World) -> None:
    ok = regproxy("policy", "check", "myorg/signed:1", "--proxy", world.proxy.url)
    assert ok.returncode == 0, ok.stderr
    assert "allowed (policy entry 1)" in ok.stdout
    key = str(world.key_paths["a"])
    assert re.search(r"linux/arm64/v8\s+sha256:\S+\s+upstream\s+yes: " + re.escape(key), ok.stdout)
    refused = regproxy("policy", "check", "myorg/otherkey:1", "--proxy", world.proxy.url, "--json")
    assert refused.returncode == 1
    result = json.loads(refused.stdout)
    assert result["allowed"] is False
    assert result["message"].endswith("no signature by these keys")
    # before any pull: the index is verified, and covers its platforms
    inspect = regproxy("inspect", "myorg/inspected:1", "--proxy", world.proxy.url)
    assert inspect.returncode == 0, inspect.stderr
    assert "SIGNED" in inspect.stdout
    index = world.images["myorg/inspected:1"].digest
    lines = [line for line in inspect.stdout.splitlines() if line.startswith("linux/")]
    assert len(lines) == 2
    assert all(line.endswith(f"yes: {key} via index {index[:19]}") for line in lines), lines
    # the console's search box shows the same
    status, _, body = get(f"{world.proxy.url}/_regproxy/api/inspect?image=myorg/unsigned:1")
    assert status == 200
    rows = json.loads(body)["platforms"]
    assert {r["trust"]["signed"] for r in rows} == {False}
    assert {r["trust"]["reason"] for r in rows} == {"no signature found"}


def test_removed_key_refuses_cached_image_after_sighup(world: World, tmp_path: Path) -> None:
    image = world.images["myorg/ed:1"]
    config = tmp_path / "regproxy.yaml"
    config.write_text(yaml.safe_dump(_policy(world.key_paths, ("a", "ed"))))
    proxy = ProxyProcess(
        world.front.url, tmp_path / "storage", extra_args=["--config", str(config)]
    )
    with proxy:
        url = f"{proxy.url}/v2/myorg/ed/manifests/1"
        assert get(url)[:3:2] == (200, image.raw)
        assert get(url)[1]["X-Cache"] == "HIT"
        config.write_text(yaml.safe_dump(_policy(world.key_paths, ("a",))))
        assert proxy.pid is not None
        os.kill(proxy.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "trust policy loaded" not in proxy.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        status, _, body = get(url)
        assert status == 403, body
        assert "no signature by these keys" in json.loads(body)["errors"][0]["message"]
        # a broken file keeps the policy in force
        config.write_text("policy: [{repository: x}]\n")
        os.kill(proxy.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "policy was not reloaded" not in proxy.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(url)[0] == 403
        config.write_text(yaml.safe_dump(_policy(world.key_paths, ("ed",))))
        os.kill(proxy.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while get(url)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(url)[:3:2] == (200, image.raw)


@pytest.mark.e2e
def test_docker_pulls_a_signed_image_through_the_mirror(world: World) -> None:
    image = world.images["myorg/signed:1"]
    with Dockerd([world.proxy.url]) as d:
        d.pull("myorg/signed:1", platform="linux/arm64")
        assert d.inspect_arch("myorg/signed:1") == ("linux", "arm64", "v8")
        assert d.repo_digests("myorg/signed:1") == [f"myorg/signed@{image.digest}"]
        refused = d.pull("myorg/unsigned:1", check=False)
        assert refused.returncode != 0


@pytest.mark.e2e
def test_podman_pulls_a_signed_image_through_the_mirror(world: World) -> None:
    with Podman([world.proxy.url]) as p:
        p.pull("docker.io/myorg/rsa:1", arch="arm64")
        assert p.inspect_arch("docker.io/myorg/rsa:1") == ("linux", "arm64", "v8")
        refused = p.pull("docker.io/myorg/unsigned:1", check=False)
        assert refused.returncode != 0
        world_image = world.images["myorg/unsigned:1"]
        assert f"myorg/unsigned@{world_image.digest} has no signature" in refused.stderr, (
            refused.stderr
        )


def test_replicas_share_verdicts_through_redis(
    world: World, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A verdict reached by one replica is the other's: no second verification, no signature
    request upstream; each replica keeps checking it against its own policy's fingerprint."""
    image = world.images["myorg/multi-arm:1"]
    volume = tmp_path / "shared"
    args = ["--config", str(world.config), "--redis", redis_server.url]
    a = ProxyProcess(world.front.url, volume, extra_args=args, log_path=tmp_path / "a.log")
    b = ProxyProcess(world.front.url, volume, extra_args=args, log_path=tmp_path / "b.log")
    with a, b:
        assert get(f"{a.url}/v2/myorg/multi-arm/manifests/1")[:3:2] == (200, image.raw)
        assert metric(a, "regproxy_trust_verifications_total", result="verified") == 1
        world.front.reset()
        for child in image.children.values():
            url = f"{b.url}/v2/myorg/multi-arm/manifests/{child.digest}"
            assert get(url)[:3:2] == (200, child.raw)  # covered by the index a verified
        assert get(f"{b.url}/v2/myorg/multi-arm/manifests/1")[:3:2] == (200, image.raw)
        assert metric(b, "regproxy_trust_verifications_total") == 0
        assert [r.path for r in world.front.requests if "sha256-" in r.path] == []
