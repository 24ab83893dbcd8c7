"""The ``regproxy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from proxy.config import Config, ConfigError, load_config
from proxy.core.errors import RegistryError, StorageError
from proxy.fetch.settings import DOCKER_HUB_URL
from proxy.ops import commands
from proxy.ops.commands import DEFAULT_PROXY
from storage import ContentStore, WorkSettings, create_store, maintenance

log = logging.getLogger("proxy")
T = TypeVar("T")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument(
        "--storage",
        metavar="PATH|s3://BUCKET/PREFIX",
        help="cache directory (default ./regproxy-data), or an S3 bucket and key prefix",
    )
    parser.add_argument(
        "--work-dir",
        metavar="DIR",
        help="with s3: this replica's own disk for downloads and hot blobs "
        "(default ./regproxy-work)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regproxy",
        description="Pull-through caching registry proxy for Docker Hub and OCI registries.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    _add_config_flags(serve)
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)"
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help=f"the default upstream registry (default {DOCKER_HUB_URL})",
    )
    serve.add_argument(
        "--tag-ttl",
        metavar="DURATION",
        help="how long a tag is trusted before revalidation (default 5m)",
    )
    serve.add_argument(
        "--log-level", metavar="LEVEL", help="debug, info, warning, error (default info)"
    )
    serve.add_argument(
        "--head-timeout",
        metavar="DURATION",
        help="close connections whose request head takes longer (default 30s)",
    )
    serve.add_argument(
        "--drain-delay",
        metavar="DURATION",
        help="on SIGTERM, /readyz answers 503 while serving this long before closing (default 0)",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help="processes sharing the port and the cache (default: one per CPU it may run on)",
    )
    serve.add_argument(
        "--drain-timeout",
        metavar="DURATION",
        help="on SIGTERM, let downloads finish this long, then hand them over (default 20s)",
    )
    serve.add_argument(
        "--upstream-username", metavar="USER", help="username for the default upstream"
    )
    serve.add_argument(
        "--upstream-password-file",
        metavar="FILE",
        help="file holding the default upstream's password (or set REGPROXY_UPSTREAM_PASSWORD)",
    )
    serve.add_argument("--max-size", metavar="SIZE", help="bound the cache, e.g. 50GiB")
    serve.add_argument(
        "--blob-ttl", metavar="DURATION", help="also evict what was unused this long, e.g. 30d"
    )
    serve.add_argument(
        "--offline", action="store_true", default=None, help="never contact upstream"
    )
    serve.add_argument(
        "--redis", metavar="URL", help="redis://… for metadata shared by replicas (default: none)"
    )
    serve.add_argument(
        "--work-max-size",
        metavar="SIZE",
        help="with s3: bytes of hot blobs kept in --work-dir (default 10GiB)",
    )
    serve.add_argument(
        "--advertise-url",
        metavar="URL",
        help="where other replicas reach this one (default: from --listen / the host name)",
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    serve.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    serve.set_defaults(handler=cmd_serve)

    health = commands.add_parser(
        "healthcheck", help="exit 0 when the regproxy of this host answers GET /healthz"
    )
    health.add_argument("--config", metavar="FILE", help="YAML configuration file")
    health.add_argument(
        "--url",
        metavar="URL",
        help="default: from --listen of process 1 (in a container), "
        "else the configuration's listen address",
    )
    health.set_defaults(handler=cmd_healthcheck)

    cache = commands.add_parser("cache", help="look at or prune a cache directory")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    stats = cache_commands.add_parser("stats", help="size, hit ratio, top repositories")
    _add_config_flags(stats)
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(handler=cmd_cache_stats)
    purge = cache_commands.add_parser(
        "purge", help="drop an image's tags and manifests, and blobs nothing else uses"
    )
    _add_config_flags(purge)
    purge.add_argument("image", metavar="IMAGE[:TAG]", help="without a tag: every tag")
    purge.add_argument(
        "--redis", metavar="URL", help="the fleet's Redis: forget the image's records there too"
    )
    purge.add_argument("--json", action="store_true", help="print JSON")
    purge.set_defaults(handler=cmd_cache_purge)

    gc = commands.add_parser("gc", help="remove temp files of crashed runs and orphaned entries")
    _add_config_flags(gc)
    gc.add_argument("--json", action="store_true", help="print JSON")
    gc.set_defaults(handler=cmd_gc)

    verify = commands.add_parser(
        "verify", help="re-hash stored blobs and manifests; quarantine any mismatch"
    )
    _add_config_flags(verify)
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(handler=cmd_verify)

    inspect = commands.add_parser(
        "inspect", help="show the platforms a running proxy serves for a tag, with their sources"
    )
    inspect.add_argument("image", metavar="IMAGE[:TAG]")
    inspect.add_argument(
        "--proxy", default=DEFAULT_PROXY, metavar="URL", help=f"default {DEFAULT_PROXY}"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=cmd_inspect)

    warm = commands.add_parser(
        "warm", help="pull images' manifests and blobs through a running proxy into its cache"
    )
    warm.add_argument("images", nargs="+", metavar="IMAGE[:TAG]")
    warm.add_argument(
        "--proxy", default=DEFAULT_PROXY, metavar="URL", help=f"default {DEFAULT_PROXY}"
    )
    warm.add_argument(
        "--platform",
        default="all",
        metavar="all|OS/ARCH[/VARIANT],...",
        help="platforms to warm (default all)",
    )
    warm.add_argument("--json", action="store_true", help="print counts as JSON")
    warm.set_defaults(handler=cmd_warm)

    policy = commands.add_parser("policy", help="the trust policy (config policy:)")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_commands.add_parser(
        "check",
        help="what a pull of IMAGE through a running proxy would get, without pulling layers; "
        "exit 1 when refused",
    )
    check.add_argument("image", metavar="IMAGE[:TAG|@DIGEST]")
    check.add_argument(
        "--proxy", default=DEFAULT_PROXY, metavar="URL", help=f"default {DEFAULT_PROXY}"
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=cmd_policy_check)

    sync = commands.add_parser("sync", help="scheduled sync of chosen images (config sync:)")
    sync_commands = sync.add_subparsers(dest="sync_command", required=True, metavar="COMMAND")
    sync_status = sync_commands.add_parser(
        "status", help="each entry's tags, digests, last and next check, from a running proxy"
    )
    sync_status.add_argument(
        "--proxy", default=DEFAULT_PROXY, metavar="URL", help=f"default {DEFAULT_PROXY}"
    )
    sync_status.add_argument("--json", action="store_true", help="print JSON")
    sync_status.set_defaults(handler=cmd_sync_status)
    return parser


#: argparse destination -> configuration path.
FLAG_PATHS = {
    "listen": "listen",
    "upstream": "upstream",
    "storage": "storage",
    "tag_ttl": "tag_ttl",
    "log_level": "log_level",
    "head_timeout": "head_timeout",
    "drain_delay": "drain_delay",
    "workers": "workers",
    "drain_timeout": "drain_timeout",
    "upstream_username": "upstream_username",
    "upstream_password_file": "upstream_password_file",
    "max_size": "cache.max_size",
    "blob_ttl": "cache.blob_ttl",
    "offline": "offline",
    "redis": "redis.url",
    "tls_cert": "tls_cert",
    "tls_key": "tls_key",
    "work_dir": "work_dir",
    "work_max_size": "work_max_size",
    "advertise_url": "advertise_url",
}


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {path: getattr(args, dest, None) for dest, path in FLAG_PATHS.items()}
    return load_config(config_file=args.config, flags=flags)


class _RefusedRequests(logging.Filter):
    """aiohttp logs every request its parser refuses at ERROR with a traceback: anyone who can
    reach the port could flood the log. Keep one short warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "refused a malformed request: %s", (exc.message,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.server").addFilter(_RefusedRequests())
    for noisy in ("aiobotocore", "botocore"):  # "Found credentials in ..." on every start
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    setup_logging(config.log_level)
    # late: start-up errors above print faster
    from proxy.app import AccessLogger, create_app, drain

    ssl_context = None
    if config.tls_cert and config.tls_key:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls_cert", f"cannot load certificate and key: {exc}") from None
    from proxy.server import serve
    from proxy.workers import default_workers, serve_workers

    host, port = config.listen_address
    _install_uvloop()
    workers = config.workers or default_workers()
    if workers > 1:
        return serve_workers(
            config,
            workers,
            ssl_context,
            reloader=lambda app: _reloader(app, args),
            reporting=_reporting,
        )
    app = create_app(config)
    asyncio.run(
        serve(
            app,
            host=host,
            port=port,
            ssl_context=ssl_context,
            access_log_class=AccessLogger,
            head_timeout=config.head_timeout,
            on_reload=_reloader(app, args),
            drain_delay=config.drain_delay,
            drain=lambda: drain(app, config.drain_timeout),
        )
    )
    return 0


def _reloader(app: Any, args: argparse.Namespace) -> Callable[[], None]:
    """What SIGHUP does: read the configuration again and take its policy."""

    def reload() -> None:
        from proxy.app import reload_policy

        try:
            reload_policy(app, config_from_args(args).policy)
        except ConfigError as exc:
            log.error("SIGHUP: the policy was not reloaded, the previous one stays: %s", exc)

    return reload


def _listen_of_pid1() -> str | None:
    """``--listen`` of the container's main process, if it is a regproxy with one."""
    try:
        with open("/proc/1/cmdline", "rb") as handle:
            argv = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        if arg == "--listen" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--listen="):
            return arg.partition("=")[2]
    return None


def cmd_healthcheck(args: argparse.Namespace) -> int:
    import urllib.request

    url = args.url
    if not url:
        config = load_config(config_file=args.config, flags={"listen": _listen_of_pid1()})
        host, port = config.listen_address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if config.tls_cert else "http"
        url = f"{scheme}://{host}:{port}/healthz"
    context = ssl._create_unverified_context()  # a probe of our own port: the name may differ
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"regproxy: {url}: {exc}", file=sys.stderr)
        return 1


