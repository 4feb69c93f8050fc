"""Prometheus metrics: one `/metrics` endpoint per service process.

Each service builds its collectors on its own `CollectorRegistry` so that several services
in one process (tests, the demo) never collide on metric names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgeloop.core.logs import get_logger

log = get_logger(__name__)


@asynccontextmanager
async def serve_metrics(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[int]:
    """Serve `GET /metrics` for `registry`; yields the bound port (port 0 picks a free one).

    A tiny asyncio HTTP/1.0 responder: the endpoint is scraped, never browsed, and this
    keeps the edge extra free of a web framework.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body = generate_latest(registry)
                head = f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
            else:
                body = b"not found: try /metrics\n"
                head = "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    log.info("metrics endpoint up", extra={"url": f"http://{host}:{bound}/metrics"})
    try:
        async with server:
            yield bound
    finally:
        server.close()
