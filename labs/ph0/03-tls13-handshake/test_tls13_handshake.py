"""Verification for ph0.3: the learner's CA, server certificate and TLS 1.3-only contexts,
checked by inspecting the certificates with `cryptography` and by real TLS handshakes
over loopback TCP: the learner's server against the learner's client, a TLS 1.2-only
client, OpenSSL's own s_client, and the learner's client against servers it must refuse.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import ssl
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import watchfiles
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from labrunner.testing import TlsOnce, file_bytes, local_timezone, serve_tls_once, tls_exchange

HOSTNAME = "api.lab.test"
TLS13_AEAD_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                     "TLS_CHACHA20_POLY1305_SHA256"}
WAIT = 5.0


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def tls13(learner: Any) -> Any:
    return learner.load("tls13")


def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a learner function; NotImplementedError and crashes become clear failures."""
    try:
        return fn(*args)
    except NotImplementedError as exc:
        problem = f"{what} is not implemented yet: {exc}"
    except Exception as exc:  # noqa: BLE001 - the learner's error, reported plainly
        problem = f"{what} raised {type(exc).__name__}: {exc}"
    pytest.fail(problem, pytrace=False)  # outside the except: no chained traceback


class Subject:
    """The learner's PKI and contexts, built on first use inside the test (not in a
    fixture) so that a missing piece is reported as that test's failure.

    The contexts live where the learner's code runs (a process of its own when grading):
    servers and clients with them are started there (labrunner.testing.serve_tls_once,
    tls_exchange), and the files the learner writes are read through that process too
    (a private key is readable by its owner only)."""

    def __init__(self, tls13: Any, learner: Any, tmp_path: Path) -> None:
        self.tls13 = tls13
        self.learner = learner
        self.tmp_path = tmp_path
        self.folder = learner.tmp_folder(learner_writes=True)
        self._pki: Any = None
        self._copies = 0

    def pki(self, name: str = "pki") -> Any:
        if name != "pki":  # a second, independent CA
            return _call("create_pki()", self.tls13.create_pki, self.folder / name, HOSTNAME)
        if self._pki is None:
            self._pki = _call("create_pki()", self.tls13.create_pki, self.folder / name,
                              HOSTNAME)
        return self._pki

    def read(self, path: Any, what: str) -> bytes:
        try:
            return self.learner.run_helper(file_bytes, str(path))  # type: ignore[no-any-return]
        except OSError as exc:
            problem = f"{what} ({path}) cannot be read: {exc}"
        pytest.fail(problem, pytrace=False)

    def server_ctx(self, pki: Any = None) -> Any:
        return _call("server_context()", self.tls13.server_context, pki or self.pki())

    def client_ctx(self) -> Any:
        ctx = _call("client_context()", self.tls13.client_context, self.pki().ca_cert)
        try:
            side = int(ctx.protocol)
            verify, hostname = int(ctx.verify_mode), bool(ctx.check_hostname)
        except Exception:  # noqa: BLE001 - not an SSLContext: the tests below say so
            return ctx
        if side == int(ssl.PROTOCOL_TLS_SERVER):
            pytest.fail(
                "client_context() returned a SERVER-side context (PROTOCOL_TLS_SERVER): it "
                "cannot open a client connection, and it verifies no certificate and no "
                "hostname\nssl.Purpose.CLIENT_AUTH is the purpose of a server that checks "
                "its clients; a client that checks its server wants "
                "create_default_context(ssl.Purpose.SERVER_AUTH, cafile=...)", pytrace=False)
        if verify != int(ssl.CERT_REQUIRED) or not hostname:
            pytest.fail(
                f"client_context() returned a context with verify_mode "
                f"{ssl.VerifyMode(verify).name} and check_hostname={hostname}: it would accept "
                "any certificate, or one for another host - keep CERT_REQUIRED and "
                "check_hostname=True", pytrace=False)
        return ctx

    def local_copy(self, path: Any, what: str) -> Path:
        """A copy of one of the learner's files the test's own contexts can load."""
        self._copies += 1
        copy = self.tmp_path / f"copy{self._copies}-{Path(path).name}"
        copy.write_bytes(self.read(path, what))
        return copy


@pytest.fixture
def subject(tls13: Any, learner: Any, tmp_path: Path) -> Subject:
    return Subject(tls13, learner, tmp_path)


# ---------------------------------------------------------------------------- handshakes


@dataclass
class Handshake:
    version: str | None = None      # what the client negotiated (None: it failed)
    cipher: str | None = None
    client_error: str | None = None
    server_error: str | None = None
    reply: bytes = b""

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.version is not None


