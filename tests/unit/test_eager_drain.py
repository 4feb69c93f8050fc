"""The fetch loop's eager hand-off (agents/eager_drain.py) on a real Faust consumer: a
message whose hand-off does not wait costs no task; one that waits still finishes, and a
flow suspension (a rebalance) still interrupts it, as in Faust's own loop."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest

from edgeloop.agents.eager_drain import EagerDrainConsumer


@pytest.fixture
async def consumer() -> Any:
    # Built inside the test's event loop: mode services keep the loop they were made in.
    app = faust.App("eager-drain-test", broker="kafka://127.0.0.1:9", autodiscover=False)
    app.transport.Consumer = EagerDrainConsumer
    return app.consumer


def _counting_tasks(loop: asyncio.AbstractEventLoop) -> list[Any]:
    created: list[Any] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)
    return created


async def test_a_hand_off_that_does_not_wait_runs_in_place_without_tasks(consumer: Any) -> None:
    assert isinstance(consumer, EagerDrainConsumer)
    created = _counting_tasks(asyncio.get_running_loop())
    delivered: list[int] = []

    async def hand_off(n: int) -> None:
        delivered.append(n)

    for n in range(100):
        await consumer.wait_first(hand_off(n), consumer.suspend_flow.wait())
    assert delivered == list(range(100))
    assert created == []  # Faust's own wait_first makes four tasks per message


async def test_a_hand_off_that_waits_finishes_and_sees_its_result(consumer: Any) -> None:
    room = asyncio.get_running_loop().create_future()
    delivered: list[str] = []

    async def hand_off() -> None:
        delivered.append(await room)  # a full stream queue, until the agent takes one

    asyncio.get_running_loop().call_later(0.01, room.set_result, "put")
    await asyncio.wait_for(consumer.wait_first(hand_off(), consumer.suspend_flow.wait()), 5)
    assert delivered == ["put"]


async def test_a_hand_off_that_waits_sees_the_error_it_waited_on(consumer: Any) -> None:
    room = asyncio.get_running_loop().create_future()
    seen: list[BaseException] = []

    async def hand_off() -> None:
        try:
            await room
        except LookupError as exc:
            seen.append(exc)

    asyncio.get_running_loop().call_later(0.01, room.set_exception, LookupError("gone"))
    await asyncio.wait_for(consumer.wait_first(hand_off(), consumer.suspend_flow.wait()), 5)
    assert [str(e) for e in seen] == ["gone"]


async def test_a_flow_suspension_interrupts_a_waiting_hand_off(consumer: Any) -> None:
    never = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def hand_off() -> None:
        try:
            await never
            outcome.append("delivered")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    asyncio.get_running_loop().call_later(0.01, consumer.suspend_flow.set)
    await asyncio.wait_for(consumer.wait_first(hand_off(), consumer.suspend_flow.wait()), 5)
    await asyncio.sleep(0)
    assert outcome == ["cancelled"]
    assert never.cancelled()


async def test_an_error_in_a_hand_off_that_does_not_wait_propagates(consumer: Any) -> None:
    async def hand_off() -> None:
        raise KeyError("no callback for the partition")

    with pytest.raises(KeyError):
        await consumer.wait_first(hand_off(), consumer.suspend_flow.wait())


async def test_other_waits_keep_modes_behaviour(consumer: Any) -> None:
    async def quick() -> str:
        return "done"

    result = await consumer.wait_first(quick(), timeout=1.0)
    assert result.results == ["done"]
