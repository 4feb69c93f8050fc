"""Errors of the artifact layer, under the project's one error tree."""

from __future__ import annotations

from edgeloop.core.errors import EdgeloopError


class ArtifactError(EdgeloopError):
    """An artifact could not be written, read or found."""


class ArtifactNotFoundError(ArtifactError):
    """The store has no such model, version or file."""


class VerificationError(ArtifactError):
    """An artifact failed verification; `reason` is a short tag (metric label, exit message).

    Reasons: signature, hash, missing_file, extra_file, version, expired, not_yet_valid,
    target, manifest.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
