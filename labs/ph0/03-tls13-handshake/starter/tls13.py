"""TLS 1.3 from the ground up: a private CA, a server certificate, and two contexts.

Generate the certificates with the `cryptography` package (x509.CertificateBuilder),
and build the contexts with the standard ssl module.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path       # PEM: the CA certificate clients trust
    server_cert: Path   # PEM: the server's certificate, issued by the CA
    server_key: Path    # PEM: the server's private key (unencrypted, mode 0600)


def create_pki(directory: Path, hostname: str) -> Pki:
    """Create a CA and a server certificate for ``hostname`` signed by it, as PEM files
    in ``directory``: ca.pem, server.pem, server.key."""
    # TODO: a self-signed CA (BasicConstraints ca=True, KeyUsage key_cert_sign), then a
    #       server certificate with SubjectAlternativeName DNSName(hostname), signed by it.
    raise NotImplementedError("create_pki: generate a CA and a server certificate")


def server_context(pki: Pki) -> ssl.SSLContext:
    """A server context that speaks TLS 1.3 only and presents the server certificate."""
    raise NotImplementedError("server_context: TLS 1.3-only server context")


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts only ``ca_file``, checks the hostname, and speaks
    TLS 1.3 only."""
    raise NotImplementedError("client_context: TLS 1.3-only client trusting ca_file")
