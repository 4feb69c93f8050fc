"""Both embedded Kafka flavours carry records, and say truthfully what they support."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

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
    # Measured: Tansu 0.6 answers InitProducerId with UnknownError; Apache Kafka grants it.
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


async def test_storage_tool_formats_with_a_cluster_id_that_starts_with_a_dash(
    tmp_path: Path, kafka_cache: Path
) -> None:
    """The real `kafka.tools.StorageTool` accepts a dash-led id in the launcher's argv
    (the old `-t <id>` spelling failed: "argument --cluster-id/-t: expected one argument")."""
    import base64

    from edgeloop.infra import kafka_jvm
    from edgeloop.infra.ports import free_ports

    dash_id = base64.urlsafe_b64encode(b"\xf8" + bytes(range(1, 16))).decode().rstrip("=")
    assert dash_id.startswith("-")
    java = kafka_jvm.find_java()
    classpath = await kafka_jvm.kafka_classpath(kafka_cache)
    port, controller = free_ports(2)
    props = tmp_path / "server.properties"
    props.write_text(
        kafka_jvm.render_server_properties(
            data_dir=tmp_path / "data", port=port, controller_port=controller
        )
    )
    proc = await asyncio.create_subprocess_exec(
        java, *kafka_jvm.jvm_options(128), "-cp", classpath, "kafka.tools.StorageTool",
        *kafka_jvm.storage_format_argv(dash_id, props),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    meta = (tmp_path / "data" / "meta.properties").read_text()
    assert f"cluster.id={dash_id}" in meta
