"""A throwaway certificate authority for TLS servers on 127.0.0.1 (``trustme``).

::

    proxy (env SSL_CERT_FILE=ca.pem) --https--> Front(ssl_context=...) --http--> registry

The proxy's upstream client uses the default verify paths, which OpenSSL takes from
``SSL_CERT_FILE``: pointing that at ``ca_file`` makes it trust exactly this CA, no verification
switched off. ``server_context()`` gives each server its own context for a certificate valid
for ``127.0.0.1`` and ``localhost``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class LocalCA:
    """The CA (``ca_file``: its PEM certificate) and one server certificate issued by it."""

    ca: trustme.CA
    server_cert: trustme.LeafCert
    ca_file: Path

    def server_context(self) -> ssl.SSLContext:
        """A fresh server-side context presenting the 127.0.0.1 certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side context trusting this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def env(self) -> dict[str, str]:
        """Environment for a process that must trust this CA (``ProxyProcess(env=...)``)."""
        return {"SSL_CERT_FILE": str(self.ca_file)}


def make_ca(directory: Path) -> LocalCA:
    """A new CA with its PEM in *directory* and a server certificate for 127.0.0.1."""
    ca = trustme.CA()
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return LocalCA(ca, ca.issue_cert("127.0.0.1", "localhost"), ca_file)
