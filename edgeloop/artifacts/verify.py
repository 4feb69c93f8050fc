"""What a device checks before it loads a model; also `edgeloop models verify`.

Order matters: the signature is checked over the manifest's exact bytes before any field
of the manifest is trusted, then the files against the signed hashes, then the policy
(target, version, validity window).
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.artifacts.errors import VerificationError
from edgeloop.artifacts.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, sha256_file
from edgeloop.artifacts.signing import DEFAULT_TARGET

# Files that may sit next to the signed ones without being listed.
_UNSIGNED_OK = {MANIFEST_NAME, SIGNATURE_NAME}


def verify_artifact(
    artifact_dir: Path,
    public_key: Ed25519PublicKey,
    *,
    min_version: int | None = None,
    target: str = DEFAULT_TARGET,
    now: int | None = None,
    allow_extra_files: bool = False,
) -> Manifest:
    """Return the verified manifest or raise VerificationError naming the failed check.

    `min_version`: the version the device runs now; the artifact must be strictly newer
    (no rollback, no re-apply).
    """
    try:
        data = (artifact_dir / MANIFEST_NAME).read_bytes()
        signature = (artifact_dir / SIGNATURE_NAME).read_bytes()
    except OSError as exc:
        raise VerificationError(
            f"cannot read manifest or signature in {artifact_dir}: {exc}", reason="missing_file"
        ) from exc
    try:
        public_key.verify(signature, data)
    except InvalidSignature as exc:
        raise VerificationError(
            f"{artifact_dir / SIGNATURE_NAME} does not match {MANIFEST_NAME} under this key",
            reason="signature",
        ) from exc
    manifest = Manifest.from_bytes(data)

    listed = {entry.path for entry in manifest.files}
    for entry in manifest.files:
        path = artifact_dir / entry.path
        if not path.is_file():
            raise VerificationError(f"{entry.path} is listed but missing", reason="missing_file")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise VerificationError(
                f"{entry.path} sha256 {actual} != signed {entry.sha256}", reason="hash"
            )
    if not allow_extra_files:
        present = {
            p.relative_to(artifact_dir).as_posix() for p in artifact_dir.rglob("*") if p.is_file()
        }
        extra = sorted(present - listed - _UNSIGNED_OK)
        if extra:
            raise VerificationError(f"unsigned files in artifact: {extra}", reason="extra_file")

    if manifest.target != target:
        raise VerificationError(
            f"target {manifest.target!r} != this device's {target!r}", reason="target"
        )
    if min_version is not None and manifest.version <= min_version:
        raise VerificationError(
            f"version {manifest.version} is not newer than {min_version}", reason="version"
        )
    t = int(time.time()) if now is None else now
    if t >= manifest.expires_at:
        raise VerificationError(f"expired at {manifest.expires_at} (now {t})", reason="expired")
    if t < manifest.created_at - 300:  # 5 min of clock skew between cloud and device
        raise VerificationError(
            f"created_at {manifest.created_at} is in the future (now {t})", reason="not_yet_valid"
        )
    return manifest
