"""Errors, and the one place that turns them into registry responses.

Hierarchy::

    RegproxyError
    ├── RegistryError                 an answer to the client in the spec's error envelope
    │   ├── NameInvalid               400 NAME_INVALID
    │   ├── ManifestInvalid           400 MANIFEST_INVALID (also a malformed tag in an image name)
    │   ├── DigestInvalid             400 DIGEST_INVALID
    │   ├── RangeInvalid              416 RANGE_INVALID
    │   ├── Unauthorized              401 UNAUTHORIZED
    │   ├── Denied                    403 DENIED
    │   ├── NameUnknown               404 NAME_UNKNOWN
    │   ├── ManifestUnknown           404 MANIFEST_UNKNOWN
    │   ├── BlobUnknown               404 BLOB_UNKNOWN
    │   ├── Unsupported               405 UNSUPPORTED
    │   ├── TooManyRequests           429 TOOMANYREQUESTS
    │   ├── Unavailable               503 UNAVAILABLE
    │   └── Unknown                   500 UNKNOWN
    ├── UpstreamError                 the upstream failed us (mapped to a RegistryError at the edge)
    │   ├── UpstreamUnreachable       refused, reset, timed out, DNS
    │   ├── UpstreamStatus            an HTTP status we did not expect (carries it)
    │   ├── UpstreamRateLimited       429, with Retry-After
    │   └── UpstreamContentError      bytes that do not match their digest or size
    StorageError (storage.errors)     the store failed (disk, object store); never a miss

Foreign exceptions (``aiohttp.ClientError``, ``OSError``) are translated where they are raised, in
``proxy.fetch.upstream`` and ``storage``, and re-raised ``from`` the original.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from aiohttp import web

from storage.errors import StorageError as StorageError  # raised by storage, 503 here

log = logging.getLogger(__name__)


class RegproxyError(Exception):
    """Base of everything regproxy raises on purpose."""


# -- answers to the client ---------------------------------------------------------------------


class RegistryError(RegproxyError):
    """An error the client sees as ``{"errors":[{"code","message","detail"}]}``."""

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500
    message: ClassVar[str] = "unknown error"

    def __init__(
        self,
        detail: Any = None,
        *,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.detail = detail
        self.headers = headers or {}
        if message is not None:
            self.message = message  # type: ignore[misc]  # instance override of the class default
        super().__init__(f"{self.code}: {self.message}")

    def body(self) -> bytes:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode()

    def response(self) -> web.Response:
        # aiohttp sends no body for HEAD itself, keeping Content-Length.
        return web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=self.headers,
        )


class NameInvalid(RegistryError):
    code, status, message = "NAME_INVALID", 400, "invalid repository name"


class ManifestInvalid(RegistryError):
    code, status, message = "MANIFEST_INVALID", 400, "manifest invalid"


class DigestInvalid(RegistryError):
    code, status, message = "DIGEST_INVALID", 400, "provided digest did not match uploaded content"


class RangeInvalid(RegistryError):
    code, status, message = "RANGE_INVALID", 416, "invalid content range"


class Unauthorized(RegistryError):
    code, status, message = "UNAUTHORIZED", 401, "authentication required"


class Denied(RegistryError):
    code, status, message = "DENIED", 403, "requested access to the resource is denied"


class NameUnknown(RegistryError):
    code, status, message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class ManifestUnknown(RegistryError):
    code, status, message = "MANIFEST_UNKNOWN", 404, "manifest unknown"


class BlobUnknown(RegistryError):
    code, status, message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class NotFound(RegistryError):
    code, status, message = "NOT_FOUND", 404, "not found"


class Unsupported(RegistryError):
    code, status, message = (
        "UNSUPPORTED",
        405,
        "the operation is unsupported: this is a read-only proxy",
    )


class TooManyRequests(RegistryError):
    code, status, message = "TOOMANYREQUESTS", 429, "too many requests"


class Unavailable(RegistryError):
    code, status, message = "UNAVAILABLE", 503, "service unavailable"


class Unknown(RegistryError):
    pass


# -- failures of what we depend on -------------------------------------------------------------


class UpstreamError(RegproxyError):
    """The upstream registry could not give us what we asked for."""

    def __init__(self, message: str, *, upstream: str, url: str = "") -> None:
        super().__init__(message)
        self.upstream = upstream
        self.url = url


class UpstreamUnreachable(UpstreamError):
    """Connection refused or reset, DNS failure, or a timeout."""


class UpstreamStatus(UpstreamError):
    """An HTTP status the caller did not expect; ``code`` holds the registry error code if any."""

    def __init__(
        self, message: str, *, upstream: str, url: str = "", status: int, code: str | None = None
    ) -> None:
        super().__init__(message, upstream=upstream, url=url)
        self.status = status
        self.code = code


class UpstreamRateLimited(UpstreamStatus):
    """429 from upstream; ``retry_after`` in seconds when it said."""

    def __init__(
        self, message: str, *, upstream: str, url: str = "", retry_after: float | None
    ) -> None:
        super().__init__(message, upstream=upstream, url=url, status=429, code="TOOMANYREQUESTS")
        self.retry_after = retry_after


class UpstreamContentError(UpstreamError):
    """Bytes from upstream that do not match their digest, size or media type."""


def to_registry_error(exc: UpstreamError, *, not_found: type[RegistryError]) -> RegistryError:
    """Map an upstream failure with nothing cached to what the client should see."""
    if isinstance(exc, UpstreamRateLimited):
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return TooManyRequests(
            {"upstream": exc.upstream}, message="upstream rate limit reached", headers=headers
        )
    if isinstance(exc, UpstreamStatus):
        if exc.status == 404:
            if exc.code == "NAME_UNKNOWN":
                return NameUnknown({"upstream": exc.upstream})
            return not_found({"upstream": exc.upstream})
        if exc.status in (401, 403):
            # Docker Hub answers 401 for repositories that do not exist as well as private ones.
            return NameUnknown(
                {"upstream": exc.upstream},
                message="repository not found upstream, or access to it was denied",
            )
        if exc.status in (400,):
            return not_found({"upstream": exc.upstream, "status": exc.status})
    if isinstance(exc, UpstreamContentError):
        return Unavailable(
            {"upstream": exc.upstream}, message="upstream sent content that failed verification"
        )
    return Unavailable({"upstream": exc.upstream}, message="upstream registry unavailable")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as the registry's JSON envelope; unknown errors become UNKNOWN/500."""
    try:
        return await handler(request)
    except RegistryError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status == 404:
            return NotFound(message="no such route").response()
        if exc.status == 405:
            return Unsupported().response()
        if exc.status < 400:
            raise
        return Unknown(message=exc.reason).response()
    except StorageError as exc:
        log.warning("request failed on storage path=%s error=%s", request.path, exc)
        return Unavailable(message="local storage error").response()
    except ConnectionResetError:
        raise  # the client went away: nothing to answer, nothing to log as an error
    except UpstreamError as exc:
        return to_registry_error(exc, not_found=NotFound).response()
    except Exception:
        log.exception("unhandled error method=%s path=%s", request.method, request.path)
        return Unknown().response()
