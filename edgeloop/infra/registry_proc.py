"""The embedded schema registry (`edgeloop registry`) as a child process.

It runs as its own process, not a task in the launcher, for the same reasons the brokers
do: fault tests kill it with SIGKILL, and a restarted instance must rebuild its state
from the `_schemas` topic alone (which is what makes several instances safe).
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from edgeloop.infra.ports import LOOPBACK, free_port
from edgeloop.infra.process import ChildProcess, ManagedServer, wait_until_healthy


class RegistryProcess(ManagedServer):
    """`python -m edgeloop registry --bootstrap ... --host 127.0.0.1 --port N`."""

    flavor = "edgeloop"

    def __init__(
        self,
        workdir: Path,
        bootstrap: str,
        *,
        port: int | None = None,
        topic: str = "_schemas",
        python: str | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.workdir = workdir
        self.bootstrap = bootstrap
        self.host = LOOPBACK
        self.port = port or free_port()
        self.topic = topic
        self.python = python or sys.executable
        self.start_timeout_s = start_timeout_s
        self._child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "registry.log"

    async def healthy(self) -> bool:
        """GET /subjects answers 200: the service is up and has read its topic."""
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                response = await client.get(f"{self.url}/subjects")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._child = ChildProcess(
            "registry",
            [
                self.python,
                "-m",
                "edgeloop",
                "--log-format",
                "kv",
                "registry",
                "--bootstrap",
                self.bootstrap,
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--topic",
                self.topic,
            ],
            self.log_file,
        )
        await self._child.start()
        try:
            await wait_until_healthy(self._child, self.healthy, self.start_timeout_s)
        except BaseException:
            # Never leave a half-started service behind a failed (or cancelled) start.
            await self._child.stop()
            raise
