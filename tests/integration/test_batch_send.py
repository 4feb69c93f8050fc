"""The worker's outputs sent as per-partition record batches (agents/batch_send.py) land
where aiokafka's own `send` puts them, all of them, in order per partition, on a real
broker: the tables' changelogs and every consumer downstream rely on a device's records
sharing one partition."""

from __future__ import annotations

import uuid
from collections import defaultdict
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from edgeloop.agents.batch_send import BatchSender, to_resend
from edgeloop.agents.changelog_tracking import ChangelogTracking, track_topics
from edgeloop.agents.records import Out
from edgeloop.infra.kafka import KafkaBroker
from tests.integration.test_topic_reader import create

pytestmark = pytest.mark.integration

PARTITIONS = 6


async def _read_all(bootstrap: str, topic: str, count: int) -> list[tuple[int, bytes, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got: list[tuple[int, bytes, bytes]] = []
        for _ in range(60):
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                got += [(tp.partition, r.key, r.value) for r in records if r.key and r.value]
            if len(got) >= count:
                break
        return got
    finally:
        await consumer.stop()


async def test_batches_land_where_send_puts_each_record_all_of_them_in_order(
    kafka_broker: KafkaBroker,
) -> None:
    bootstrap = kafka_broker.bootstrap
    ours, theirs = (f"batch-send-{uuid.uuid4().hex[:8]}-{side}" for side in ("ours", "theirs"))
    for topic in (ours, theirs):
        await create(bootstrap, topic, PARTITIONS)
    # 200 devices, 15 records each, interleaved; records large enough that one
    # partition's share spans several record batches (max_batch_size 16 KiB).
    keys = [f"dev-{d:03d}".encode() for d in range(200)]
    values = [(k, f"{k.decode()}-{i:02d}-".encode() + b"x" * 100) for i in range(15) for k in keys]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=16384)
    await producer.start()
    try:
        sender = BatchSender(producer)
        sent = await sender.send([Out(ours, k, v) for k, v in values])
        results = [await s.future for s in sent]
        assert to_resend(sent, results) == []
        assert len(sent) > PARTITIONS  # several batches per partition were needed
        futures = [await producer.send(theirs, v, key=k) for k, v in values]
        for f in futures:
            await f
    finally:
        await producer.stop()

    got_ours = await _read_all(bootstrap, ours, len(values))
    got_theirs = await _read_all(bootstrap, theirs, len(values))
    assert sorted(v for _, _, v in got_ours) == sorted(v for _, v in values)  # none lost
    assert len(got_ours) == len(values)  # none twice
    placed_ours = {k: p for p, k, _ in got_ours}
    placed_theirs = {k: p for p, k, _ in got_theirs}
    assert placed_ours == placed_theirs  # every key where `send` put it
    assert len(set(placed_ours.values())) == PARTITIONS
    per_key: dict[bytes, list[bytes]] = defaultdict(list)
    for _, k, v in got_ours:
        per_key[k].append(v)
    assert all(vs == sorted(vs) for vs in per_key.values())  # a device's order holds


async def test_unkeyed_records_are_sent_too(kafka_broker: KafkaBroker) -> None:
    topic = f"batch-send-{uuid.uuid4().hex[:8]}"
    await create(kafka_broker.bootstrap, topic, PARTITIONS)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    await producer.start()
    try:
        outputs = [Out(topic, None, b"dead-letter-%d" % i) for i in range(3)]
        outputs.append(Out(topic, b"dev-1", b"keyed"))
        sent = await BatchSender(producer).send(outputs)
        assert to_resend(sent, [await s.future for s in sent]) == []
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        values: list[bytes] = []
        for _ in range(40):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                values += [r.value for r in records if r.value]
            if len(values) >= 4:
                break
    finally:
        await consumer.stop()
    assert sorted(values) == sorted(o.value for o in outputs)


def _faust_key_partition(producer: AIOKafkaProducer, topic: str) -> int:
    # What Faust's `Producer.key_partition` calls for every table write (synchronously,
    # with no wait on metadata).
    return int(producer._partition(topic, None, None, None, b"dev-001", None))


async def test_a_changelog_created_after_the_producer_started_stays_in_its_metadata(
    kafka_broker: KafkaBroker,
) -> None:
    """A worker's table writes failed for its whole life (TypeError in Faust's
    `key_partition`) when its producer started before the changelog topics existed and
    then sent to a topic it did not know yet: aiokafka then refreshes only the topics
    it tracks. `track_topics` keeps the changelogs tracked."""
    bootstrap = kafka_broker.bootstrap
    name = f"track-{uuid.uuid4().hex[:8]}"
    changelog, output, later, absent = (
        f"{name}-{s}" for s in ("changelog", "out", "later", "absent")
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic in (changelog, output, later):
            await create(bootstrap, topic, 2)
        await producer.send_and_wait(output, b"x", key=b"dev-001")  # `output` now tracked alone
        await producer.client.force_metadata_update()
        with pytest.raises(TypeError):  # the fault: the changelog is not in the metadata
            _faust_key_partition(producer, changelog)

        assert await track_topics(producer, [changelog, absent]) == [absent]
        await producer.send_and_wait(later, b"y", key=b"dev-001")  # another new topic
        await producer.client.force_metadata_update()
        assert _faust_key_partition(producer, changelog) in (0, 1)
        # A topic that did not exist is not asked for (a broker would auto-create it).
        assert absent not in (await producer.client.fetch_all_metadata()).topics()
    finally:
        await producer.stop()


class _Table:
    def __init__(self, changelog: str) -> None:
        self.changelog_topic = SimpleNamespace(get_topic_name=lambda: changelog)


async def test_a_changelog_that_appears_after_start_is_tracked_at_the_next_tick(
    kafka_broker: KafkaBroker,
) -> None:
    """A changelog that did not exist when the worker started (declared late, or created
    by an operator) is tracked once it exists, not left failing every write."""
    bootstrap = kafka_broker.bootstrap
    name = f"retrack-{uuid.uuid4().hex[:8]}"
    changelog, output = f"{name}-changelog", f"{name}-out"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        # The worker's Faust app, as `ChangelogTracking` reads it: its tables and producer.
        app = SimpleNamespace(
            tables={"dedupe": _Table(changelog)},
            producer=SimpleNamespace(_ensure_producer=lambda: producer),
        )
        tracking = ChangelogTracking(app)
        await tracking.track()
        assert tracking.untracked == [changelog]
        await create(bootstrap, changelog, 2)
        await create(bootstrap, output, 2)
        await producer.send_and_wait(output, b"x", key=b"dev-001")  # restricts the metadata
        await tracking.track_again()
        assert tracking.untracked == []
        await producer.client.force_metadata_update()
        assert _faust_key_partition(producer, changelog) in (0, 1)
    finally:
        await producer.stop()