def _storage_config(args: argparse.Namespace) -> Config:
    config = load_config(
        config_file=args.config,
        flags={
            "storage": args.storage,
            "work_dir": args.work_dir,
            "redis.url": getattr(args, "redis", None),
        },
    )
    if config.s3 is None and not config.storage.is_dir():
        raise ConfigError("storage", f"{config.storage} is not a directory")
    return config


def _with_store(config: Config, work: Callable[[ContentStore], Awaitable[T]]) -> T:
    """Open the configured store, run ``work`` on it, close it."""

    async def run(work_settings: WorkSettings) -> T:
        store = create_store(config.storage, config.s3, work_settings)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    if config.s3 is not None and config.work == WorkSettings():
        # No --work-dir: the command needs a place for its own temp files, not ./regproxy-work.
        with tempfile.TemporaryDirectory(prefix="regproxy-admin-") as tmp:
            return asyncio.run(run(WorkSettings(Path(tmp), config.work.max_size)))
    return asyncio.run(run(config.work))


def _print(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    print(json.dumps(result, indent=2) if args.json else text)


def _size(n: int | None) -> str:
    if n is None:
        return "unbounded"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def cmd_cache_stats(args: argparse.Namespace) -> int:
    config = _storage_config(args)
    result = _with_store(config, lambda store: maintenance.stats(store, config.cache.max_size))
    ratio = result["hit_ratio"]
    lines = [
        f"size        {_size(result['used_bytes'])} of {_size(result['limit_bytes'])}"
        f" ({result['files']['blobs']} blobs, {result['files']['manifests']} manifests)",
        f"hit ratio   {'-' if ratio is None else f'{ratio:.1%}'}"
        f" ({result['hits']} hits, {result['misses']} misses)",
        "top repositories by bytes:",
        *(f"  {_size(r['bytes']):>12}  {r['repository']}" for r in result["top_by_bytes"]),
        "top repositories by pulls:",
        *(f"  {r['pulls']:>12}  {r['repository']}" for r in result["top_by_pulls"]),
        "upstream rate limit remaining: "
        + (
            ", ".join(f"{k}={v}" for k, v in result["upstream_ratelimit_remaining"].items())
            or "unknown"
        ),
    ]
    _print(args, result, "\n".join(lines))
    return 0


def cmd_cache_purge(args: argparse.Namespace) -> int:
    config = _storage_config(args)
    from proxy.access.routing import Router
    from proxy.core.reference import parse_image

    ref = parse_image(args.image)
    upstream, repository = Router(config.upstreams, config.default_upstream).route(
        ref.repository, None
    )

    async def purge(store: ContentStore) -> dict[str, Any]:
        if config.redis_url is None:
            return await maintenance.purge(store, upstream, repository, ref.tag)
        from redis.exceptions import RedisError

        from storage.redis import RedisMetadata, connect

        client = connect(config.redis_url)
        try:
            await client.ping()  # the fleet's records must go too: fail before the store
            meta = RedisMetadata(client, store)
            return await maintenance.purge(store, upstream, repository, ref.tag, meta)
        except (RedisError, OSError) as exc:
            raise commands.CommandError(f"redis {config.redis_url}: {exc}") from None
        finally:
            await client.aclose()

    result = _with_store(config, purge)
    text = (
        f"purged {result['tags']} tags of {upstream}/{repository}: "
        f"{result['files']} files, {_size(result['bytes'])} freed"
    )
    _print(args, result, text)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    config = _storage_config(args)
    result = _with_store(config, maintenance.gc)
    details = ", ".join(f"{k}={v}" for k, v in sorted(result["details"].items())) or "nothing"
    _print(args, result, f"gc freed {result['files']} files, {_size(result['bytes'])} ({details})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    config = _storage_config(args)

    async def verify(store: ContentStore) -> dict[str, Any]:
        bar = commands.progress_bar(await maintenance.total_bytes(store), "verifying")
        try:
            return await maintenance.verify(store, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()

    result = _with_store(config, verify)
    text = f"verified {result['checked']} files ({_size(result['bytes'])}): " + (
        "all good"
        if not result["corrupt"]
        else f"{len(result['corrupt'])} corrupt, quarantined: "
        + ", ".join(c["digest"] for c in result["corrupt"])
    )
    _print(args, result, text)
    return 1 if result["corrupt"] else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    result = asyncio.run(commands.inspect(args.image, args.proxy))
    if args.json:
        print(json.dumps(result["platforms"], indent=2))
    else:
        commands.print_inspect(result)
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    totals = asyncio.run(commands.warm(args.images, args.proxy, args.platform))
    if args.json:
        print(json.dumps(totals))
    else:
        print(
            f"warmed {totals['manifests']} manifests and {totals['blobs']} blobs "
            f"({totals['bytes']} bytes)"
        )
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    result = asyncio.run(commands.policy_check(args.image, args.proxy))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        commands.print_policy_check(result)
    return 0 if result["allowed"] else 1


def cmd_sync_status(args: argparse.Namespace) -> int:
    from proxy.ops import sync_status

    result = asyncio.run(sync_status.fetch_status(args.proxy))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        sync_status.print_status(result)
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the stdlib loop works, only slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Any = args.handler
    return _reporting(lambda: int(handler(args)))


def _reporting(call: Callable[[], int]) -> int:
    """``call()``, its errors printed as one line each and turned into an exit code."""
    try:
        return call()
    except ConfigError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    except commands.CommandError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        print(f"regproxy: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"regproxy: storage error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"regproxy: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
