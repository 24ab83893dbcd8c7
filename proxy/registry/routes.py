"""The registry API's pull side, as HTTP handlers: each parses and checks its request, routes
it to an upstream and a repository (:func:`route_for`, which applies the client's access rules),
and asks the services below for the answer.

Routes::

    GET        /v2/                              API version check (and login, with auth)
    GET|HEAD   /v2/<name>/manifests/<reference>  proxy.platforms -> proxy.cache.manifests
    GET|HEAD   /v2/<name>/blobs/<digest>         proxy.cache.blobs
    GET        /v2/<name>/tags/list              proxy.cache.manifests (tags_list)
    GET|HEAD   /v2/<name>/referrers/<digest>     proxy.cache.referrers (OCI 1.1, ?artifactType=)
    *          /v2/...                           405 UNSUPPORTED for anything that would write
    GET        /healthz, /readyz, /metrics       process up; storage usable; Prometheus
    GET        /_regproxy/inspect?image=         platforms served for a tag, with sources
    GET        /_regproxy/policy/check?image=    what a pull would get under the trust policy
    GET|POST   /token                            Bearer tokens, with auth (proxy.access.tokens)
    GET        /_regproxy/peer/blobs/<digest>    another replica streams a download (shared secret)

Every /v2/ request is routed to an upstream (``proxy.access.routing``), checked against the
access rules (``proxy.access.auth``) and, for digests, against what the repository is known to
hold (``proxy.cache.links``) before anything is looked up. A manifest is served only once the
trust policy admits it (``proxy.trust``).
"""

from __future__ import annotations

import secrets

import aiohttp
from aiohttp import web

from proxy.cache.blobfile import BlobFileResponse
from proxy.cache.blobs import stream_download
from proxy.cache.manifests import Manifest
from proxy.core.errors import (
    BlobUnknown,
    Denied,
    ManifestInvalid,
    NameInvalid,
    RangeInvalid,
    Unsupported,
)
from proxy.core.media import INDEX_TYPES, OCI_INDEX
from proxy.core.metrics import CONTENT_TYPE_LATEST
from proxy.core.reference import check_digest, check_name, check_reference, is_digest, parse_image
from proxy.fetch.download import CACHE_RESULT, PEER_HEADER, PEER_PATH, Cache
from proxy.fetch.upstream import Upstream
from proxy.platforms.rules import accepts_index, index_entries
from proxy.registry.keys import (
    AUTH,
    BLOBS,
    CACHE,
    DRAINING,
    LINKS,
    MANIFESTS,
    METRICS,
    PLATFORMS,
    REFERRERS,
    ROUTER,
    STORAGE,
    TRUST,
    UPSTREAMS,
)
from proxy.registry.middleware import API_HEADERS

READ_METHODS = ("GET", "HEAD")


def split_path(path: str) -> tuple[str, str, str]:
    """``name/manifests/ref`` -> ``(name, "manifests", ref)``; the last marker wins."""
    for kind in ("manifests", "blobs"):
        name, sep, ref = path.rpartition(f"/{kind}/")
        if sep and name and ref and "/" not in ref:
            return name, kind, ref
    name, sep, rest = path.rpartition("/tags/")
    if sep and name and rest == "list":
        return name, "tags", "list"
    raise web.HTTPNotFound()


async def route_for(request: web.Request, name: str) -> tuple[Upstream, str]:
    """The upstream and repository a request is for, once the client may pull it."""
    if len(name) > 512:
        raise NameInvalid({"name": name[:300]})
    check_name(name)
    upstream_name, repository = request.app[ROUTER].route(name, request.query.get("ns"))
    auth = request.app[AUTH]
    if auth.enabled:
        await auth.check(request, name, upstream_name, repository)
    return request.app[UPSTREAMS][upstream_name], repository


async def handle_base(request: web.Request) -> web.Response:
    request["route"] = "base"
    if request.method not in READ_METHODS:
        raise Unsupported({"method": request.method})
    await request.app[AUTH].check_base(request)
    return web.json_response({}, headers=API_HEADERS)


