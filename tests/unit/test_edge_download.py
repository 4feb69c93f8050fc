"""Model downloads stay within the artifact cap in memory, whatever the server sends.

A local HTTP server (127.0.0.1) plays a hostile or broken artifact store: a gzip bomb
(small on the wire, 4x the cap once decoded), a Content-Length over the cap, and an
honest gzip-encoded file that must still arrive intact.
"""

from __future__ import annotations

import gzip
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from edgeloop.edge.download import MAX_ARTIFACT_BYTES, DownloadRefusedError, fetch_to_file

MiB = 1024 * 1024


def gzip_of_zeros(size: int) -> bytes:
    """gzip of `size` zero bytes, built without holding `size` bytes at once."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MiB)
    parts = [z.compress(zeros) for _ in range(size // MiB)]
    parts.append(z.flush())
    return b"".join(parts)


BOMB_DECODED = 4 * MAX_ARTIFACT_BYTES  # 256 MiB
BOMB = gzip_of_zeros(BOMB_DECODED)


class Routes(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[bytes, dict[str, str]]]] = {}

    def do_GET(self) -> None:
        body, headers = self.routes[self.path]
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Routes)
    Routes.routes = {
        "/bomb": (BOMB, {"Content-Encoding": "gzip"}),
        # Claims 100 MiB and sends a few bytes: refused on the header alone.
        "/huge": (b"x" * 16, {"Content-Length": str(100 * MiB)}),
        "/model.onnx": (gzip.compress(b"model bytes " * 10_000), {"Content-Encoding": "gzip"}),
    }
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_a_gzip_bomb_is_refused_at_the_cap_without_inflating_it(
    server: str, tmp_path: Path
) -> None:
    assert len(BOMB) < MiB  # small on the wire
    tracemalloc.start()
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            with pytest.raises(DownloadRefusedError, match=f"{MAX_ARTIFACT_BYTES} byte cap") as e:
                await fetch_to_file(client, f"{server}/bomb", tmp_path / "bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.reason == "too_large"
    # Inflating the body in memory (the old `resp.content` check) peaks above 256 MiB;
    # streaming keeps about one decode chunk. The bound is generous on purpose.
    print(f"peak traced memory {peak / MiB:.1f} MiB for a {len(BOMB)} byte bomb")
    assert peak < 32 * MiB
    # Nothing beyond the cap reached the disk either.
    assert (tmp_path / "bomb").stat().st_size <= MAX_ARTIFACT_BYTES


async def test_a_content_length_over_the_cap_is_refused_before_reading(
    server: str, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        with pytest.raises(DownloadRefusedError, match="Content-Length 104857600 is over"):
            await fetch_to_file(client, f"{server}/huge", tmp_path / "huge")
    assert not (tmp_path / "huge").exists()


async def test_an_honest_gzip_encoded_file_arrives_decoded(server: str, tmp_path: Path) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        size = await fetch_to_file(client, f"{server}/model.onnx", tmp_path / "m" / "model.onnx")
    assert (tmp_path / "m" / "model.onnx").read_bytes() == b"model bytes " * 10_000
    assert size == 120_000


def test_bomb_fixture_is_what_it_claims() -> None:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    data = BOMB
    while data:
        total += len(d.decompress(data, 16 * MiB))
        data = d.unconsumed_tail
    assert total == BOMB_DECODED
