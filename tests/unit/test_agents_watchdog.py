"""A source partition left assigned but unread after a rebalance (a faust-streaming
0.15.3 race) is found by the lag watchdog, put back into the consumer's active set and
re-seeked to its committed offset."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edgeloop.agents.context import Context
from edgeloop.agents.metrics import AgentMetrics
from edgeloop.agents.settings import AgentsSettings
from edgeloop.core.settings import KafkaSettings, RegistrySettings


class _TP:
    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition


class _Consumer:
    """Faust's consumer as far as the watchdog sees it."""

    def __init__(self, tps: list[_TP]) -> None:
        self.tps = tps
        self._read_offset: dict[Any, int | None] = dict.fromkeys(tps, 9)
        self._paused_partitions = set(tps)  # the bug: out of the active set
        self._buffered_partitions: set[Any] = set()
        self.active: set[Any] = set()
        self.flow_active = True

    def assignment(self) -> set[Any]:
        return set(self.tps)

    def highwater(self, tp: Any) -> int:
        return 100

    def _get_active_partitions(self) -> set[Any]:
        return self.active

    def resume_partitions(self, tps: set[Any]) -> None:
        self.active |= tps
        self._paused_partitions -= tps


def test_a_stalled_source_partition_is_resumed_and_counted() -> None:
    stalled, changelog = _TP("edge.offload.v1", 3), _TP("x-dedupe-offload-changelog", 3)
    consumer = _Consumer([stalled, changelog])
    ctx = Context(AgentsSettings(stall_s=15), KafkaSettings(), RegistrySettings(), AgentMetrics())
    ctx.app = type("App", (), {"consumer": consumer})()
    sources = frozenset({"edge.offload.v1"})
    ctx.update_lag(sources, now=0.0)
    ctx.update_lag(sources, now=10.0)
    assert consumer.active == set()  # behind, but not for long enough yet
    ctx.update_lag(sources, now=16.0)
    assert consumer.active == {stalled}  # changelogs are Faust's recovery's business
    assert ctx.metrics.stalls.labels("edge.offload.v1")._value.get() == 1
    assert ctx.metrics.lag.labels("edge.offload.v1", "3")._value.get() == 90


def test_a_partition_that_moves_is_left_alone() -> None:
    tp = _TP("edge.inference.v1", 0)
    consumer = _Consumer([tp])
    ctx = Context(AgentsSettings(stall_s=15), KafkaSettings(), RegistrySettings(), AgentMetrics())
    ctx.app = type("App", (), {"consumer": consumer})()
    for step in range(10):
        consumer._read_offset[tp] = 10 + step  # reading, just behind
        ctx.update_lag(frozenset({"edge.inference.v1"}), now=step * 5.0)
    assert consumer.active == set()


class _Thread:
    """Faust's consumer thread: runs calls on the aiokafka consumer."""

    def __init__(self, committed: int | None) -> None:
        self.committed = committed

    def _ensure_consumer(self) -> Any:
        committed = self.committed

        class _Aio:
            async def committed(self, tp: Any) -> int | None:
                return committed

        return _Aio()

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        return await fun(*args)


class _SeekingConsumer(_Consumer):
    """In the stalls seen, Faust had the partition active: only a seek revives it."""

    def __init__(self, tps: list[_TP], committed: int | None) -> None:
        super().__init__(tps)
        self.active = set(tps)
        self._paused_partitions = set()
        self._thread = _Thread(committed)
        self.seeks: list[tuple[str, int, int]] = []

    async def earliest_offsets(self, *tps: Any) -> dict[Any, int]:
        return dict.fromkeys(tps, 4)

    async def seek_wait(self, offsets: dict[Any, int]) -> None:
        self.seeks += [(tp.topic, tp.partition, o) for tp, o in offsets.items()]


@pytest.mark.parametrize(("committed", "expected"), [(42, 42), (None, 4)])
async def test_a_stalled_partition_is_seeked_to_its_committed_offset(
    committed: int | None, expected: int
) -> None:
    tp = _TP("edge.offload.v1", 2)
    consumer = _SeekingConsumer([tp], committed)
    ctx = Context(AgentsSettings(stall_s=0.01), KafkaSettings(), RegistrySettings(), AgentMetrics())
    ctx.app = type("App", (), {"consumer": consumer})()
    sources = frozenset({"edge.offload.v1"})
    await ctx.watch_lag(sources)
    assert consumer.seeks == []  # first sight: not stalled yet
    await asyncio.sleep(0.02)
    await ctx.watch_lag(sources)
    # committed offset, or the partition's start when the group never committed it
    assert consumer.seeks == [("edge.offload.v1", 2, expected)]
    assert ctx.metrics.stalls.labels("edge.offload.v1")._value.get() == 1
