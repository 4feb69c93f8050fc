"""Fetching a model artifact dir with memory bounded by a chunk, not by the file.

Every file is streamed to disk and capped at `MAX_ARTIFACT_BYTES` counted after
decoding. httpx's own decoding (`resp.content`, and even `iter_bytes`) inflates a
whole network chunk at once: a gzip body expands up to ~1000x (the deflate limit), so
0.5 MB on the wire became +530 MiB before the old size check ran. Here the raw bytes are
read (`iter_raw`) and inflated `DECODE_CHUNK` bytes at a time (zlib's `max_length`), so
a gzip bomb is refused once it passes the cap, having used about one chunk of memory.
A `Content-Length` over the cap is refused before any body is read.
"""

from __future__ import annotations

import asyncio
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import httpx

from edgeloop.artifacts.errors import ArtifactError
from edgeloop.artifacts.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest

MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
DECODE_CHUNK = 256 * 1024
# Only encodings decoded here are asked for; anything else is refused, not buffered.
ACCEPT_ENCODING = "gzip, deflate"


class DownloadRefusedError(ArtifactError):
    """A download was stopped: too large, undecodable, an unusable URL or status."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Inflater:
    """Decodes a Content-Encoding a bounded piece at a time and counts decoded bytes."""

    def __init__(self, encoding: str, what: str, cap: int) -> None:
        self.what = what
        self.cap = cap
        self.total = 0
        enc = encoding.strip().lower()
        if enc in ("", "identity"):
            self._z = None
        elif enc in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":  # RFC 9110 §8.4.1.2: the zlib format
            self._z = zlib.decompressobj()
        else:
            raise DownloadRefusedError(
                f"{what}: Content-Encoding {encoding!r} is not one this device decodes "
                f"({ACCEPT_ENCODING}, identity)",
                reason="encoding",
            )

    def feed(self, raw: bytes) -> Iterator[bytes]:
        """Decoded pieces of `raw`, each at most DECODE_CHUNK bytes.

        Raises:
            DownloadRefusedError: the decoded total passed the cap, or the bytes are not
                valid for the encoding.
        """
        if self._z is None:
            yield self._count(raw)
            return
        try:
            piece = self._z.decompress(raw, DECODE_CHUNK)
            yield self._count(piece)
            while self._z.unconsumed_tail:
                piece = self._z.decompress(self._z.unconsumed_tail, DECODE_CHUNK)
                yield self._count(piece)
        except zlib.error as exc:
            raise DownloadRefusedError(
                f"{self.what}: undecodable body: {exc}", reason="encoding"
            ) from None

    def finish(self) -> None:
        """Raises DownloadRefusedError when a compressed body ended early."""
        if self._z is not None and not self._z.eof:
            raise DownloadRefusedError(f"{self.what}: truncated compressed body", reason="encoding")

    def _count(self, piece: bytes) -> bytes:
        self.total += len(piece)
        if self.total > self.cap:
            raise DownloadRefusedError(
                f"{self.what}: larger than the {self.cap} byte cap (MAX_ARTIFACT_BYTES) once "
                "decoded; refused",
                reason="too_large",
            )
        return piece


async def fetch_to_file(
    client: httpx.AsyncClient, url: str, dest: Path, *, cap: int = MAX_ARTIFACT_BYTES
) -> int:
    """Stream `url` into `dest`, decoding at most `cap` bytes.

    Args:
        client: the client the whole artifact is fetched with.
        url: http(s) URL of one file.
        dest: where the decoded body goes (created with its parent directories).
        cap: most decoded bytes accepted.

    Returns:
        The number of decoded bytes written.

    Raises:
        DownloadRefusedError: HTTP status other than 200, a Content-Length or decoded size
            over `cap`, or an encoding this device does not decode. `dest` may hold a
            partial file; the caller discards the download dir.
        httpx.HTTPError: the transfer failed.
    """
    what = f"GET {url}"
    headers = {"Accept-Encoding": ACCEPT_ENCODING}
    async with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code != 200:
            raise DownloadRefusedError(f"{what}: HTTP {resp.status_code}", reason="status")
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise DownloadRefusedError(
                f"{what}: Content-Length {length} is over the {cap} byte cap "
                "(MAX_ARTIFACT_BYTES); refused before reading",
                reason="too_large",
            )
        inflater = _Inflater(resp.headers.get("content-encoding", ""), what, cap)
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        fh: BinaryIO = await asyncio.to_thread(dest.open, "wb")
        try:
            async for raw in resp.aiter_raw():
                for piece in inflater.feed(raw):
                    if piece:
                        await asyncio.to_thread(fh.write, piece)
            inflater.finish()
        finally:
            await asyncio.to_thread(fh.close)
    return inflater.total


async def download_artifact(url: str, dest: Path, timeout_s: float) -> None:
    """Fetch `<url>/manifest.json`, the signature and every listed file into `dest`.

    The manifest is read only to know what to fetch; nothing is trusted until verified.

    Raises:
        DownloadRefusedError: a file over the cap, a bad status or encoding, a bad URL.
        httpx.HTTPError, OSError: the transfer or the disk failed.
    """
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        src = Path(unquote(parsed.path))
        manifest = Manifest.from_bytes(await asyncio.to_thread(_read_capped, src / MANIFEST_NAME))
        for name in (MANIFEST_NAME, SIGNATURE_NAME, *(f.path for f in manifest.files)):
            await asyncio.to_thread(_copy_capped, src / name, _inside(dest, name))
        return
    if parsed.scheme not in ("http", "https"):
        raise DownloadRefusedError(f"artifact url {url!r}: use http(s):// or file://", reason="url")
    base = url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client:
        await fetch_to_file(client, f"{base}/{MANIFEST_NAME}", dest / MANIFEST_NAME)
        manifest = Manifest.from_bytes(await asyncio.to_thread((dest / MANIFEST_NAME).read_bytes))
        for name in (SIGNATURE_NAME, *(f.path for f in manifest.files)):
            await fetch_to_file(client, f"{base}/{name}", _inside(dest, name))


def _inside(dest: Path, name: str) -> Path:
    """`dest / name`, refused when the (unverified) manifest names a path outside it."""
    path = dest / name
    if not path.resolve().is_relative_to(dest.resolve()):
        raise DownloadRefusedError(
            f"manifest names a file outside the artifact: {name!r}", reason="path"
        )
    return path


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_ARTIFACT_BYTES:
        raise DownloadRefusedError(
            f"{path}: {size} bytes, over the {MAX_ARTIFACT_BYTES} byte cap (MAX_ARTIFACT_BYTES)",
            reason="too_large",
        )


def _read_capped(path: Path) -> bytes:
    _check_size(path)
    return path.read_bytes()


def _copy_capped(src: Path, dest: Path) -> None:
    _check_size(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
