"""Free loopback ports for servers the launcher starts.

A port found free can be taken by someone else before our child binds it; callers that
start a server on it treat "address in use" in the child's log as retriable and pick again.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct free ports; the sockets stay bound until all are chosen."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def is_listening(port: int, host: str = LOOPBACK, timeout_s: float = 0.5) -> bool:
    """Whether a TCP connect to host:port succeeds (a cheap liveness probe)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def first_taken(ports: Iterable[int], host: str = LOOPBACK) -> int | None:
    """The first of `ports` that something already listens on, or None."""
    for port in ports:
        if is_listening(port, host):
            return port
    return None
