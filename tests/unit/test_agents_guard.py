"""faust-streaming 0.15.3 acks (skips) an event whose agent raised: nothing may escape a
batch body. A failing body dead-letters every record of its batch instead, counted."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from edgeloop.agents.context import Context
from edgeloop.agents.metrics import AgentMetrics
from edgeloop.agents.records import Out
from edgeloop.agents.settings import AgentsSettings
from edgeloop.core.settings import KafkaSettings, RegistrySettings
from tests.unit.agents_support import book, frame, inference, raw


def _context() -> tuple[Context, list[Out]]:
    ctx = Context(AgentsSettings(), KafkaSettings(), RegistrySettings(), AgentMetrics())
    ctx.book = book()
    produced: list[Out] = []

    async def produce(outputs: Sequence[Out]) -> None:
        produced.extend(outputs)

    ctx.produce = produce  # type: ignore[method-assign]
    return ctx, produced


def test_a_failing_batch_is_dead_lettered_not_raised() -> None:
    ctx, produced = _context()
    batch = [raw(frame("InferenceEvent", inference("d", s)), "d", offset=s) for s in (1, 2)]

    async def body() -> None:
        raise RuntimeError("a bug in a step")

    asyncio.run(ctx.guarded("enrich", batch, body))  # returns: Faust never sees it
    assert [o.topic for o in produced] == ["edge.inference.dlq.v1"] * 2
    dead = [ctx.book.decode(o.value)[1] for o in produced]  # type: ignore[union-attr]
    assert {d["reason"] for d in dead} == {"internal_error"}
    assert [d["source"] for d in dead] == [
        "kafka:edge.inference.v1/0/1",
        "kafka:edge.inference.v1/0/2",
    ]
    assert "a bug in a step" in dead[0]["detail"]
    assert ctx.metrics.dlq.labels("enrich", "internal_error")._value.get() == 2


def test_cancellation_still_propagates() -> None:
    # A worker shutting down must stop, not dead-letter the batch it was on.
    ctx, produced = _context()

    async def body() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(ctx.guarded("enrich", [], body))
    assert produced == []


def test_a_hole_the_broker_cannot_serve_hands_over_what_was_read_and_moves_on() -> None:
    """A kill run on Tansu: a one-offset hole the broker never served was retried for good
    and the enrich stage stopped. Now the records read before the unservable offset reach
    the stage, the rest is logged and counted as lost, and the stage goes on."""
    from edgeloop.agents.backfill import HoleUnreadableError
    from edgeloop.agents.offset_ledger import Hole

    ctx, _ = _context()
    got = [raw(frame("InferenceEvent", inference("d", s)), "d", offset=s) for s in (3, 4)]
    calls = 0

    async def read(hole: Hole) -> list:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        raise HoleUnreadableError("nothing at 5", records=got, position=5)

    ctx._read_hole = read  # type: ignore[method-assign]
    handed: list[int] = []

    async def body(batch: list) -> None:  # type: ignore[type-arg]
        handed.extend(r.offset for r in batch)

    hole = Hole("edge.inference.v1", 0, 3, 9)
    asyncio.run(asyncio.wait_for(ctx.fill_holes("enrich", [hole], body), 10))
    assert calls == 1 and handed == [3, 4]
    assert ctx.metrics.holes_unread.labels("enrich", "edge.inference.v1")._value.get() == 1
