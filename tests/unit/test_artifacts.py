"""Signing and verification: a good artifact verifies; every tampering is caught by name."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeloop.artifacts import (
    ArtifactError,
    Lineage,
    Manifest,
    VerificationError,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_artifact,
    verify_artifact,
)
from edgeloop.artifacts.manifest import FileEntry
from edgeloop.artifacts.store import DirectoryStore, HttpArtifactStore, serve_directory
from edgeloop.cli.models_cmd import models

NOW = 1_800_000_000


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


def make_artifact(root: Path, priv: Path, version: int = 2, target: str = "pi5-cpu") -> Path:
    art = root / f"art-v{version}"
    art.mkdir(parents=True)
    (art / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (art / "model-card.json").write_text('{"task": "digits"}')
    sign_artifact(
        art,
        load_private_key(priv),
        model_name="digits-student",
        version=version,
        files=["model.onnx", "model-card.json"],
        target=target,
        now=NOW,
        validity_s=3600,
        lineage=Lineage(
            trigger_id="t-1",
            offset_ranges={"ml.hard-examples.v1/0": [0, 9]},
            parent_version=version - 1,
            holdout_scores={"clean": 0.98, "drifted": 0.79},
            interconnect={"kind": "none"},
        ),
    )
    return art


def verify(art: Path, pub: Path, **kw: object) -> Manifest:
    return verify_artifact(art, load_public_key(pub), now=kw.pop("now", NOW + 10), **kw)  # type: ignore[arg-type]


def reason_of(art: Path, pub: Path, **kw: object) -> str:
    with pytest.raises(VerificationError) as err:
        verify(art, pub, **kw)
    return err.value.reason


def test_private_key_is_0600_and_not_overwritten(keys: tuple[Path, Path]) -> None:
    priv, _ = keys
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        generate_keypair(priv.parent)


def test_good_artifact_verifies_with_lineage(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    m = verify(art, keys[1], min_version=1)
    assert (m.model_name, m.version, m.target) == ("digits-student", 2, "pi5-cpu")
    assert m.lineage.offset_ranges == {"ml.hard-examples.v1/0": [0, 9]}
    assert m.lineage.holdout_scores["drifted"] == 0.79


def test_manifest_is_canonical_json(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    data = (art / "manifest.json").read_bytes()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    assert Manifest.from_bytes(data).canonical_bytes() == data


@pytest.mark.parametrize("offset", [0, 5000, -1])
def test_one_flipped_byte_in_model_fails_hash(
    tmp_path: Path, keys: tuple[Path, Path], offset: int
) -> None:
    art = make_artifact(tmp_path, keys[0])
    data = bytearray((art / "model.onnx").read_bytes())
    data[offset] ^= 0x01
    (art / "model.onnx").write_bytes(bytes(data))
    assert reason_of(art, keys[1]) == "hash"


def test_one_flipped_byte_in_manifest_fails_signature(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    art = make_artifact(tmp_path, keys[0])
    raw = (art / "manifest.json").read_bytes()
    # Change the version digit: 2 -> 3, still valid JSON, but no longer what was signed.
    (art / "manifest.json").write_bytes(raw.replace(b'"version":2', b'"version":3'))
    assert reason_of(art, keys[1]) == "signature"


def test_flipped_signature_byte_fails(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    sig = bytearray((art / "manifest.sig").read_bytes())
    sig[10] ^= 0x80
    (art / "manifest.sig").write_bytes(bytes(sig))
    assert reason_of(art, keys[1]) == "signature"


def test_wrong_key_fails(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    _, other_pub = generate_keypair(tmp_path / "other")
    assert reason_of(art, other_pub) == "signature"


def test_expired_fails(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    assert reason_of(art, keys[1], now=NOW + 3600) == "expired"


def test_from_the_future_fails(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    assert reason_of(art, keys[1], now=NOW - 3600) == "not_yet_valid"


@pytest.mark.parametrize("running", [2, 5])
def test_older_or_same_version_fails(tmp_path: Path, keys: tuple[Path, Path], running: int) -> None:
    art = make_artifact(tmp_path, keys[0], version=2)
    assert reason_of(art, keys[1], min_version=running) == "version"


def test_wrong_target_fails(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0], target="jetson-gpu")
    assert reason_of(art, keys[1]) == "target"


def test_missing_and_extra_files_fail(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    (art / "evil.so").write_bytes(b"x")
    assert reason_of(art, keys[1]) == "extra_file"
    (art / "evil.so").unlink()
    (art / "model-card.json").unlink()
    assert reason_of(art, keys[1]) == "missing_file"


def test_private_key_never_signed_into_a_release(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = tmp_path / "a"
    art.mkdir()
    (art / "release.key").write_bytes(keys[0].read_bytes())
    with pytest.raises(ArtifactError, match="private key"):
        sign_artifact(
            art, load_private_key(keys[0]), model_name="m", version=1, files=["release.key"]
        )


def test_path_escape_in_manifest_refused() -> None:
    with pytest.raises(ValueError, match="escapes"):
        Manifest(
            model_name="m",
            version=1,
            created_at=1,
            expires_at=2,
            target="pi5-cpu",
            files=(FileEntry("../etc/passwd", "0" * 64, 1),),
        )


def test_directory_store_and_http_fetch_roundtrip(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    store = DirectoryStore(tmp_path / "store")
    store.put(make_artifact(tmp_path, keys[0], version=1))
    store.put(make_artifact(tmp_path, keys[0], version=2))
    assert store.versions("digits-student") == [1, 2]
    with pytest.raises(ArtifactError, match="immutable"):
        store.put(tmp_path / "art-v2")
    server = serve_directory(tmp_path / "store")
    try:
        http = HttpArtifactStore(f"http://127.0.0.1:{server.server_address[1]}")
        assert http.versions("digits-student") == [1, 2]
        assert http.versions("nope") == []
        got = http.fetch("digits-student", 2, tmp_path / "fetched")
        assert verify(got, keys[1], min_version=1).version == 2
    finally:
        server.shutdown()


def test_cli_verify_exits_nonzero_naming_the_failure(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    art = make_artifact(tmp_path, keys[0])
    runner = CliRunner()
    # NOW is in 2027; the artifact is valid for an hour from then, so "now" has it not yet
    # valid unless the clock is past it. Re-sign with the real clock for the CLI path.
    for p in ("manifest.json", "manifest.sig"):
        (art / p).unlink()
    sign_artifact(
        art,
        load_private_key(keys[0]),
        model_name="digits-student",
        version=2,
        files=["model.onnx", "model-card.json"],
    )
    ok = runner.invoke(models, ["verify", str(art), "--pubkey", str(keys[1])])
    assert ok.exit_code == 0, ok.output
    assert '"version": 2' in ok.output
    old = runner.invoke(
        models, ["verify", str(art), "--pubkey", str(keys[1]), "--min-version", "2"]
    )
    assert old.exit_code == 1
    assert "version" in old.output
