"""Both embedded Kafka flavours carry records, and say truthfully what they support."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from edgeloop.infra.kafka import KafkaBroker

pytestmark = pytest.mark.integration

KafkaFactory = Callable[[str], Awaitable[KafkaBroker]]


async def produce(
    bootstrap: str, topic: str, values: list[bytes], first_key: int = 0, **kwargs: object
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **kwargs)
    await producer.start()
    try:
        for i, value in enumerate(values, start=first_key):
            await producer.send_and_wait(topic, value, key=b"dev-%d" % (i % 3))
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int) -> dict[bytes, list[bytes]]:
    """`count` records, grouped by key in partition order (the order Kafka promises)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    by_key: dict[bytes, list[bytes]] = {}
    seen = 0
    try:
        while seen < count:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    by_key.setdefault(record.key, []).append(record.value)
                    seen += 1
    finally:
        await consumer.stop()
    return by_key


def keyed(values: list[bytes], first_key: int = 0) -> dict[bytes, list[bytes]]:
    """What `produce` sent, grouped the way `consume` returns it."""
    by_key: dict[bytes, list[bytes]] = {}
    for i, value in enumerate(values, start=first_key):
        by_key.setdefault(b"dev-%d" % (i % 3), []).append(value)
    return by_key


async def test_produce_and_consume(kafka_broker: KafkaBroker) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    values = [b"record-%d" % i for i in range(20)]
    await produce(kafka_broker.bootstrap, topic, values)
    # Tansu auto-creates topics with several partitions: order holds per key.
    assert await consume(kafka_broker.bootstrap, topic, len(values)) == keyed(values)


async def test_idempotence_detection_matches_the_broker(kafka_broker: KafkaBroker) -> None:
    # notes/trials.md: Tansu 0.6 refuses InitProducerId; Apache Kafka grants it.
    expected = {"tansu": False, "apache": True}[kafka_broker.flavor]
    assert kafka_broker.supports_idempotence is expected

    # And the flag is what a client experiences.
    topic = f"idem-{uuid.uuid4().hex[:8]}"
    try:
        await produce(kafka_broker.bootstrap, topic, [b"x"], enable_idempotence=True)
        worked = True
    except KafkaError:
        worked = False
    assert worked is expected


@pytest.mark.slow
async def test_broker_serves_again_after_kill_9(
    kafka_factory: KafkaFactory,
    kafka_flavor: str,
) -> None:
    broker = await kafka_factory(kafka_flavor)  # its own, not the shared session broker
    topic = f"t-{uuid.uuid4().hex[:8]}"
    values = [b"before-%d" % i for i in range(10)]
    await produce(broker.bootstrap, topic, values)
    pid = broker.pid
    await broker.kill()
    await broker.start()  # same ports; Apache reuses its log dir without reformatting
    assert broker.pid != pid
    await produce(broker.bootstrap, topic, [b"after"], first_key=len(values))
    # Apache Kafka keeps what it acknowledged; Tansu's memory storage starts empty.
    expected = [*values, b"after"] if kafka_flavor == "apache" else [b"after"]
    assert await consume(broker.bootstrap, topic, len(expected)) == keyed(
        expected, first_key=11 - len(expected)
    )
    assert broker.supports_idempotence is (kafka_flavor == "apache")
