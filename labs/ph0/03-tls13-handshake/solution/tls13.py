"""TLS 1.3 from the ground up: a private CA, a server certificate, and two contexts.

In a TLS 1.3 handshake the client sends its key share in the ClientHello; the server
answers with its own (ECDHE, here X25519), so both derive the session keys from
ephemeral secrets that are never stored: recording the traffic and stealing the
server's private key later does not decrypt it (forward secrecy). The server's
certificate only *authenticates* the handshake (CertificateVerify signs the transcript),
and the client accepts it when it chains to a CA it trusts and names the host it dialled.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=1)   # lab certificates need not outlive the lab


@dataclass(frozen=True)
class Pki:
    ca_cert: Path       # PEM: the CA certificate clients trust
    server_cert: Path   # PEM: the server's certificate, issued by the CA
    server_key: Path    # PEM: the server's private key (unencrypted, mode 0600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    # A private key readable by everyone is a published key, even for a moment: written
    # first and chmod-ed after, it is 0644 in between (0666 under umask 0), and whoever
    # opened it then keeps reading. So the file is born 0600, as ssh-keygen and openssl
    # genpkey make theirs; O_EXCL (after removing an old key) also refuses a symlink.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))


def create_pki(directory: Path, hostname: str) -> Pki:
    """Create a CA and a server certificate for ``hostname`` signed by it, as PEM files
    in ``directory``: ca.pem, server.pem, server.key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(minutes=5)  # tolerate small clock skew

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"Lab CA for {hostname}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)  # self-signed: the CA vouches for itself; trust is by config
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + VALIDITY)
        # Hostname checks read the SAN, never the common name.
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())  # the CA's signature is what makes it trusted
    )

    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.server_key, server_key)
    return pki


def server_context(pki: Pki) -> ssl.SSLContext:
    """A server context that speaks TLS 1.3 only and presents the server certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # refuse TLS 1.2 and older outright
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    return ctx


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts only ``ca_file``, checks the hostname, and speaks
    TLS 1.3 only."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    # create_default_context already sets verify_mode=CERT_REQUIRED, check_hostname=True.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # The host is matched against the SAN's DNS names only: OpenSSL falls back to the
    # subject's common name when there is none, and Python leaves that on by default.
    ctx.hostname_checks_common_name = False
    return ctx
