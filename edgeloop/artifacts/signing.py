"""ed25519 keys and signing of an artifact directory.

The private key is written 0600 and never inside an artifact directory; `sign_artifact`
refuses to sign a directory that contains it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeloop.artifacts.errors import ArtifactError
from edgeloop.artifacts.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Lineage,
    Manifest,
    describe_files,
)

PRIVATE_KEY_NAME = "release.key"
PUBLIC_KEY_NAME = "release.pub"
DEFAULT_TARGET = "pi5-cpu"
DEFAULT_VALIDITY_S = 90 * 24 * 3600


def generate_keypair(key_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `release.key` (PEM PKCS8, mode 0600) and `release.pub` (PEM) into key_dir."""
    key_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = key_dir / PRIVATE_KEY_NAME, key_dir / PUBLIC_KEY_NAME
    if priv_path.exists() and not overwrite:
        raise ArtifactError(f"{priv_path} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Create with 0600 from the start: a chmod after writing leaves a window.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(priv_path, 0o600)  # O_CREAT does not change the mode of an existing file
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactError(f"{path} is not an ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ArtifactError(f"{path} is not an ed25519 public key")
    return key


def sign_artifact(
    artifact_dir: Path,
    key: Ed25519PrivateKey,
    *,
    model_name: str,
    version: int,
    files: list[str],
    lineage: Lineage | None = None,
    target: str = DEFAULT_TARGET,
    validity_s: int = DEFAULT_VALIDITY_S,
    now: int | None = None,
) -> Manifest:
    """Hash `files` (relative to artifact_dir), write manifest.json and manifest.sig."""
    for name in files:
        if (artifact_dir / name).read_bytes().lstrip().startswith(b"-----BEGIN PRIVATE KEY"):
            raise ArtifactError(f"{artifact_dir / name} is a private key; it never ships")
    created = int(time.time()) if now is None else now
    manifest = Manifest(
        model_name=model_name,
        version=version,
        created_at=created,
        expires_at=created + validity_s,
        target=target,
        files=describe_files(artifact_dir, files),
        lineage=lineage or Lineage(),
    )
    data = manifest.canonical_bytes()
    (artifact_dir / MANIFEST_NAME).write_bytes(data)
    (artifact_dir / SIGNATURE_NAME).write_bytes(key.sign(data))
    return manifest
