"""The development PKI: what a broker and a device need, issued once, kept private."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.core.errors import ConfigError
from edgeloop.infra.pki import DevPki


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_device_cert_carries_the_device_id_and_chains_to_the_ca(tmp_path: Path) -> None:
    pki = DevPki(tmp_path)
    creds = pki.device_cert("dev-a")
    cert, ca = load(creds.cert), load(creds.ca)
    assert cn(cert) == "dev-a"
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_server_cert_names_loopback(tmp_path: Path) -> None:
    server = DevPki(tmp_path).server_cert()
    san = load(server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)


def test_private_keys_are_owner_only(tmp_path: Path) -> None:
    pki = DevPki(tmp_path)
    pki.server_cert()
    pki.device_cert("dev-a")
    keys = sorted(tmp_path.rglob("*.key"))
    assert len(keys) == 3  # CA, server, device
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_everything_is_reused_on_a_second_run(tmp_path: Path) -> None:
    first = DevPki(tmp_path)
    ca = first.ensure_ca().read_bytes()
    device = first.device_cert("dev-a")
    device_pem = device.cert.read_bytes()
    again = DevPki(tmp_path)  # a new process, the same directory
    assert again.ensure_ca().read_bytes() == ca
    assert again.device_cert("dev-a").cert.read_bytes() == device_pem


def test_a_new_ca_reissues_certificates_it_did_not_sign(tmp_path: Path) -> None:
    pki = DevPki(tmp_path)
    old = pki.device_cert("dev-a").cert.read_bytes()
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.key").unlink()
    creds = pki.device_cert("dev-a")
    assert creds.cert.read_bytes() != old
    load(creds.cert).verify_directly_issued_by(load(creds.ca))


@pytest.mark.parametrize(
    "device_id", ["", "a/b", "dev+", "dev#", "has space", "-leading", "x" * 65, "edgeloop-cloud"]
)
def test_ids_that_would_break_the_acl_are_refused(tmp_path: Path, device_id: str) -> None:
    with pytest.raises(ConfigError):
        DevPki(tmp_path).device_cert(device_id)


def test_mutual_tls_handshake_with_the_issued_certificates(tmp_path: Path) -> None:
    """What Mosquitto does, done by Python's ssl: both sides verify, CN reaches the server."""
    pki = DevPki(tmp_path)
    server = pki.server_cert()
    device = pki.device_cert("dev-a")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)
    server_ctx.load_verify_locations(server.ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                assert peer is not None
                seen.extend(v for rdn in peer["subject"] for k, v in rdn if k == "commonName")
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve)
        thread.start()
        client_ctx = device.ssl_context()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(timeout=10)
    assert seen == ["dev-a"]