@pytest.fixture
def serve(learner: Any) -> Iterator[Callable[[Any], TlsOnce]]:
    """Start one-connection servers; closed before the learner's process ends."""
    servers: list[TlsOnce] = []

    def start(ctx: Any) -> TlsOnce:
        servers.append(serve_tls_once(ctx, WAIT))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def handshake(server: TlsOnce, client_ctx: Any, server_hostname: str = HOSTNAME) -> Handshake:
    """Connect with ``client_ctx``, exchange ping/pong, and report what each side saw."""
    seen = tls_exchange(client_ctx, server.port, server_hostname, b"ping", WAIT)
    return Handshake(version=seen["version"], cipher=seen["cipher"],
                     client_error=seen["error"], server_error=server.wait(),
                     reply=seen["reply"])


def tls12_only_client(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def own_server(subject: Subject, pki: Any = None, *, tls12_only: bool = False) -> ssl.SSLContext:
    """The test's own server context with the learner's certificate and key: TLS 1.3 by
    default (a server the learner's client must refuse for another reason), or TLS 1.2
    only. Its side of the handshake is observed here, out of the learner's reach."""
    pki = pki or subject.pki()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if tls12_only:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(subject.local_copy(pki.server_cert, "pki.server_cert"),
                        subject.local_copy(pki.server_key, "pki.server_key"))
    return ctx


def _load_cert(subject: Subject, path: Path, what: str) -> x509.Certificate:
    data = subject.read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        problem = f"{what} ({path}) is not a PEM certificate: {exc}"
    pytest.fail(problem, pytrace=False)


# ---------------------------------------------------------------------------- certificates


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    """The value of one extension, or None when the certificate lacks it."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _usages(usage: x509.KeyUsage) -> str:
    names = ("digital_signature", "content_commitment", "key_encipherment",
             "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign")
    return ", ".join(n for n in names if getattr(usage, n)) or "nothing"


def test_certificates_form_a_chain(subject: Subject) -> None:
    pki = subject.pki()
    ca = _load_cert(subject, pki.ca_cert, "pki.ca_cert")
    server = _load_cert(subject, pki.server_cert, "pki.server_cert")
    ca_basic = _extension(ca, x509.BasicConstraints)
    assert ca_basic is not None and ca_basic.ca, (
        "the CA certificate lacks BasicConstraints(ca=True)\nWithout it, verifiers refuse "
        "to accept anything it signed: only a CA certificate may issue certificates.")
    ca_basic_ext = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_basic_ext.critical, (
        "the CA certificate's BasicConstraints(ca=True) is not marked critical, expected "
        "critical=True\nRFC 5280 4.2.1.9: a CA certificate MUST carry BasicConstraints and "
        "MUST mark it critical, so that a verifier that cannot read it refuses the "
        "certificate rather than ignore that it is a CA; strict verifiers (OpenSSL with "
        "X509_STRICT, Python 3.13's default context) refuse every certificate it signed. "
        "add_extension(x509.BasicConstraints(ca=True, path_length=...), critical=True).")
    assert ca.issuer == ca.subject, "the CA certificate must be self-signed (issuer == subject)"
    ca_usage = _extension(ca, x509.KeyUsage)
    assert ca_usage is None or ca_usage.key_cert_sign, (
        "the CA certificate's KeyUsage does not allow key_cert_sign (it allows "
        f"{_usages(ca_usage)})\nVerifiers refuse a certificate signed by a CA whose KeyUsage "
        "lacks keyCertSign: give the CA KeyUsage(key_cert_sign=True, crl_sign=True, ...), "
        "not the server's digital_signature.")
    try:
        server.verify_directly_issued_by(ca)
        signed = ""
    except (ValueError, TypeError) as exc:
        signed = str(exc)
    assert not signed, (
        f"the server certificate was not signed by the CA: {signed}\nSign it with the CA's "
        "private key and set its issuer to the CA's subject.")
    san = _extension(server, x509.SubjectAlternativeName)
    names = san.get_values_for_type(x509.DNSName) if san is not None else []
    assert HOSTNAME in names, (
        f"the server certificate's SubjectAlternativeName lists {names}, expected "
        f"{HOSTNAME!r}\nTLS clients match the host they dialled against the SAN DNS names; "
        "browsers ignore the common name altogether.")
    server_basic = _extension(server, x509.BasicConstraints)
    assert server_basic is None or not server_basic.ca, (
        "the server certificate is itself a CA: a leaked server key could then sign "
        "certificates for any site")
    now = dt.datetime.now(dt.UTC)
    assert server.not_valid_before_utc <= now < server.not_valid_after_utc, (
        f"the server certificate is not valid now ({server.not_valid_before_utc} .. "
        f"{server.not_valid_after_utc})")
    key = serialization.load_pem_private_key(subject.read(pki.server_key, "pki.server_key"), None)
    assert key.public_key() == server.public_key(), (
        "pki.server_key does not belong to pki.server_cert")


def test_server_certificate_may_sign_the_handshake(subject: Subject) -> None:
    """In TLS 1.3 the server's key only signs (CertificateVerify); the key exchange is
    ephemeral ECDHE. RFC 8446 4.4.2.2: if KeyUsage is present, digitalSignature MUST be
    set. OpenSSL's client still accepts keyEncipherment/keyAgreement, stricter ones do not."""
    pki = subject.pki()
    server = _load_cert(subject, pki.server_cert, "pki.server_cert")
    usage = _extension(server, x509.KeyUsage)
    assert usage is None or usage.digital_signature, (
        f"the server certificate's KeyUsage allows {_usages(usage)}, expected "
        "digital_signature\nIn TLS 1.3 the server key never encrypts or agrees a key (the "
        "exchange is ephemeral ECDHE): it signs the handshake transcript (CertificateVerify). "
        "RFC 8446 4.4.2.2: when KeyUsage is present, digitalSignature MUST be set; strict "
        "clients (NSS/Firefox, webpki) refuse this certificate.")
    assert usage is None or not (usage.key_cert_sign or usage.crl_sign), (
        f"the server certificate's KeyUsage allows {_usages(usage)}, expected "
        "digital_signature and no key_cert_sign or crl_sign\nA server's key signs handshakes, "
        "not certificates or revocation lists: those are the CA's powers (the CA's KeyUsage, "
        "not the server's). RFC 5280 4.2.1.3: keyCertSign only with BasicConstraints "
        "cA=true; strict verifiers (OpenSSL with X509_STRICT, Python 3.13's default "
        "context) refuse this certificate. Give the server KeyUsage(digital_signature=True) "
        "and everything else False.")
    purposes = _extension(server, x509.ExtendedKeyUsage)
    assert purposes is None or x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in purposes, (
        f"the server certificate's ExtendedKeyUsage lists "
        f"{[oid._name for oid in purposes]}, expected serverAuth\nA client checks that the "
        "certificate was issued for TLS server authentication.")


# POSIX zones (no tzdata needed; the sign is west-positive): UTC+14:00 (Kiribati) and
# UTC-12:00 (Baker Island), the farthest a machine's local clock can be from UTC.
ZONES = (("LAB-14", "UTC+14:00"), ("LAB+12", "UTC-12:00"))


def test_certificates_are_valid_now_in_any_local_zone(subject: Subject) -> None:
    """A certificate's validity is in UTC. create_pki() run on a machine whose local zone is
    not UTC must still issue certificates valid now: a naive datetime.now() (local wall time)
    that cryptography reads as UTC starts them hours in the future (east of UTC) or ends
    them hours early (west)."""
    for spec, zone in ZONES:
        previous = subject.learner.run_helper(local_timezone, spec)
        try:
            pki = _call(f"create_pki() in local time zone {zone}", subject.tls13.create_pki,
                        subject.folder / f"zone{spec[3:]}", HOSTNAME)
        finally:
            subject.learner.run_helper(local_timezone, previous)
        now = dt.datetime.now(dt.UTC)
        for what, path in (("CA", pki.ca_cert), ("server", pki.server_cert)):
            cert = _load_cert(subject, path, f"the {what} certificate made in {zone}")
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            off = (start - now if start > now else end - now).total_seconds() / 3600
            assert start <= now < end, (
                f"create_pki() run with the local time zone {zone} issued a {what} "
                f"certificate valid from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC; "
                f"it is now {now:%Y-%m-%d %H:%M} UTC, so it is "
                + (f"not valid for another {off:.1f} h" if start > now else
                   f"already expired ({-off:.1f} h ago)")
                + ": local time was written where UTC is meant\nA certificate's validity "
                "is UTC; datetime.now() without a zone is the machine's local wall time, "
                "and cryptography reads a naive datetime as UTC. On a machine east of UTC "
                "every client refuses the certificate as not yet valid. Use "
                "datetime.now(datetime.UTC).")


SERIAL_BITS = 40  # below this, a serial cannot hold 64 random bits (a random 64-bit one
#                  is this short once in 2**24 draws)


def test_serial_numbers_are_unique_and_unpredictable(subject: Subject) -> None:
    """RFC 5280 4.1.2.2: a serial is unique among the certificates one CA issues (the CA's
    own self-issued certificate included), positive, at most 20 octets. CA/Browser Forum
    Baseline Requirements 7.1: it carries at least 64 bits from a CSPRNG, since the 2008
    rogue CA forged a certificate by predicting the serial of the next one a CA signed."""
    pki = subject.pki()
    ca = _load_cert(subject, pki.ca_cert, "pki.ca_cert")
    server = _load_cert(subject, pki.server_cert, "pki.server_cert")
    assert ca.serial_number != server.serial_number, (
        f"the CA certificate and the server certificate have the same issuer "
        f"({ca.issuer.rfc4514_string()}) and the same serial number {server.serial_number}; "
        "expected every certificate a CA issues (its own self-signed one too) to have a "
        "serial of its own (RFC 5280 4.1.2.2)\nIssuer and serial name one certificate: "
        "revocation lists and OCSP revoke by serial, and Firefox refuses a reused pair "
        "(SEC_ERROR_REUSED_ISSUER_AND_SERIAL). Use x509.random_serial_number() for each.")
    for what, cert in (("CA", ca), ("server", server)):
        serial = cert.serial_number
        assert 0 < serial < 2 ** 159, (
            f"the {what} certificate's serial number is {serial}, expected a positive "
            "number of at most 20 octets (RFC 5280 4.1.2.2)")
        assert serial.bit_length() >= SERIAL_BITS, (
            f"the {what} certificate's serial number is {serial} ({serial.bit_length()} "
            f"bits): a counter, a clock or a constant, not a random number; expected at "
            f"least 64 random bits (a random serial this short comes once in 2**24)\n"
            "A predictable serial lets whoever can get a certificate signed know the next "
            "one's exact contents in advance (the 2008 MD5 rogue CA attack); the CA/Browser "
            "Forum requires 64 bits from a CSPRNG. x509.random_serial_number() gives 159.")
    again = _load_cert(subject, subject.pki("again").server_cert, "the second pki.server_cert")
    assert again.serial_number != server.serial_number, (
        f"two calls of create_pki() issued server certificates with the same serial number "
        f"{server.serial_number}; expected a fresh random serial each time\nA serial "
        "derived from a counter, the clock or a constant repeats and is predictable.")


def test_each_pki_has_key_pairs_of_its_own(subject: Subject) -> None:
    """Two create_pki() calls are two PKIs (two hosts, a rotation): each CA and each server
    gets a key pair made for it. A key made once (at import, or cached) and reused by every
    call ties them together."""
    first, second = subject.pki(), subject.pki("again")
    why = {"CA": "a client that trusts one CA certificate also accepts the server "
                 "certificates the other one signed (same CA name, same key)",
           "server": "one leaked key exposes every PKI's server, and a rotation keeps the "
                     "key it was meant to replace"}
    for what, attr in (("CA", "ca_cert"), ("server", "server_cert")):
        one = _load_cert(subject, getattr(first, attr), f"pki.{attr}").public_key()
        two = _load_cert(subject, getattr(second, attr), f"the second pki.{attr}").public_key()
        assert one != two, (
            f"two calls of create_pki() made {what} certificates with one and the same key "
            f"pair; expected a new {what} key pair for each PKI\nA key generated once (at "
            f"import, or cached) and reused by every call: {why[what]}. Generate each key "
            "inside create_pki().")


# ---------------------------------------------------------------------------- handshakes


def _asked_for_a_client_certificate(result: Handshake) -> bool:
    """The server refused a client that had no certificate to show (mutual TLS asked)."""
    said = f"{result.server_error} {result.client_error}".upper()
    return "PEER_DID_NOT_RETURN_A_CERTIFICATE" in said or "CERTIFICATE_REQUIRED" in said \
        or "CERTIFICATE REQUIRED" in said


def test_handshake_is_tls13_with_an_aead_suite(serve: Any, subject: Subject) -> None:
    result = handshake(serve(subject.server_ctx()), subject.client_ctx())
    assert result.ok or not _asked_for_a_client_certificate(result), (
        "your server refused a client that showed no certificate of its own (server side: "
        f"{result.server_error}), expected the handshake to complete\nserver_context() "
        "demands client certificates (verify_mode = CERT_REQUIRED on the server side): "
        "that is mutual TLS, which no browser or ordinary client offers. A server "
        "authenticates itself with its certificate; leave the server context's verify_mode "
        "at CERT_NONE (ssl.PROTOCOL_TLS_SERVER's default).")
    assert result.ok, (
        f"the handshake between your server and your client failed: {result.client_error}"
        f"\n(server side: {result.server_error}). Check that the server certificate names "
        f"{HOSTNAME} in its SubjectAlternativeName and is signed by the CA the client trusts.")
    assert result.version == "TLSv1.3", (
        f"negotiated {result.version}, expected TLSv1.3")
    assert result.cipher in TLS13_AEAD_SUITES, (
        f"negotiated cipher suite {result.cipher}, expected a TLS 1.3 AEAD suite "
        f"({', '.join(sorted(TLS13_AEAD_SUITES))})")
    assert result.reply == b"pong:ping", (
        f"application data did not round-trip over the TLS connection: got {result.reply!r}")


def test_key_exchange_is_ephemeral(serve: Any, subject: Subject) -> None:
    """OpenSSL's own client reports the key exchange: an ephemeral (EC)DHE share."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed for this check (apt-get install openssl)"
    pki = subject.pki()
    server = serve(subject.server_ctx())
    done = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{server.port}", "-servername", HOSTNAME,
         "-CAfile", str(subject.local_copy(pki.ca_cert, "pki.ca_cert")), "-verify_return_error",
         "-brief"],
        input=b"ping", capture_output=True, timeout=WAIT)
    server.wait()
    report = done.stderr.decode(errors="replace") + done.stdout.decode(errors="replace")
    details = dict(line.split(": ", 1) for line in report.splitlines() if ": " in line)
    version = details.get("Protocol version")
    temp_key = details.get("Peer Temp Key") or details.get("Server Temp Key")
    assert version == "TLSv1.3" and temp_key, (
        f"openssl s_client saw protocol {version}, key exchange {temp_key}; expected "
        f"TLSv1.3 with an ephemeral key share\nopenssl said:\n{report.strip()[-800:]}")
    assert any(group in temp_key for group in ("X25519", "X448", "ECDH", "DH")), (
        f"the key exchange used {temp_key}, expected an ephemeral (EC)DHE group: that is "
        "what gives forward secrecy")


def test_tls12_only_client_is_refused(serve: Any, subject: Subject) -> None:
    ca_file = subject.local_copy(subject.pki().ca_cert, "pki.ca_cert")
    result = handshake(serve(subject.server_ctx()), tls12_only_client(ca_file))
    assert not result.ok, (
        f"a TLS 1.2-only client was accepted (negotiated {result.version}, {result.cipher})"
        f"{_bounds(subject.server_ctx())}\nThe server context must refuse anything below "
        "TLS 1.3: ctx.minimum_version = ssl.TLSVersion.TLSv1_3 (maximum_version only caps "
        "the newest version).")


def test_client_refuses_a_tls12_server(serve: Any, subject: Subject) -> None:
    result = handshake(serve(own_server(subject, tls12_only=True)), subject.client_ctx())
    assert not result.ok and result.server_error, (
        f"your client completed a handshake with a TLS 1.2-only server ({result.version})"
        f"{_bounds(subject.client_ctx())}\nA downgrade must be refused by the client too: "
        "minimum_version = TLSv1_3.")


def _bounds(ctx: Any) -> str:
    """What a context's version bounds say, when they explain an accepted TLS 1.2."""
    try:
        low = ssl.TLSVersion(int(ctx.minimum_version)).name
        high = ssl.TLSVersion(int(ctx.maximum_version)).name
    except Exception:  # noqa: BLE001 - not a context: the other checks say so
        return ""
    if "TLSv1_3" in high and "TLSv1_3" not in low:
        return f": your context sets maximum_version = {high} but minimum_version is {low}"
    return ""


def test_client_refuses_a_wrong_hostname(serve: Any, subject: Subject) -> None:
    client_ctx = subject.client_ctx()
    result = handshake(serve(own_server(subject)), client_ctx, server_hostname="evil.lab.test")
    try:
        unverified = int(client_ctx.verify_mode) == int(ssl.CERT_NONE)
    except Exception:  # noqa: BLE001 - not a context: the other checks say so
        unverified = False
    assert not (result.ok and unverified), (
        "your client context does not verify certificates at all (verify_mode = CERT_NONE): "
        f"it accepted the certificate for {HOSTNAME} while dialling evil.lab.test\nAnyone "
        "on the path can then present any certificate. Keep verify_mode=CERT_REQUIRED and "
        "check_hostname=True (ssl.create_default_context sets both) and trust your CA file.")
    assert not result.ok and result.server_error, (
        f"your client accepted the certificate for {HOSTNAME} while dialling evil.lab.test"
        "\nWithout a hostname check any certificate from a trusted CA impersonates any "
        "site: keep check_hostname=True (ssl.create_default_context does).")
    assert "hostname" in (result.client_error or "").lower() \
        or "match" in (result.client_error or "").lower(), (
        f"the handshake failed, but not on the hostname: {result.client_error}")


def test_client_refuses_an_untrusted_ca(serve: Any, subject: Subject) -> None:
    # Another CA issues a certificate for the very same hostname: only the trust anchor
    # differs, so only chain verification can tell them apart.
    result = handshake(serve(own_server(subject, subject.pki("impostor"))), subject.client_ctx())
    assert not result.ok and result.server_error, (
        f"your client accepted a certificate from a CA it does not trust ({result.version})\n"
        "The client must verify the chain up to the CA file it was given: "
        "verify_mode=CERT_REQUIRED with load_verify_locations(ca_file).")
    assert "certificate verify failed" in (result.client_error or ""), (
        f"the handshake failed, but not on certificate verification: {result.client_error}")


def _cn_only_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """The test's own CA, and a certificate it issued that names HOSTNAME in its common
    name only (no SubjectAlternativeName): (CA file, certificate file, key file)."""
    now = dt.datetime.now(dt.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def issue(subject_name: str, key: Any, ca: bool) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(name(subject_name))
                .issuer_name(name("Test CA")).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                               critical=True)
                .sign(ca_key, hashes.SHA256()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    files = (folder / "test-ca.pem", folder / "cn-only.pem", folder / "cn-only.key")
    files[0].write_bytes(issue("Test CA", ca_key, True).public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(issue(HOSTNAME, key, False).public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return files


def test_client_ignores_a_common_name(serve: Any, subject: Subject) -> None:
    """RFC 9525 (6.3) and the CA/Browser Forum: the host is matched against the SAN's DNS
    names only. OpenSSL falls back to the subject's common name when a certificate has no
    DNS name, and Python leaves that on (hostname_checks_common_name = True) unless told."""
    ca_file, cert_file, key_file = _cn_only_certificate(subject.learner.tmp_folder())
    client = _call("client_context()", subject.tls13.client_context, ca_file)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    result = handshake(serve(server), client)
    assert not result.ok, (
        f"your client accepted a certificate that names {HOSTNAME} only in its subject's "
        f"common name (no SubjectAlternativeName; issued by the CA file it was given) and "
        f"negotiated {result.version}; expected it refused\nHostnames are matched against "
        "the SAN's DNS names only (RFC 9525; browsers dropped the common name in 2017): a "
        "common name is free text, and a CA that vets SANs may let it through. OpenSSL "
        "still falls back to it when a certificate has no DNS name, and Python leaves that "
        "on: set ctx.hostname_checks_common_name = False.")
    assert "hostname" in (result.client_error or "").lower() \
        or "match" in (result.client_error or "").lower(), (
        f"the handshake failed, but not on the hostname: {result.client_error}")


# ---------------------------------------------------------------------------- keys and trust


def test_server_key_is_private_and_its_own(subject: Subject) -> None:
    pki = subject.pki()
    mode = stat.S_IMODE(os.stat(pki.server_key).st_mode)
    assert mode & 0o077 == 0, (
        f"pki.server_key ({pki.server_key}) has mode {mode:04o}: other users can read the "
        "server's private key\nWhoever reads it can impersonate the server. Make the file "
        "readable by its owner only, from its creation: os.open(path, os.O_WRONLY | "
        "os.O_CREAT | os.O_EXCL, 0o600), not a chmod after writing it.")
    ca = _load_cert(subject, pki.ca_cert, "pki.ca_cert")
    server = _load_cert(subject, pki.server_cert, "pki.server_cert")
    assert server.public_key() != ca.public_key(), (
        "the server certificate carries the CA's own public key: the server's key IS the "
        "CA's key\nThen pki.server_key, which sits on every server, can sign certificates "
        "for any host. Generate a separate key pair for the server and keep the CA's key "
        "off the servers.")


PRIVATE_PEM = b"PRIVATE KEY-----"   # "-----BEGIN (EC |RSA |ENCRYPTED |OPENSSH )PRIVATE KEY-----"


def _private_key_in(data: bytes) -> bool:
    """Whether a file's bytes carry a private key: a PEM block (PKCS#8, SEC1, PKCS#1,
    OpenSSH, encrypted or not, alone or bundled with certificates) or a DER key."""
    if PRIVATE_PEM in data:
        return True
    try:
        serialization.load_der_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: wants a password
        return False
    return True


def _whose_key(data: bytes, keys: dict[str, Any]) -> str:
    """Which of the PKI's keys a file holds, for the message."""
    block = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                      data, re.S)
    try:
        key = (serialization.load_pem_private_key(block.group(), None) if block
               else serialization.load_der_private_key(data, None))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "a private key"
    return next((name for name, public in keys.items() if key.public_key() == public),
                "a private key")


def test_no_private_key_is_left_readable_by_others(subject: Subject) -> None:
    """Every file create_pki leaves behind (in its folder or beside it) that holds private
    key material must be its owner's only: the CA's key (if it is kept at all) most of all,
    a key bundled into a certificate file, a leftover temporary copy."""
    pki = subject.pki()
    keys = {"the CA's private key": _load_cert(subject, pki.ca_cert, "pki.ca_cert").public_key(),
            "the server's private key":
                _load_cert(subject, pki.server_cert, "pki.server_cert").public_key()}
    exposed = []
    for folder, _dirs, files in os.walk(subject.folder):  # a folder others cannot enter: private
        for name in sorted(files):
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode) or stat.S_IMODE(mode) & 0o077 == 0:
                continue
            data = subject.read(path, path.name)
            if _private_key_in(data):
                exposed.append(f"{path.relative_to(subject.folder)} (mode "
                               f"{stat.S_IMODE(mode):04o}) holds {_whose_key(data, keys)}")
    assert not exposed, (
        f"create_pki() left private key material readable by other users: "
        f"{'; '.join(exposed)}; expected every file holding a private key to be mode 0600\n"
        "Whoever reads the CA's key can issue a certificate for any hostname your clients "
        "trust; whoever reads the server's key can impersonate the server. Write each key "
        "file with os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) (created "
        "private, not chmod-ed after), keep keys out of certificate files, and do not keep "
        "the CA's key at all when nothing needs it.")


class CreationWatch:
    """Every regular file created (or moved in) under ``folder``, its subfolders included,
    while the block runs, stat-ed from this process as soon as inotify reports it (through
    watchfiles, with no debounce): the modes seen, by inode. It sees files however they
    were made - by the learner's Python, a library, or a program it ran (a shell
    redirection, tee, dd) - and from another process than the creator's, so the learner's
    own code holds it up in nothing. A file seen readable by others at any moment was: that
    moment is when another user opens it. Best effort: a window shorter than a report's
    way here can be missed, never a private file taken for an open one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.open_modes: dict[tuple[int, int], int] = {}  # (dev, ino) -> a mode seen open
        self.stop, self.ready = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CreationWatch:
        self.thread.start()
        self.ready.wait(10)  # the watcher is set up once it has yielded (empty) once
        for path in self.folder.rglob("*"):  # made before the watch began
            self._seen(path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _seen(self, path: Path) -> None:
        try:
            info = os.lstat(path)
        except OSError:  # gone again (a temporary file renamed away)
            return
        if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
            self.open_modes.setdefault((info.st_dev, info.st_ino), stat.S_IMODE(info.st_mode))

    def _run(self) -> None:
        for changes in watchfiles.watch(self.folder, watch_filter=None, debounce=0, step=1,
                                        rust_timeout=20, yield_on_timeout=True,
                                        stop_event=self.stop, raise_interrupt=False,
                                        ignore_permission_denied=True):
            self.ready.set()
            for _change, path in changes:
                self._seen(Path(path))


def test_no_key_file_is_ever_readable_by_others(subject: Subject) -> None:
    """A key file must be born private, not made private after: permissions are checked
    when a file is opened, so a key written with the default mode and chmod-ed to 0600
    afterwards (or a file opened with the default mode and fchmod-ed before the key goes
    in) can be opened by another user in between, who keeps reading it after the chmod.
    The window is too short to watch from outside: harness.py runs create_pki() under
    umask 0o000 and notes the mode each new file has right after the call that created it;
    the test reads the files itself to see which hold a key."""
    folder = subject.folder / "umask-000"
    with CreationWatch(subject.folder) as watch:
        seen = subject.learner.harness().create_pki_watching_creations(
            subject.tls13, str(folder), HOSTNAME)
    if seen["error"]:
        pytest.fail(f"create_pki() raised {seen['error']} when run with umask 0o000 "
                    "(a permissive umask: group and others get what the code asks for)",
                    pytrace=False)
    born_open, flagged = [], set()
    for entry in seen["created"]:
        path, mode = Path(entry["path"]), entry["mode"]
        if mode & 0o077 and _private_key_in(subject.read(path, path.name)):
            born_open.append(f"{path.relative_to(subject.folder)} was created mode "
                             f"{mode:04o} by {entry['how']}")
            flagged.add(path)
    born_open += _seen_open(subject, watch, flagged)
    assert not born_open, (
        f"with umask 0o000, create_pki() created key files readable by other users before "
        f"it restricted them: {'; '.join(born_open)}; expected each file that holds a "
        "private key to be created mode 0600 (its final mode is not enough)\nPermissions "
        "are checked when a file is opened: another user who opens the key in the moment "
        "between creation and chmod/fchmod keeps reading it afterwards, and the default "
        "umask (022) leaves it 0644 in that moment. Create it private: os.open(path, "
        "os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) and os.fdopen(fd, 'wb'), as "
        "ssh-keygen and openssl genpkey do (or, the old file removed first, set os.umask(0o077) "
        "around the write).")


def _seen_open(subject: Subject, watch: CreationWatch, flagged: set[Path]) -> list[str]:
    """The key files the watch saw readable by others, however they were created (a
    program create_pki ran, a file made by means harness.py does not wrap), beyond those
    the harness already reported."""
    found = []
    for folder, _dirs, files in os.walk(subject.folder):
        for name in sorted(files):
            path = Path(folder) / name
            info = os.lstat(path)
            mode = watch.open_modes.get((info.st_dev, info.st_ino))
            if (mode is not None and path not in flagged and stat.S_ISREG(info.st_mode)
                    and _private_key_in(subject.read(path, name))):
                found.append(f"{path.relative_to(subject.folder)} was seen mode {mode:04o} "
                             f"after it was created (now {stat.S_IMODE(info.st_mode):04o})")
    return found


def test_client_trusts_only_the_given_ca(subject: Subject) -> None:
    ctx = subject.client_ctx()
    try:
        trusted = [dict(c) for c in ctx.get_ca_certs()]
    except Exception as exc:  # noqa: BLE001 - the learner's object, reported plainly
        problem = f"client_context() returned {type(ctx).__name__}, not an SSLContext: {exc}"
        pytest.fail(problem, pytrace=False)
    ca = _load_cert(subject, subject.pki().ca_cert, "pki.ca_cert")
    ours = ca.subject.rfc4514_string()
    cns = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    others = ([c for c in trusted if _subject_cn(c) != cns[0].value] if cns else trusted[1:])
    assert not others, (
        f"your client context trusts {len(trusted)} CA certificates, expected only yours "
        f"({ours})\nIt also trusts, e.g., {', '.join(_subject_cn(c) for c in others[:3])}: "
        "the system's public CAs (create_default_context() without cafile, or "
        "load_default_certs()). Any of them could then vouch for your internal host: "
        "build the context with cafile=ca_file only.")


def _subject_cn(cert: dict[str, Any]) -> str:
    """The common name in one entry of SSLContext.get_ca_certs()."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return repr(cert.get("subject"))


def test_a_rerun_writes_its_key_to_a_new_private_file(subject: Subject) -> None:
    """create_pki() run again in its folder (a rotation), over a key file of an earlier run
    that other users can read (a backup restored it 0644, a chmod -R g+r) and that one of
    them holds open: the new key must go to a file born private - the old one removed
    first, or a temporary one renamed over it - or create_pki() may refuse (O_EXCL). The
    mode os.open() and the umask give applies only to a file they create: an existing one
    keeps its mode, and whoever holds it open reads what is written into it next."""
    folder = subject.folder / "rerun"
    first = _call("create_pki()", subject.tls13.create_pki, folder, HOSTNAME)
    subject.learner.harness().set_mode(str(first.server_key), 0o644)
    refused = None
    with open(first.server_key, "rb") as reader:   # another user, holding the old key open
        before = reader.read()
        try:
            again = subject.tls13.create_pki(folder, HOSTNAME)
        except Exception as exc:  # noqa: BLE001 - refusing to overwrite a key is fine
            again, refused = None, f"{type(exc).__name__}: {exc}"
        reader.seek(0)
        after = reader.read()
    mode = stat.S_IMODE(os.stat(first.server_key).st_mode) if os.path.exists(
        first.server_key) else None
    assert after == before or not _private_key_in(after), (
        f"create_pki() run again in its folder wrote the new private key into the old key "
        f"file ({Path(first.server_key).name}: mode 0644 when they opened it, now "
        f"{'gone' if mode is None else format(mode, '04o')}) that another user held open: "
        "they read the new key; expected it written to a new file born 0600\nos.open(path, "
        "O_WRONLY | O_CREAT | O_TRUNC, 0o600), open(path, 'wb') under umask 0o077 and a "
        "chmod/fchmod before writing all reuse the existing file: its readers keep reading. "
        "Remove the old file first (path.unlink(missing_ok=True), then os.open with O_EXCL) "
        "or write a temporary file 0600 and os.replace() it over the old one.")
    if again is None:
        assert refused  # the call refused; the old key file was left as it was
        return
    new_mode = stat.S_IMODE(os.stat(again.server_key).st_mode)
    assert new_mode & 0o077 == 0, (
        f"create_pki() run again in its folder, over an old key file of mode 0644, left "
        f"pki.server_key with mode {new_mode:04o}; expected 0600: the mode os.open() or "
        "the umask gives applies only to a file they create, an existing one keeps its own")
