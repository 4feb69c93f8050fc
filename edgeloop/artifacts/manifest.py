"""The release manifest and its canonical JSON form (the bytes that get signed).

Canonical form: UTF-8 JSON, keys sorted, no whitespace, no floats other than the holdout
scores (rounded to 6 decimals when the manifest is built, so that every platform prints
them the same way). The signature lives in a separate file (`manifest.sig`) so the signed
bytes are exactly the manifest file's bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.artifacts.errors import VerificationError

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Lineage:
    """Where a model came from: enough to reproduce the run that made it."""

    trigger_id: str | None = None
    # "topic/partition" -> [first_offset, last_offset] inclusive.
    offset_ranges: dict[str, list[int]] = field(default_factory=dict)
    parent_version: int | None = None
    holdout_scores: dict[str, float] = field(default_factory=dict)
    interconnect: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    model_name: str
    version: int
    created_at: int  # unix seconds, UTC
    expires_at: int
    target: str
    files: tuple[FileEntry, ...]
    lineage: Lineage = field(default_factory=Lineage)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"manifest version must be >= 1, got {self.version}")
        if self.expires_at <= self.created_at:
            raise ValueError(
                f"manifest expires_at {self.expires_at} is not after created_at {self.created_at}"
            )
        for entry in self.files:
            # Paths are relative, forward-slash, inside the artifact dir: a manifest must not
            # make a verifier hash (or a device load) a file outside it.
            if entry.path.startswith("/") or ".." in entry.path.split("/") or "\\" in entry.path:
                raise ValueError(f"manifest file path {entry.path!r} escapes the artifact dir")

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["files"] = [asdict(f) for f in self.files]
        return doc

    def canonical_bytes(self) -> bytes:
        return json.dumps(
            self.to_dict(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        ).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data.decode("utf-8"))
            lineage = Lineage(**doc.pop("lineage", {}))
            files = tuple(FileEntry(**f) for f in doc.pop("files"))
            return cls(files=files, lineage=lineage, **doc)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            raise VerificationError(
                f"manifest is not a valid edgeloop manifest: {exc}", reason="manifest"
            ) from exc

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(f"no file {path!r} in manifest of {self.model_name} v{self.version}")


def describe_files(root: Path, names: list[str]) -> tuple[FileEntry, ...]:
    """FileEntry for each name under `root`, sorted by path so the manifest is canonical."""
    entries = []
    for name in sorted(names):
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"artifact file {path} does not exist")
        entries.append(FileEntry(path=name, sha256=sha256_file(path), size=path.stat().st_size))
    return tuple(entries)
