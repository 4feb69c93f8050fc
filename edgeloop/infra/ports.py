"""Free loopback ports for servers the launcher starts.

Two ways a port found free can still be taken when the child binds it:

* Within one process. The kernel hands out a port again as soon as the probing socket is
  closed, so a port picked early (the demo picks its services' metrics ports before the
  stack starts) and a port picked later (Tansu's listener) can be the same number. A CI
  run lost its demo that way: the fleet's metrics port was the broker's. This module
  therefore never returns a port it has already returned in this process.
* Across processes, nothing can reserve a port short of holding it bound. Callers that
  start a server on a picked port check it just before the start (`first_taken`) and
  treat "address in use" in the child's log as retriable.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable

LOOPBACK = "127.0.0.1"

# Ports this process has handed out; the kernel's ephemeral range (~28k ports) leaves room
# for every port a long pytest session or a demo ever picks.
_handed_out: set[int] = set()
_lock = threading.Lock()
_MAX_TRIES = 64


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on now and this process never returned before.

    Raises:
        OSError: no such port after 64 tries of the kernel's choice.
    """
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct free ports (see `free_port`); probes stay bound until all are chosen."""
    socks: list[socket.socket] = []
    chosen: list[int] = []
    try:
        with _lock:
            for _ in range(count * _MAX_TRIES):
                if len(chosen) == count:
                    break
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)  # held bound, so the kernel will not offer it again now
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
                if port not in _handed_out and port not in chosen:
                    chosen.append(port)
            if len(chosen) < count:
                raise OSError(f"no free port on {host} after {count * _MAX_TRIES} tries")
            _handed_out.update(chosen)
        return chosen
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
