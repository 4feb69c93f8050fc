"""Records Faust takes out of a partition's flow reach the stage all the same.

After a rebalance faust-streaming can skip a run of a partition's records and go on with
later ones (the kill test lost 56 requests that way on Tansu under load: the group's
commit stayed at the run's start, the survivor answered everything after it). Here the
stage's stream is handed a partition's real records with such a run taken out, as Faust
did; the records come from a real broker, and the run must reach the stage's body,
read from the broker, before the stream's batch is acknowledged."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from faust.types import TP

from edgeloop.agents.app import _AgentFactory
from edgeloop.agents.backfill import HoleReadError, read_hole
from edgeloop.agents.context import Context
from edgeloop.agents.metrics import AgentMetrics
from edgeloop.agents.offset_ledger import Hole
from edgeloop.agents.records import Raw
from edgeloop.agents.settings import AgentsSettings
from edgeloop.core.settings import KafkaSettings, RegistrySettings
from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.ports import free_port
from tests.integration.test_topic_reader import create

pytestmark = pytest.mark.integration


async def topic_with(bootstrap: str, count: int, partitions: int = 2) -> tuple[str, list[int]]:
    """A new topic holding `count` records in partition 1; their offsets."""
    topic = f"holes-{uuid.uuid4().hex[:8]}"
    await create(bootstrap, topic, partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, f"r{i}".encode(), key=b"dev", partition=1)
            for i in range(count)
        ]
        offsets = [(await f).offset for f in futures]
    finally:
        await producer.stop()
    return topic, offsets


@dataclass
class _Message:
    value: bytes
    key: bytes
    topic: str
    partition: int
    offset: int


@dataclass
class _Event:
    message: _Message


class FaustLikeStream:
    """Hands out batches as Faust's `take_events` does; a batch counts as acknowledged
    once the consumer asks for the next one (Faust acks after the body returns)."""

    def __init__(self, batches: list[list[Raw]]) -> None:
        self.batches = batches
        self.acked: list[int] = []  # offsets, in the order their batch was acknowledged

    async def take_events(self, _max: int, _within: float) -> AsyncIterator[list[_Event]]:
        for batch in self.batches:
            yield [_Event(_Message(r.value, r.key or b"", r.topic, r.partition, r.offset))
                   for r in batch]  # fmt: skip
            self.acked.extend(r.offset for r in batch)


class OneAgentApp:
    """Takes the agent loop `_AgentFactory` registers; its consumer holds the commit."""

    def __init__(self, committed: dict[TP, int]) -> None:
        self.consumer = type("Consumer", (), {"_committed_offset": committed})()
        self.loop: Callable[[Any], Any] | None = None

    def agent(self, _channel: Any, **_kw: Any) -> Callable[[Any], Any]:
        def register(fn: Callable[[Any], Any]) -> Any:
            self.loop = fn
            return fn

        return register


async def run_stage(
    bootstrap: str, topic: str, batches: list[list[Raw]], committed: int
) -> tuple[list[int], FaustLikeStream, list[int]]:
    app = OneAgentApp({TP(topic, 1): committed})
    ctx = Context(AgentsSettings(), KafkaSettings(bootstrap=bootstrap), RegistrySettings(),
                  AgentMetrics())  # fmt: skip
    ctx.app = app
    ctx.ready.set()
    handed: list[int] = []
    acked_when_handed: list[int] = []
    stream = FaustLikeStream(batches)

    async def body(batch: list[Raw]) -> None:
        handed.extend(r.offset for r in batch)
        acked_when_handed.append(len(stream.acked))

    _AgentFactory(app, ctx, lambda name: name)(topic, "enrich", body)
    assert app.loop is not None
    await app.loop(stream)
    return handed, stream, acked_when_handed


def as_raws(topic: str, offsets: list[int]) -> list[Raw]:
    return [Raw(f"r{i}".encode(), b"dev", topic, 1, o) for i, o in enumerate(offsets)]


async def test_a_run_faust_skipped_mid_stream_reaches_the_stage_before_the_ack(
    kafka_broker: KafkaBroker,
) -> None:
    topic, offsets = await topic_with(kafka_broker.bootstrap, 60)
    raws = as_raws(topic, offsets)
    # Faust handed 0..19, dropped 20..47, went on with 48..59.
    batches = [raws[:20], raws[48:]]
    handed, stream, acked_when = await run_stage(
        kafka_broker.bootstrap, topic, batches, committed=offsets[0]
    )
    # Every record, in offset order: the skipped run before the batch that revealed it
    # (the control step skips an offset at or below the last one it applied, so a run
    # handed after its batch was lost to it).
    assert handed == offsets
    # The run was handed while the second batch was still unacknowledged.
    assert acked_when == [0, 20, 20]
    assert stream.acked == offsets[:20] + offsets[48:]


async def test_a_run_skipped_inside_a_batch_is_handed_between_its_neighbours(
    kafka_broker: KafkaBroker,
) -> None:
    """A batch with records on both sides of a skipped run: handing the run first made
    the control step (which skips offsets at or below the last one applied) drop the
    batch's records before it."""
    topic, offsets = await topic_with(kafka_broker.bootstrap, 60)
    raws = as_raws(topic, offsets)
    batches = [raws[:20], raws[20:25] + raws[40:]]  # 25..39 dropped inside the batch
    handed, _, _ = await run_stage(kafka_broker.bootstrap, topic, batches, committed=offsets[0])
    assert handed == offsets


