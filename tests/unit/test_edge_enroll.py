"""`edgeloop edge enroll` issues a device certificate from the development CA, and
`edge run` without one names that command instead of only saying a file is missing."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.x509.oid import NameOID

from edgeloop.cli.main import cli


def _said(result: Result) -> str:
    """What the user reads: `edgeloop`'s entry point prints an EdgeloopError's message."""
    return result.output + str(result.exception or "")


def _env(tmp_path: Path) -> dict[str, str]:
    return {"EDGELOOP_HOME": str(tmp_path), "EDGELOOP_PKI_DIR": str(tmp_path / "pki")}


def test_enroll_issues_a_certificate_whose_cn_is_the_device_id(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["edge", "enroll", "pi-7"], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    cert_path = tmp_path / "pki" / "devices" / "pi-7.crt"
    assert str(cert_path) in result.output
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-7"
    ca = x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.crt").read_bytes())
    assert cert.issuer == ca.subject


def test_enroll_refuses_an_id_that_cannot_be_a_topic_level(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["edge", "enroll", "pi/7"], env=_env(tmp_path))
    assert result.exit_code != 0
    assert "invalid device id 'pi/7'" in _said(result)
    assert not (tmp_path / "pki" / "devices").exists()


def test_run_without_a_certificate_names_the_enroll_command(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_text("")
    result = CliRunner().invoke(cli, ["edge", "run", "--device-id", "pi-8"], env=_env(tmp_path))
    assert result.exit_code != 0
    assert "edgeloop edge enroll pi-8" in _said(result)