async def handle_token(request: web.Request) -> web.StreamResponse:
    """``/token``: the Bearer token service (``proxy.access.tokens``), when client auth is on."""
    request["route"] = "token"
    auth = request.app[AUTH]
    if not auth.enabled:
        raise web.HTTPNotFound()
    return await auth.token_endpoint(request)


async def handle_v2(request: web.Request) -> web.StreamResponse:
    if request.method not in READ_METHODS:
        raise Unsupported({"method": request.method})
    name, kind, ref = split_path(request.match_info["path"])
    request["route"] = {"blobs": "blob", "manifests": "manifest", "tags": "tags"}[kind]
    if kind != "tags":
        request["kind"] = request["route"]  # blob | manifest: what hit/miss metrics count
    if kind == "blobs":
        check_name(name)
        check_digest(ref)
        upstream, repository = await route_for(request, name)
        return await serve_blob(request, upstream, repository, ref)
    if kind == "manifests":
        check_name(name)
        check_reference(ref)
        upstream, repository = await route_for(request, name)
        if request.method == "GET" and not is_digest(ref):
            request["pull"] = f"{upstream.name}/{repository}"
        return await serve_manifest(request, upstream, repository, ref)
    upstream, repository = await route_for(request, name)
    return await serve_tags(request, upstream, repository)


async def serve_blob(
    request: web.Request, upstream: Upstream, repository: str, digest: str
) -> web.StreamResponse:
    links, blobs = request.app[LINKS], request.app[BLOBS]
    source, src_repo = await request.app[PLATFORMS].source_of(upstream, repository, digest)
    fetched_here = False
    if not await links.linked(upstream.name, repository, digest):
        if await blobs.held_elsewhere(digest, source, src_repo):
            await links.confirm(
                source, src_repo, digest, "blobs", as_upstream=upstream.name, as_repo=repository
            )
        else:
            fetched_here = True  # fetched from `repository` itself: that is the confirmation
    resp = await blobs.serve(request, source, src_repo, digest)
    if fetched_here and request.method == "GET" and request.get(CACHE_RESULT) is not Cache.ABORTED:
        await links.link(upstream.name, repository, [digest])
    return resp


async def serve_manifest(
    request: web.Request, upstream: Upstream, repository: str, reference: str
) -> web.StreamResponse:
    head = request.method == "HEAD"
    platforms, links, trust = request.app[PLATFORMS], request.app[LINKS], request.app[TRUST]
    manifest: Manifest
    if is_digest(reference):
        # Cached for another repository: only if upstream says this one holds it too.
        if (
            not await links.linked(upstream.name, repository, reference)
            and await request.app[MANIFESTS].local(reference) is not None
        ):
            source, src_repo = await platforms.source_of(upstream, repository, reference)
            await links.confirm(
                source,
                src_repo,
                reference,
                "manifests",
                as_upstream=upstream.name,
                as_repo=repository,
            )
        manifest = await platforms.child_manifest(upstream, repository, reference, head=head)
        await trust.admit(upstream, repository, reference, manifest)
    else:
        manifest = await platforms.by_tag(upstream, repository, reference, head=head)
        await trust.admit(upstream, repository, reference, manifest)
        # Clients send one Accept line per type (dockerd, containers/image): read them all.
        accept = ",".join(request.headers.getall("Accept", []))
        if manifest.media_type in INDEX_TYPES and not accepts_index(accept):
            manifest = await platforms.for_client(
                upstream,
                repository,
                manifest,
                None,
                user_agent=request.headers.get("User-Agent", ""),
                head=head,
            )
            await trust.admit(upstream, repository, manifest.digest, manifest)
    await links.link_manifest(upstream.name, repository, manifest)
    headers = {
        "Docker-Content-Digest": manifest.digest,
        "Content-Type": manifest.media_type,
        "X-Cache": manifest.cache,
        "ETag": f'"{manifest.digest}"',
    }
    if manifest.data is not None:
        return web.Response(body=manifest.data, headers=headers)
    # A HEAD answered from what upstream's HEAD said: no bytes here, only their length.
    resp = web.StreamResponse(headers=headers)
    resp.content_length = manifest.size
    return resp


