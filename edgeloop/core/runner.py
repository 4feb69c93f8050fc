"""Runs long-lived services until a signal or a crash.

A service is any object with `name` and `async def run(self) -> None` that runs until it
is cancelled and releases its resources in `finally`. The runner gives every service the
same shutdown deadline and turns a crash of any one of them into a non-zero exit.

Shutdown has two phases within that one deadline. First every service that also has an
`async def drain(self) -> None` is asked to finish its work in hand and take no more
(concurrently; `drain` returns when done, the runner does not cancel `run` meanwhile).
Then every service still running is cancelled. Draining before cancelling means a service
never has to handle its stop request inside a half-done step (cancellation lands at any
`await`, e.g. between sending a record and noting that it was sent), nor swallow the
cancellation (`Task.uncancel`) to finish its work. A drain that overruns the deadline or
raises is abandoned (cancelled); the cancellation phase then still runs.

Shutdown is bounded. The services are plain tasks, not a `TaskGroup`: a task group waits
without bound for a child that swallows its cancellation, so a deadline around it does
not hold. After the deadline the runner stops waiting, names the services still running
and ends the process (`force_exit`); a second SIGINT/SIGTERM during the shutdown ends it
at once. Neither waits on the stuck task, which may be blocked in a thread or in a loop
that ignores cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from edgeloop.core.errors import ServiceCrashedError
from edgeloop.core.logs import get_logger

log = get_logger(__name__)

# Exit statuses of a forced exit: the shell's convention for "killed by SIGINT", and 1
# for a shutdown that overran its deadline (a failure, like a crash).
EXIT_SECOND_SIGNAL = 128 + signal.SIGINT
EXIT_SHUTDOWN_TIMEOUT = 1


class Service(Protocol):
    name: str

    async def run(self) -> None: ...


class ShutdownTimeoutError(ServiceCrashedError):
    """Services did not stop within the shutdown deadline (or a second signal came first).

    `stuck` names them; their tasks were abandoned, not awaited.
    """

    def __init__(self, message: str, *, stuck: list[str]) -> None:
        super().__init__(message)
        self.stuck = stuck


def exit_process(code: int) -> None:
    """End the process now: flush the logs and standard streams, then `os._exit`.

    `sys.exit` is not enough: `asyncio.run` would first cancel and await every task left,
    including the one that ignores cancellation, and join the default executor's threads.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


