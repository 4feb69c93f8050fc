"""Faust's consumer with an eager hand-off of each fetched message to its streams.

faust-streaming 0.15.3's fetch loop (`Consumer._drain_messages`) hands every message to
the conductor with

    await self.wait_first(callback(message), self.suspend_flow.wait())

and mode's `wait_first` wraps each of the two, plus the service's `stopped` and
`crashed` events, in a task, then waits on the four: four tasks, an `asyncio.wait` and
at least two event-loop turns per message, to guard a callback that almost never
suspends (it only puts the event into the streams' queues). py-spy of a worker draining
a backlog put that guard at about a fifth of the worker's CPU.

`EagerDrainConsumer.wait_first` runs the callback in place first, as Python 3.12's eager
tasks do. When it finishes without suspending (the common case: the flow is not
suspended, the producer is not over its buffer, no stream queue is full), nothing more
is done. When it suspends, the rest of it runs under mode's own `wait_first`, raced
against the flow's suspension exactly as before, so a rebalance still interrupts a
callback that waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from faust.transport.drivers.aiokafka import Consumer


class EagerDrainConsumer(Consumer):
    """Faust's aiokafka consumer; only the fetch loop's per-message wait differs."""

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:  # noqa: ASYNC109 - mode's signature
        """mode's `Service.wait_first`, with an eager first step for the fetch loop's
        call (`callback(message)` raced against `suspend_flow.wait()`)."""
        if timeout is None and len(coros) == 2 and _waits_on(coros[1], self.suspend_flow):
            callback = coros[0]
            try:
                yielded = callback.send(None)
            except StopIteration:
                coros[1].close()
                return None  # the fetch loop ignores the result
            except BaseException:
                coros[1].close()
                raise
            return await super().wait_first(_resume(callback, yielded), coros[1])
        return await super().wait_first(*coros, timeout=timeout)


def _waits_on(coro: Any, event: Any) -> bool:
    """True for a not yet started `event.wait()` coroutine."""
    frame = getattr(coro, "cr_frame", None)
    return (
        getattr(coro, "cr_code", None) is asyncio.Event.wait.__code__
        and frame is not None
        and frame.f_locals.get("self") is event
    )


async def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Drive `coro` on from the point where its first step suspended, as a task would:
    `yielded` is what it suspended on (a future, or None for a bare yield)."""
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                # Task's protocol: the flag a future sets when a coroutine yields it.
                yielded._asyncio_future_blocking = False
                await asyncio.wait({yielded})  # done; its result is left to `coro`
        except asyncio.CancelledError:
            # Cancelled while `coro` waited (a rebalance won the race): cancel what it
            # waits on and let it see the cancellation, as Task.cancel does.
            if yielded is not None and not yielded.done():
                yielded.cancel()
            try:
                yielded = coro.throw(asyncio.CancelledError())
            except StopIteration as stop:
                return stop.value
            continue
        try:
            # The future is done: `coro` reads its result (or raises its exception).
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
