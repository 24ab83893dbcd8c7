"""What storage raises.

Hierarchy::

    StorageError          the backend failed (I/O error, disk full, object store unreachable,
                          access denied); never reported as "not there"
    DigestMismatch        bytes written do not match the digest or size they were committed as

Foreign exceptions (``OSError``, ``botocore``/``aiohttp`` errors) are translated where they are
raised, in the backend, and re-raised ``from`` the original.
"""

from __future__ import annotations


class StorageError(Exception):
    """The storage failed: I/O error, disk full, permission denied, object store away."""

    def __init__(
        self, message: str, *, path: str = "", op: str = "", unreachable: bool = False
    ) -> None:
        super().__init__(f"{message}: {path}" if path else message)
        self.path = path
        #: What was being done ("read", "write", "delete", "list"), for metrics.
        self.op = op
        #: The store could not be reached (object store down, 5xx): a pull may still be relayed
        #: from upstream. A broken local disk is not "unreachable": it is answered with 503.
        self.unreachable = unreachable
        self.errno: int | None = None


class DigestMismatch(Exception):
    """Content did not hash to, or was not as long as, what it was committed as."""
