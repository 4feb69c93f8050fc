"""Signed model artifacts: manifest, ed25519 signing, verification, artifact stores.

numpy/cryptography only: the edge device imports this package to verify a model before
loading it, and must not pull in torch.
"""

from edgeloop.artifacts.errors import ArtifactError, VerificationError
from edgeloop.artifacts.manifest import FileEntry, Lineage, Manifest
from edgeloop.artifacts.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_artifact,
)
from edgeloop.artifacts.verify import verify_artifact

__all__ = [
    "ArtifactError",
    "FileEntry",
    "Lineage",
    "Manifest",
    "VerificationError",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "sign_artifact",
    "verify_artifact",
]