async def handle_referrers(request: web.Request) -> web.StreamResponse:
    """``/v2/<name>/referrers/<digest>``: an OCI index of the manifests naming the digest."""
    request["route"] = "referrers"
    if request.method not in READ_METHODS:
        raise Unsupported({"method": request.method})
    name = request.match_info["name"]
    check_name(name)
    digest = check_digest(request.match_info["digest"])
    upstream, repository = await route_for(request, name)
    artifact_type = request.query.get("artifactType", "")[:255] or None
    answer = await request.app[REFERRERS].get(upstream, repository, digest, artifact_type)
    headers = {"Content-Type": OCI_INDEX, "X-Cache": answer.cache}
    if answer.filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=answer.body, headers=headers)


async def serve_tags(request: web.Request, upstream: Upstream, repository: str) -> web.Response:
    query = {}
    for key in ("n", "last"):
        if key in request.query:
            value = request.query[key]
            if key == "n" and (not value.isdigit() or len(value) > 9):
                raise ManifestInvalid({"n": value[:50]}, message="n must be a number")
            query[key] = value
    body, headers, cache = await request.app[MANIFESTS].tags_list(upstream, repository, query)
    return web.Response(
        body=body, content_type="application/json", headers={**headers, "X-Cache": cache}
    )


async def handle_inspect(request: web.Request) -> web.Response:
    """``GET /_regproxy/inspect?image=NAME[:TAG]``: the platforms served for a tag, with sources."""
    image = request.query.get("image", "")
    ref = parse_image(image)
    upstream, repository = await route_for(request, ref.repository)
    manifest, entries = await request.app[PLATFORMS].describe(
        upstream, repository, ref.tag or "latest"
    )
    trust = request.app[TRUST]
    platforms = [e.describe() for e in entries]
    if trust.enabled:
        verdicts = await trust.describe_all(upstream, repository, ref.tag or "latest", manifest)
        for described, verdict in zip(platforms, verdicts, strict=False):
            described["trust"] = verdict
    return web.json_response(
        {
            "image": f"{upstream.name}/{repository}:{ref.tag or 'latest'}",
            "digest": manifest.digest,
            "media_type": manifest.media_type,
            "platforms": platforms,
        }
    )


async def handle_policy_check(request: web.Request) -> web.Response:
    """``GET /_regproxy/policy/check?image=NAME[:TAG|@DIGEST]``: what a pull would get under the
    trust policy (manifests and signatures are fetched and cached as a pull would; no layer)."""
    ref = parse_image(request.query.get("image", ""))
    upstream, repository = await route_for(request, ref.repository)
    platforms, trust = request.app[PLATFORMS], request.app[TRUST]
    reference = ref.reference
    if is_digest(reference):
        manifest = await platforms.child_manifest(upstream, repository, reference, head=False)
    else:
        manifest = await platforms.by_tag(upstream, repository, reference, head=False)
    entry = trust.entry_for(upstream.name, repository)
    result: dict[str, object] = {
        "image": f"{upstream.name}/{repository}{'@' if is_digest(reference) else ':'}{reference}",
        "digest": manifest.digest,
        "policy_entry": entry.number if entry else None,
        "allowed": True,
        "message": None,
    }
    try:
        await trust.admit(upstream, repository, reference, manifest)
    except Denied as exc:
        result["allowed"], result["message"] = False, exc.message
    described = []
    if manifest.media_type in INDEX_TYPES and manifest.data is not None:
        described = [item.describe() for item in index_entries(manifest)]
        if trust.enabled:
            verdicts = await trust.describe_all(upstream, repository, reference, manifest)
            for one, verdict in zip(described, verdicts, strict=False):
                one["trust"] = verdict
    result["platforms"] = described
    return web.json_response(result)


