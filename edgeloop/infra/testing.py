"""Support for the pytest fixtures in tests/conftest.py: servers on a background loop.

Starting Apache Kafka costs seconds, so the fixtures start each server once per session.
pytest-asyncio gives every test its own event loop, and an asyncio subprocess belongs to
the loop that created it; so the session's servers live on one loop in a thread of their
own (`LoopThread`), and a test on any loop awaits their methods through `call()`:

    await infra_loop.call(kafka_broker.restart())
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.pki import DevPki
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.infra.stack import endpoints_env, write_endpoints

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread until `close()`."""

    def __init__(self, name: str = "edgeloop-infra") -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the thread's loop; block the caller (sync code) until done."""
        return self.submit(coro).result(timeout_s)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the thread's loop; await it from another loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def close(self) -> None:
        async def _shutdown() -> None:
            await self.loop.shutdown_asyncgens()

        if self.loop.is_running():
            self.run(_shutdown(), timeout_s=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.loop.close()


@dataclass
class InfraEndpoints:
    """What `infra_stack` yields: the servers, and a home with infra.env written."""

    home: Path
    pki: DevPki
    mosquitto: Mosquitto
    kafka: KafkaBroker
    registry: RegistryProcess | None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def write(
        cls,
        home: Path,
        mosquitto: Mosquitto,
        kafka: KafkaBroker,
        registry: RegistryProcess | None,
    ) -> InfraEndpoints:
        env = endpoints_env(mosquitto, kafka, registry)
        write_endpoints(home, env)
        return cls(
            home=home,
            pki=mosquitto.pki,
            mosquitto=mosquitto,
            kafka=kafka,
            registry=registry,
            env=env,
        )
