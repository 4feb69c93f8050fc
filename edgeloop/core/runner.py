"""Runs long-lived services until a signal or a crash.

A service is any object with `name` and `async def run(self) -> None` that runs until it
is cancelled and releases its resources in `finally`. The runner gives every service the
same shutdown deadline and turns a crash of any one of them into a non-zero exit.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from typing import Protocol

from edgeloop.core.errors import ServiceCrashedError
from edgeloop.core.logs import get_logger

log = get_logger(__name__)


class Service(Protocol):
    name: str

    async def run(self) -> None: ...


class _StopRequestedError(Exception):
    """Raised inside the task group to cancel every service on a signal."""


async def run_services(services: Sequence[Service], shutdown_timeout_s: float = 10.0) -> None:
    """Run `services` concurrently. Returns after SIGINT/SIGTERM once all have stopped.

    Raises ServiceCrashedError when one service fails (the others are cancelled first),
    or when the services did not stop within `shutdown_timeout_s` after a signal.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    async def supervised(service: Service) -> None:
        log.info("service starting", extra={"service": service.name})
        try:
            await service.run()
        except asyncio.CancelledError:
            log.info("service stopped", extra={"service": service.name})
            raise
        except Exception as exc:
            log.exception("service crashed", extra={"service": service.name})
            raise ServiceCrashedError(f"service {service.name!r} crashed: {exc!r}") from exc
        # A service that returns on its own is finished work, not a crash.
        log.info("service finished", extra={"service": service.name})

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(supervised(s), name=s.name) for s in services]

            async def watch_stop() -> None:
                await stop.wait()
                log.info("shutdown requested", extra={"timeout_s": shutdown_timeout_s})
                for task in tasks:
                    task.cancel()
                _, pending = await asyncio.wait(tasks, timeout=shutdown_timeout_s)
                if pending:
                    names = ", ".join(sorted(t.get_name() for t in pending))
                    raise ServiceCrashedError(  # noqa: TRY301 - fails the task group on purpose
                        f"services did not stop within {shutdown_timeout_s}s of the shutdown "
                        f"signal: {names}"
                    )
                raise _StopRequestedError  # noqa: TRY301 - unwinds the task group on purpose

            watcher = tg.create_task(watch_stop(), name="watch_stop")
            if tasks:
                await asyncio.wait(tasks)
            if not stop.is_set():
                # Every service finished by itself: nothing left to wait a signal for.
                watcher.cancel()
    except* _StopRequestedError:
        pass
    except* ServiceCrashedError as group:
        raise group.exceptions[0] from None
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
