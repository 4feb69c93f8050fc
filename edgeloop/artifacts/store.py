"""Artifact stores: where signed releases live and where devices fetch them from.

Layout (the same for every backend, so a directory can be synced to S3 as is):
    <root>/<model_name>/<version>/{manifest.json, manifest.sig, <files>}
    <root>/<model_name>/index.json     {"versions": [1, 2, ...]}

`ArtifactStore` is the interface; `DirectoryStore` is the embedded default and
`HttpArtifactStore` a read-only client for a directory served over HTTP (`serve_directory`)
or any static host (S3 website, nginx). An S3 store implements the same three methods.
A fetched artifact is untrusted until `verify_artifact` passes.
"""

from __future__ import annotations

import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import httpx

from edgeloop.artifacts.errors import ArtifactError, ArtifactNotFoundError
from edgeloop.artifacts.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest

INDEX_NAME = "index.json"


class ArtifactStore(Protocol):
    def put(self, artifact_dir: Path) -> str:
        """Store a signed artifact dir; return its URI. A version is written once."""
        ...

    def versions(self, model_name: str) -> list[int]: ...

    def fetch(self, model_name: str, version: int, dest: Path) -> Path: ...


def _files_of(manifest: Manifest) -> list[str]:
    return [MANIFEST_NAME, SIGNATURE_NAME, *(e.path for e in manifest.files)]


class DirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, artifact_dir: Path) -> str:
        manifest = Manifest.from_bytes((artifact_dir / MANIFEST_NAME).read_bytes())
        model_dir = self.root / manifest.model_name
        final = model_dir / str(manifest.version)
        if final.exists():
            raise ArtifactError(
                f"{manifest.model_name} v{manifest.version} already in store "
                f"at {final}; versions are immutable"
            )
        # Copy to a temp dir then rename: a reader never sees half a release.
        tmp = model_dir / f".tmp-{manifest.version}"
        shutil.rmtree(tmp, ignore_errors=True)
        for name in _files_of(manifest):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(artifact_dir / name, tmp / name)
        tmp.rename(final)
        versions = sorted({*self.versions(manifest.model_name), manifest.version})
        index_tmp = model_dir / f".{INDEX_NAME}.tmp"
        index_tmp.write_text(json.dumps({"versions": versions}))
        index_tmp.replace(model_dir / INDEX_NAME)
        return final.resolve().as_uri()

    def versions(self, model_name: str) -> list[int]:
        index = self.root / model_name / INDEX_NAME
        if not index.exists():
            return []
        return [int(v) for v in json.loads(index.read_text())["versions"]]

    def fetch(self, model_name: str, version: int, dest: Path) -> Path:
        src = self.root / model_name / str(version)
        if not src.is_dir():
            raise ArtifactNotFoundError(f"{model_name} v{version} not in store {self.root}")
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest


class HttpArtifactStore:
    """Read-only client; `put` belongs to whoever owns the bucket or directory."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str) -> bytes:
        try:
            resp = httpx.get(f"{self.base_url}/{path}", timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            err = ArtifactError(f"GET {self.base_url}/{path} failed: {exc}")
            err.retriable = True
            raise err from exc
        if resp.status_code == 404:
            raise ArtifactNotFoundError(f"GET {self.base_url}/{path}: HTTP 404")
        if resp.status_code != 200:
            raise ArtifactError(f"GET {self.base_url}/{path}: HTTP {resp.status_code}")
        return resp.content

    def put(self, artifact_dir: Path) -> str:
        raise ArtifactError(
            f"{self.base_url} is a read-only store; publish with DirectoryStore "
            "on the serving host or an S3 store"
        )

    def versions(self, model_name: str) -> list[int]:
        try:
            doc = json.loads(self._get(f"{model_name}/{INDEX_NAME}"))
        except ArtifactNotFoundError:
            return []
        return [int(v) for v in doc["versions"]]

    def fetch(self, model_name: str, version: int, dest: Path) -> Path:
        prefix = f"{model_name}/{version}"
        data = self._get(f"{prefix}/{MANIFEST_NAME}")
        # The manifest is used only to know which files to download; verification of the
        # signature and the hashes happens after, on the whole directory.
        manifest = Manifest.from_bytes(data)
        dest.mkdir(parents=True, exist_ok=True)
        for name in _files_of(manifest):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(
                data if name == MANIFEST_NAME else self._get(f"{prefix}/{name}")
            )
        return dest


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_directory(root: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve a DirectoryStore's root read-only over HTTP in a daemon thread.

    Returns the server (its `server_address` has the bound port); call `.shutdown()`.
    """
    handler = partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="artifact-http", daemon=True).start()
    return server