async def test_a_partition_taken_over_from_a_dead_worker_is_read_from_its_commit(
    kafka_broker: KafkaBroker,
) -> None:
    # The kill test's case: the group committed offset 10; after the rebalance Faust's
    # first records of the partition were 35.., the ones between were fetched and lost.
    topic, offsets = await topic_with(kafka_broker.bootstrap, 50)
    raws = as_raws(topic, offsets)
    handed, _, _ = await run_stage(
        kafka_broker.bootstrap, topic, [raws[35:]], committed=offsets[10]
    )
    assert sorted(handed) == offsets[10:]


async def test_reading_a_hole_returns_exactly_its_offsets(kafka_broker: KafkaBroker) -> None:
    topic, offsets = await topic_with(kafka_broker.bootstrap, 30)
    got = await read_hole(kafka_broker.bootstrap, Hole(topic, 1, offsets[5], offsets[17]))
    assert [r.offset for r in got] == offsets[5:17]
    assert [r.value for r in got] == [f"r{i}".encode() for i in range(5, 17)]
    assert all(r.topic == topic and r.partition == 1 and r.key == b"dev" for r in got)


async def test_offsets_past_the_high_watermark_read_as_nothing_without_waiting(
    kafka_broker: KafkaBroker,
) -> None:
    """A hole the broker holds no records for must not stop the stage: before, the read
    waited for offsets that never came and the stage retried it for good (a kill run on
    Tansu stopped enriching this way)."""
    topic, offsets = await topic_with(kafka_broker.bootstrap, 5)
    # Partition 0 holds nothing; partition 1 ends at its last offset.
    assert await read_hole(kafka_broker.bootstrap, Hole(topic, 0, 0, 3), timeout_s=20) == []
    tail = await read_hole(
        kafka_broker.bootstrap, Hole(topic, 1, offsets[3], offsets[-1] + 5), timeout_s=20
    )
    assert [r.offset for r in tail] == offsets[3:]


async def test_a_hole_on_a_broker_that_is_down_is_a_retriable_error() -> None:
    """The stage retries it (Context.retry) until the broker is back, as a produce."""
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises((HoleReadError, KafkaConnectionError)) as err:
        await read_hole(nobody, Hole("edge.inference.v1", 0, 0, 3), timeout_s=2)
    assert isinstance(err.value, KafkaError) or err.value.retriable