async def run_services(
    services: Sequence[Service],
    shutdown_timeout_s: float = 10.0,
    *,
    force_exit: Callable[[int], None] | None = exit_process,
) -> None:
    """Run `services` concurrently until a signal, a crash, or until all have finished.

    On the first SIGINT/SIGTERM the services with a `drain()` are drained, then every
    service still running is cancelled; both phases together get `shutdown_timeout_s`.
    A service that crashes stops the others the same way.

    Args:
        services: objects with `name` and `async def run()`.
        shutdown_timeout_s: how long the services together get to drain and stop after a
            signal or a crash.
        force_exit: called with an exit status when the shutdown overruns its deadline
            (`EXIT_SHUTDOWN_TIMEOUT`) or a second signal arrives during it
            (`EXIT_SECOND_SIGNAL`); the default ends the process at once. None (or a
            callable that returns) makes the runner raise instead, leaving the stuck
            tasks to the caller.

    Returns:
        After a signal once every service has stopped, or when all finished by themselves.

    Raises:
        ServiceCrashedError: a service failed (the others were stopped first).
        ShutdownTimeoutError: services did not stop within `shutdown_timeout_s`, or a
            second signal came before they did; the message names them.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()
    installed: list[signal.Signals] = []

    def on_signal() -> None:
        if stop.is_set():
            force.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    tasks = [asyncio.create_task(_supervised(s), name=s.name) for s in services]
    try:
        try:
            crash = await _until_stop_or_crash(tasks, stop)
        except asyncio.CancelledError:
            # Cancelled from outside: the services get the same bounded shutdown.
            await _stop_all(services, tasks, force, shutdown_timeout_s, None)
            raise
        if stop.is_set():
            log.info("shutdown requested", extra={"timeout_s": shutdown_timeout_s})
        await _stop_all(services, tasks, force, shutdown_timeout_s, force_exit)
        crash = crash or _first_crash(tasks)
        if crash is not None:
            raise crash
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _stop_all(
    services: Sequence[Service],
    tasks: list[asyncio.Task[None]],
    force: asyncio.Event,
    timeout_s: float,
    force_exit: Callable[[int], None] | None,
) -> None:
    """Drain, then cancel what still runs and wait for it; all within `timeout_s` and
    only until `force`."""
    deadline = loop_time() + timeout_s
    await _drain_all(services, tasks, force, timeout_s)
    running = [t for t in tasks if not t.done()]
    for task in running:
        task.cancel()
    stuck, forced = await _wait_bounded(running, force, max(0.0, deadline - loop_time()))
    if not stuck:
        return
    names = sorted(t.get_name() for t in stuck)
    why = "a second signal came" if forced else f"they did not stop within {timeout_s}s"
    message = f"shutdown abandoned services ({why}): {', '.join(names)}"
    log.error(message, extra={"stuck": ",".join(names)})
    if force_exit is not None:
        force_exit(EXIT_SECOND_SIGNAL if forced else EXIT_SHUTDOWN_TIMEOUT)
    raise ShutdownTimeoutError(message, stuck=names)


async def _drain_all(
    services: Sequence[Service],
    tasks: list[asyncio.Task[None]],
    force: asyncio.Event,
    timeout_s: float,
) -> None:
    """Call `drain()` of every running service that has one, concurrently; wait for them
    at most `timeout_s` and only until `force`, then cancel the drains left."""
    drains: list[asyncio.Task[None]] = []
    for service, task in zip(services, tasks, strict=True):
        hook = getattr(service, "drain", None)
        if callable(hook) and not task.done():
            drains.append(asyncio.create_task(_drained(service.name, hook), name=service.name))
    if not drains:
        return
    left, _ = await _wait_bounded(drains, force, timeout_s)
    for drain in left:
        log.warning("drain did not finish in time", extra={"service": drain.get_name()})
        drain.cancel()


async def _drained(name: str, hook: Callable[[], Awaitable[None]]) -> None:
    try:
        await hook()
    except Exception:  # the cancellation phase still stops the service
        log.exception("drain failed", extra={"service": name})


async def _supervised(service: Service) -> None:
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


async def _until_stop_or_crash(
    tasks: list[asyncio.Task[None]], stop: asyncio.Event
) -> ServiceCrashedError | None:
    """Wait until a signal, a crash, or every task is done; the crash, if one."""
    stopper = asyncio.create_task(stop.wait(), name="runner-stop")
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending and not stop.is_set():
            done, pending = await asyncio.wait(
                pending | {stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(stopper)
            if (crash := _first_crash([t for t in tasks if t in done])) is not None:
                return crash
        return None
    finally:
        stopper.cancel()


async def _wait_bounded(
    running: list[asyncio.Task[None]], force: asyncio.Event, timeout_s: float
) -> tuple[list[asyncio.Task[None]], bool]:
    """Wait for `running` to finish, at most `timeout_s` and only until `force` is set.

    Returns the tasks still running and whether `force` ended the wait.
    """
    forcer = asyncio.create_task(force.wait(), name="runner-force")
    deadline = loop_time() + timeout_s
    pending: set[asyncio.Future[Any]] = set(running)
    try:
        while pending and not force.is_set():
            left = deadline - loop_time()
            if left <= 0:
                break
            _, pending = await asyncio.wait(
                pending | {forcer}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(forcer)
    finally:
        forcer.cancel()
    return [t for t in running if not t.done()], force.is_set()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def _first_crash(tasks: list[asyncio.Task[None]]) -> ServiceCrashedError | None:
    """The first crash among finished tasks (every exception is retrieved, so asyncio
    logs no "exception was never retrieved" for the others)."""
    found: ServiceCrashedError | None = None
    for task in tasks:
        if task.done() and not task.cancelled():
            exc = task.exception()
            if found is None and isinstance(exc, ServiceCrashedError):
                found = exc
    return found