async def handle_healthz(request: web.Request) -> web.Response:
    request["route"] = "healthz"
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Ready when the store takes writes, is reachable and is not full, and the process is
    not shutting down."""
    request["route"] = "readyz"
    problems = await request.app[STORAGE].check_ready()
    if request.app[DRAINING].is_set():
        problems.insert(0, "draining: shutting down")
    cache = request.app[CACHE]
    if cache.full:
        problems.append(f"cache full: {cache.used} of {cache.limit} bytes in use")
    status = 503 if problems else 200
    return web.json_response(
        {"status": "unready" if problems else "ready", "problems": problems}, status=status
    )


async def handle_metrics(request: web.Request) -> web.Response:
    request["route"] = "metrics"
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_peer_blob(request: web.Request) -> web.StreamResponse:
    """Another replica streams a blob this one is downloading (or holds locally), from the
    byte it asks for (``Range: bytes=N-``: it has the bytes before, from an owner that died).

    404 when this replica has neither: the asking replica then knows its owner is gone.
    """
    request["route"] = "peer"
    blobs = request.app[BLOBS]
    token = blobs.fetcher.peer_token
    offered = request.headers.get(PEER_HEADER, "")
    if not token or not secrets.compare_digest(offered.encode(), token.encode()):
        raise Denied(message="peer requests need the fleet's secret")
    digest = request.match_info["digest"]
    check_digest(digest)
    try:
        wanted = request.http_range
    except ValueError:
        raise RangeInvalid({"range": request.headers.get("Range", "")[:100]}) from None
    start = wanted.start or 0
    if wanted.stop is not None or start < 0:
        raise RangeInvalid({"range": request.headers.get("Range", "")[:100]})
    dl = blobs.downloads.get(digest)
    if dl is not None and not dl.done:
        try:
            await dl.started
        except Exception:
            raise BlobUnknown({"digest": digest}) from None
        if not start:
            return await stream_download(request, dl, digest, blobs.store)
        if dl.size is not None and start < dl.size:
            return await stream_download(request, dl, digest, blobs.store, start=start)
        raise RangeInvalid({"range": request.headers.get("Range", "")[:100]})
    local = blobs.store.local_blob(digest)
    if local is None:
        # with workers, a replica's request lands on any worker of this host: pass on the
        # stream of the one downloading it
        owner = getattr(blobs.coordinator, "local_owner", None)
        url = None if owner is None else await owner(digest)
        if url and url != getattr(blobs.coordinator, "local_url", None):
            return await _relay_peer(request, url, digest, token, start)
        raise BlobUnknown({"digest": digest})
    return BlobFileResponse(local.path, digest=digest, headers={"Docker-Content-Digest": digest})


async def _relay_peer(
    request: web.Request, url: str, digest: str, token: str, start: int
) -> web.StreamResponse:
    timeout = aiohttp.ClientTimeout(sock_connect=5, sock_read=60)
    headers = {PEER_HEADER: token}
    if start:
        headers["Range"] = f"bytes={start}-"
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{url}{PEER_PATH}{digest}", headers=headers) as resp,
    ):
        if resp.status not in (200, 206):
            raise BlobUnknown({"digest": digest})
        out = web.StreamResponse(
            status=resp.status,
            headers={"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"},
        )
        if "Content-Range" in resp.headers:
            out.headers["Content-Range"] = resp.headers["Content-Range"]
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def handle_other(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


def add_routes(app: web.Application) -> None:
    """The registry API and the process's own endpoints; the catch-all is added last by the
    composition root, after every feature's routes."""
    app.router.add_route("*", "/v2/", handle_base)
    app.router.add_route("*", "/v2", handle_base)
    app.router.add_route("*", "/v2/{name:.+}/referrers/{digest}", handle_referrers)
    app.router.add_route("*", "/v2/{path:.+}", handle_v2)
    app.router.add_get("/healthz", handle_healthz, allow_head=True)
    app.router.add_get("/readyz", handle_readyz, allow_head=True)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/_regproxy/inspect", handle_inspect)
    app.router.add_get("/_regproxy/policy/check", handle_policy_check)
    app.router.add_route("*", "/token", handle_token)
    app.router.add_get("/_regproxy/peer/blobs/{digest}", handle_peer_blob)
