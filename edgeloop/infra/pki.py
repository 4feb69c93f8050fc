"""A development PKI: one CA, a loopback server certificate, client certificates.

Devices authenticate to Mosquitto with a client certificate whose CN is the device id;
the broker maps the CN to the MQTT username (`use_identity_as_username`) and its ACL
confines each device to `edgeloop/<CN>/#`. So the CN is a security boundary: ids are
validated here and names reserved for cloud services are never issued to a device.

Keys are ECDSA P-256: ed25519 keys are not accepted on every OpenSSL TLS client-auth
path Mosquitto 2.0 uses. Everything is idempotent: files that exist and still verify
against the CA are reused, so several processes (tests, `infra up`) share one PKI. A
file lock serialises writers so a cert and its key always come from the same run.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.core.errors import ConfigError

# A device id becomes one MQTT topic level and the ACL username: no '/', '+', '#', no
# spaces, nothing a pattern ACL could be tricked with.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Usernames the broker gives wider rights to; a device certificate must never carry them.
RESERVED_NAMES = frozenset({"edgeloop-cloud", "edgeloop-bridge", "edgeloop-admin"})

CA_DAYS = 3650
LEAF_DAYS = 825
# A leaf this close to expiry is reissued rather than reused.
RENEW_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True)
class DeviceCredentials:
    """What an MQTT client needs for mutual TLS: its cert and key, and the CA to trust."""

    cert: Path
    key: Path
    ca: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client-side context that verifies the broker and presents this identity."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass(frozen=True)
class ServerCredentials:
    cert: Path
    key: Path
    ca: Path


def validate_device_id(device_id: str) -> str:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise ConfigError(
            f"invalid device id {device_id!r}: use 1-64 of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit (it becomes an MQTT topic level)"
        )
    if device_id in RESERVED_NAMES:
        raise ConfigError(f"device id {device_id!r} is reserved for a cloud service")
    return device_id


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only, atomically (no window with wider mode)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o600)  # O_CREAT's mode is filtered by the umask; be explicit
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class DevPki:
    """The PKI under `root`: ca.{crt,key}, server.{crt,key}, devices/, services/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_cert_path = root / "ca.crt"
        self.ca_key_path = root / "ca.key"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- CA -------------------------------------------------------------------------
    def ensure_ca(self) -> Path:
        """Create the CA once; return the path of its certificate."""
        with self._locked():
            self._ensure_ca_locked()
        return self.ca_cert_path

    def _ensure_ca_locked(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self.ca_cert_path.exists() and self.ca_key_path.exists():
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
            if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > _now():
                return cert, key
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeloop dev"),
                x509.NameAttribute(NameOID.COMMON_NAME, "edgeloop dev CA"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.ca_key_path, _key_pem(key))
        _write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert, key

    # -- leaves ---------------------------------------------------------------------
    def server_cert(self) -> ServerCredentials:
        """The broker's certificate, valid for 127.0.0.1, ::1 and localhost."""
        with self._locked():
            ca_cert, ca_key = self._ensure_ca_locked()
            cert, key = self._leaf(ca_cert, ca_key, self.root / "server", "localhost", server=True)
        return ServerCredentials(cert=cert, key=key, ca=self.ca_cert_path)

    def device_cert(self, device_id: str) -> DeviceCredentials:
        """A client certificate with CN = `device_id` for the device's mTLS connection."""
        validate_device_id(device_id)
        return self._client("devices", device_id)

    def service_cert(self, name: str) -> DeviceCredentials:
        """A client certificate for a cloud service (CN = `name`), for TLS deployments."""
        if not DEVICE_ID_RE.fullmatch(name):
            raise ConfigError(f"invalid service name {name!r}")
        return self._client("services", name)

    def _client(self, folder: str, cn: str) -> DeviceCredentials:
        with self._locked():
            ca_cert, ca_key = self._ensure_ca_locked()
            directory = self.root / folder
            directory.mkdir(exist_ok=True)
            cert, key = self._leaf(ca_cert, ca_key, directory / cn, cn, server=False)
        return DeviceCredentials(cert=cert, key=key, ca=self.ca_cert_path)

    def _leaf(
        self,
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        stem: Path,
        common_name: str,
        *,
        server: bool,
    ) -> tuple[Path, Path]:
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        if cert_path.exists() and key_path.exists() and _still_good(cert_path, ca_cert):
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path


def _still_good(cert_path: Path, ca_cert: x509.Certificate) -> bool:
    """Signed by the current CA and not about to expire (a regenerated CA reissues all)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return cert.not_valid_after_utc - RENEW_BEFORE > _now()
