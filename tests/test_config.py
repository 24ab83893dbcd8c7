"""Configuration: precedence, parsing, and one clear line for every bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config
from proxy.core.settings import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("90s", 90), ("250ms", 0.25), ("42", 42), (7, 7)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m5", "-1", "1h 5", "five"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50GiB", 50 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5G", 1_500_000_000),
        ("1024", 1024),
        ("10KiB", 10240),
        ("2TB", 2 * 10**12),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_defaults() -> None:
    config = load_config(environ={})
    assert config.listen == "0.0.0.0:5000"
    assert config.storage == Path("./regproxy-data")
    assert config.tag_ttl == 300
    hub = config.upstream()
    assert hub.name == "docker.io"
    assert hub.url == "https://registry-1.docker.io"
    assert hub.library_prefix


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.yml"
    conf.write_text("listen: 127.0.0.1:1111\ntag_ttl: 1m\nstorage: /from/file\nlog_level: debug\n")
    env = {"REGPROXY_LISTEN": "127.0.0.1:2222", "REGPROXY_TAG_TTL": "2m"}
    config = load_config(config_file=conf, environ=env, flags={"listen": "127.0.0.1:3333"})
    assert config.listen == "127.0.0.1:3333"  # flag
    assert config.tag_ttl == 120  # env
    assert config.storage == Path("/from/file")  # file
    assert config.log_level == "debug"
    assert config.upstream().tag_ttl == 120  # upstreams inherit the global TTL


def test_config_file_from_environment(tmp_path: Path) -> None:
    conf = tmp_path / "c.yml"
    conf.write_text("upstream: http://127.0.0.1:9999\n")
    config = load_config(environ={"REGPROXY_CONFIG": str(conf)})
    assert config.upstream().url == "http://127.0.0.1:9999"


def test_password_from_env_and_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-from-file\n")
    config = load_config(
        environ={"REGPROXY_UPSTREAM_PASSWORD_FILE": str(secret)},
        flags={"upstream_username": "ci"},
    )
    assert config.upstream().password == "s3cret-from-file"
    assert "s3cret" not in repr(config)
    config = load_config(
        environ={"REGPROXY_UPSTREAM_PASSWORD": "from-env"}, flags={"upstream_username": "ci"}
    )
    assert config.upstream().password == "from-env"


def test_many_upstreams(tmp_path: Path) -> None:
    secret = tmp_path / "corp"
    secret.write_text("pw")
    conf = tmp_path / "c.yml"
    conf.write_text(
        "upstreams:\n"
        "  docker.io: {url: https://registry-1.docker.io}\n"
        "  ghcr.io: {url: https://ghcr.io}\n"
        f"  corp: {{url: https://registry.corp.example, username: ci, password_file: {secret},"
        " tag_ttl: 1m, max_connections: 16}\n"
        "default_upstream: docker.io\n"
    )
    config = load_config(config_file=conf, environ={}, flags={"upstream": "http://127.0.0.1:1"})
    assert set(config.upstreams) == {"docker.io", "ghcr.io", "corp"}
    assert config.upstream().url == "http://127.0.0.1:1"  # --upstream replaces the default's URL
    corp = config.upstreams["corp"]
    assert (corp.username, corp.password, corp.tag_ttl, corp.max_connections) == (
        "ci",
        "pw",
        60,
        16,
    )
    assert not corp.library_prefix
    assert not config.upstreams["ghcr.io"].library_prefix


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("tag_ttl: soon\n", "tag_ttl"),
        ("listen: nowhere\n", "listen"),
        ("upstream: ftp://x\n", "upstreams.docker.io.url"),
        ("upstream: https://user:pw@x\n", "upstreams.docker.io.url"),
        ("cache: {max_size: lots}\n", "cache.max_size"),
        ("cache: {low_watermark: 0.99}\n", "cache.low_watermark"),
        ("log_level: loud\n", "log_level"),
        ("bogus: 1\n", "bogus"),
        (
            "upstreams: {x: {url: http://a, colour: red}}\ndefault_upstream: x\n",
            "upstreams.x.colour",
        ),
        ("default_upstream: nope\n", "default_upstream"),
        ("redis: {url: http://x}\n", "redis.url"),
        ("tls_cert: /a\n", "tls_key"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    conf = tmp_path / "c.yml"
    conf.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(config_file=conf, environ={})
    assert info.value.key == key
    assert key in str(info.value)


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "c.yml"
    conf.write_text("tag_ttl: [1, 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "not valid YAML" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--tag-ttl", "forever"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "regproxy: configuration error: tag_ttl: 'forever' is not a duration such as 5m, 1h or 30s"
    )


def test_password_never_echoed(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "https://u:hunter2@x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "hunter2" not in result.stderr


def test_s3_storage_from_flags_env_and_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "storage: s3://cache-bucket/team/prod/\n"
        "s3:\n"
        "  endpoint: http://minio:9000\n"
        "  access_key_id: AKIA\n"
        f"  secret_access_key_file: {secret}\n"
    )
    config = load_config(
        config_file=config_file,
        environ={"REGPROXY_S3_REDIRECT": "true", "REGPROXY_WORK_DIR": str(tmp_path / "w")},
        flags={"work_max_size": "2GiB"},
    )
    assert config.s3 is not None
    assert (config.s3.bucket, config.s3.prefix) == ("cache-bucket", "team/prod")
    assert config.s3.endpoint == "http://minio:9000" and config.s3.secret_access_key == "s3cr3t"
    assert config.s3.redirect is True and config.s3.path_style is None  # on: endpoint set
    assert (config.work.path, config.work.max_size) == (tmp_path / "w", 2 * 1024**3)
    assert "s3cr3t" not in repr(config)
    env_only = load_config(environ={"REGPROXY_STORAGE": "s3://other-bucket"})
    assert env_only.s3 is not None and (env_only.s3.bucket, env_only.s3.prefix) == (
        "other-bucket",
        "",
    )


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"storage": "s3://Bad_Bucket/x"}, "storage"),
        ({"storage": "/data", "s3": {"endpoint": "http://m:9000"}}, "storage"),
        ({"storage": "s3://bucket-a/x", "s3": {"access_key_id": "AKIA"}}, "s3.access_key_id"),
        ({"storage": "s3://bucket-a/x", "s3": {"endpoint": "minio:9000"}}, "s3.endpoint"),
        ({"storage": "s3://bucket-a/x", "s3": {"redirect": "maybe"}}, "s3.redirect"),
        ({"storage": "s3://bucket-a/x", "s3": {"part_size": "1MiB"}}, "s3.part_size"),
        ({"storage": "s3://bucket-a/x", "s3": {"colour": "blue"}}, "s3.colour"),
        ({"work_max_size": "lots"}, "work_max_size"),
    ],
)
def test_bad_s3_settings_name_the_key(tmp_path: Path, raw: dict[str, object], key: str) -> None:
    import yaml

    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(config_file=config_file, environ={})
    assert info.value.key == key
