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
