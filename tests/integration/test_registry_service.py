"""The embedded registry as users run it: `python -m edgeloop registry` processes on a real
Kafka-protocol broker (Tansu and Apache Kafka), driven over HTTP by our client and by
confluent-kafka's. Every test uses its own `_schemas` topic, so tests share one broker.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeloop.core.errors import RegistryError
from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.schemas.registry import api
from edgeloop.schemas.registry.client import RegistryClient

# `kafka_broker` (tests/conftest.py) runs each test on Tansu and on Apache Kafka.
pytestmark = pytest.mark.integration


@pytest.fixture
def topic() -> str:
    return f"_schemas-{uuid.uuid4().hex[:8]}"


def registry(broker: KafkaBroker, topic: str, workdir: Path) -> RegistryProcess:
    return RegistryProcess(workdir, broker.bootstrap, topic=topic)


def record(name: str, *fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "test.v1", "fields": list(fields)}


ID = {"name": "id", "type": "string"}
NOTE = {"name": "note", "type": ["null", "string"], "default": None}
UNIT = {"name": "unit", "type": "string"}


async def stop_cleanly(proc: RegistryProcess) -> None:
    # SIGTERM must end the service through its graceful path (exit status 0).
    child = proc.process
    assert child is not None
    assert await child.stop() == 0, f"registry exited badly; see {proc.log_file}"


async def test_schemas_survive_a_restart(
    kafka_broker: KafkaBroker, topic: str, tmp_path: Path
) -> None:
    proc = registry(kafka_broker, topic, tmp_path / "a")
    await proc.start()
    try:
        async with RegistryClient(proc.url) as client:
            first = await client.register("r-value", record("R", ID))
            second = await client.register("r-value", record("R", ID, NOTE))
            other = await client.register("o-value", record("O", ID))
            assert await client.register("r-value", record("R", ID)) == first
            await client.set_compatibility("FULL_TRANSITIVE", "r-value")
    finally:
        await stop_cleanly(proc)

    await proc.start()  # a fresh process: everything it knows comes from the topic
    try:
        async with RegistryClient(proc.url) as client:
            assert (await client.version("r-value", 1)).id == first
            latest = await client.version("r-value")
            assert (latest.version, latest.id) == (2, second)
            assert (await client.version("o-value")).id == other
            assert json.loads(await client.schema(other)) == record("O", ID)
            assert await client.compatibility("r-value") == "FULL_TRANSITIVE"
            assert sorted(await client.subjects()) == ["o-value", "r-value"]
            # Ids continue after the highest one replayed; nothing is handed out twice.
            fresh = await client.register("n-value", record("N", ID))
            assert fresh not in (first, second, other)
    finally:
        await stop_cleanly(proc)


async def test_two_instances_agree_on_ids(
    kafka_broker: KafkaBroker, topic: str, tmp_path: Path
) -> None:
    a = registry(kafka_broker, topic, tmp_path / "a")
    b = registry(kafka_broker, topic, tmp_path / "b")
    await asyncio.gather(a.start(), b.start())
    try:
        async with RegistryClient(a.url) as ca, RegistryClient(b.url) as cb:
            await ca.set_compatibility("NONE", "contested")
            # Different schemas registered at the same time on both instances.
            on_a = [ca.register(f"a{i}-value", record(f"A{i}", ID)) for i in range(5)]
            on_b = [cb.register(f"b{i}-value", record(f"B{i}", ID)) for i in range(5)]
            # The same schema under two subjects, one on each instance: one id.
            shared = [
                ca.register("s1-value", record("S", ID)),
                cb.register("s2-value", record("S", ID)),
            ]
            # Two instances racing for the next version of one subject.
            contested = [
                ca.register("contested", record("C1", ID)),
                cb.register("contested", record("C2", ID)),
            ]
            ids = await asyncio.gather(*on_a, *on_b, *shared, *contested)
        distinct = ids[:10]
        assert len(set(distinct)) == 10, ids
        assert ids[10] == ids[11]
        assert ids[10] not in distinct
        assert len({*ids[:11], ids[12], ids[13]}) == 13

        views = []
        for url in (a.url, b.url):
            async with RegistryClient(url) as fresh:  # no cache: ask the instance itself
                subjects = sorted(await fresh.subjects())
                versions = {
                    s: [
                        (v.version, v.id)
                        for v in [await fresh.version(s, n) for n in await fresh.versions(s)]
                    ]
                    for s in subjects
                }
                texts = {i: json.loads(await fresh.schema(i)) for i in set(ids)}
                views.append((subjects, versions, texts))
        assert views[0] == views[1]
        _, versions, texts = views[0]
        assert [v for v, _ in versions["contested"]] == [1, 2]
        assert {texts[i]["name"] for i in ids[12:]} == {"C1", "C2"}
        assert texts[ids[0]]["name"] == "A0"
        assert texts[ids[5]]["name"] == "B0"
    finally:
        await asyncio.gather(stop_cleanly(a), stop_cleanly(b))


async def test_incompatible_change_is_refused_with_409(
    kafka_broker: KafkaBroker, topic: str, tmp_path: Path
) -> None:
    async with registry(kafka_broker, topic, tmp_path) as proc, RegistryClient(proc.url) as client:
        await client.set_compatibility("BACKWARD", "t-value")
        await client.register("t-value", record("T", ID))
        verdict = await client.check("t-value", record("T", ID, UNIT))
        assert not verdict.is_compatible
        assert any(
            "unit" in m and "READER_FIELD_MISSING_DEFAULT_VALUE" in m for m in verdict.messages
        ), verdict.messages
        with pytest.raises(RegistryError) as refused:
            await client.register("t-value", record("T", ID, UNIT))
        assert refused.value.status == 409
        assert refused.value.error_code == api.INCOMPATIBLE_SCHEMA
        assert "unit" in str(refused.value)
        assert await client.versions("t-value") == [1]
        # The compatible change goes through.
        assert (await client.check("t-value", record("T", ID, NOTE))).is_compatible
        await client.register("t-value", record("T", ID, NOTE))
        assert await client.versions("t-value") == [1, 2]


async def test_soft_delete_then_register_again(
    kafka_broker: KafkaBroker, topic: str, tmp_path: Path
) -> None:
    async with (
        registry(kafka_broker, topic, tmp_path) as proc,
        RegistryClient(proc.url) as client,
        httpx.AsyncClient(base_url=proc.url) as http,
    ):
        v1 = await client.register("d-value", record("D", ID))
        v2 = await client.register("d-value", record("D", ID, NOTE))
        assert await client.delete_version("d-value", 2) == 2
        assert await client.versions("d-value") == [1]
        again = await http.delete("/subjects/d-value/versions/2")
        assert again.json()["error_code"] == api.SCHEMA_VERSION_SOFT_DELETED
        assert await client.delete_subject("d-value") == [1]
        with pytest.raises(RegistryError) as gone:
            await client.versions("d-value")
        assert gone.value.error_code == api.SUBJECT_NOT_FOUND
        assert "d-value" not in await client.subjects()
        listed = (await http.get("/subjects", params={"deleted": "true"})).json()
        assert "d-value" in listed
        twice = await http.delete("/subjects/d-value")
        assert twice.json()["error_code"] == api.SUBJECT_SOFT_DELETED
        # Soft-deleted schemas still resolve by id (data written with them stays readable).
        assert json.loads(await client.schema(v2)) == record("D", ID, NOTE)
        # Registering the same schema again: same id, a new version number.
        assert await client.register("d-value", record("D", ID)) == v1
        assert await client.versions("d-value") == [3]
        assert (await client.version("d-value")).id == v1


async def test_permanent_delete(kafka_broker: KafkaBroker, topic: str, tmp_path: Path) -> None:
    async with (
        registry(kafka_broker, topic, tmp_path) as proc,
        RegistryClient(proc.url) as client,
        httpx.AsyncClient(base_url=proc.url) as http,
    ):
        gone = await client.register("p-value", record("P", ID))
        kept = await client.register("q-value", record("Q", ID))
        early = await http.delete("/subjects/p-value", params={"permanent": "true"})
        assert early.status_code == 404
        assert early.json()["error_code"] == api.SUBJECT_NOT_SOFT_DELETED
        await client.delete_subject("p-value")
        assert await client.delete_subject("p-value", permanent=True) == [1]
        listed = (await http.get("/subjects", params={"deleted": "true"})).json()
        assert listed == ["q-value"]
        missing = await http.get(f"/schemas/ids/{gone}")
        assert missing.json()["error_code"] == api.SCHEMA_NOT_FOUND
        assert (await client.version("q-value")).id == kept
        # The subject starts over from version 1.
        await client.register("p-value", record("P2", ID))
        assert await client.versions("p-value") == [1]
    # A restarted instance replays the deletes the same way.
    async with (
        registry(kafka_broker, topic, tmp_path / "again") as proc,
        httpx.AsyncClient(base_url=proc.url) as http,
    ):
        assert sorted((await http.get("/subjects", params={"deleted": "true"})).json()) == [
            "p-value",
            "q-value",
        ]
        assert (await http.get(f"/schemas/ids/{gone}")).status_code == 404


async def test_confluent_kafka_client_and_avro_serializer(
    kafka_broker: KafkaBroker, topic: str, tmp_path: Path
) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import (
        AvroDeserializer,
        AvroSerializer,
    )
    from confluent_kafka.serialization import MessageField, SerializationContext

    schema = json.dumps(record("Reading", ID, {"name": "value", "type": "double"}, NOTE))

    def exercise(url: str) -> tuple[int, bytes, Any, Any]:
        # confluent-kafka's client is synchronous; it runs in a worker thread.
        client = SchemaRegistryClient({"url": url})
        schema_id = client.register_schema("readings-value", Schema(schema, "AVRO"))
        assert client.get_schema(schema_id).schema_str is not None
        latest = client.get_latest_version("readings-value")
        assert (latest.schema_id, latest.version) == (schema_id, 1)
        assert client.lookup_schema("readings-value", Schema(schema, "AVRO")).version == 1
        assert client.get_subjects() == ["readings-value"]
        assert client.set_compatibility("readings-value", "FULL") == {"compatibility": "FULL"}
        ctx = SerializationContext("readings", MessageField.VALUE)
        serialize = AvroSerializer(client, schema)
        payload = serialize({"id": "dev-1", "value": 21.5, "note": None}, ctx)
        # A fresh client: the deserializer must fetch the schema by id from the registry.
        reader = AvroDeserializer(SchemaRegistryClient({"url": url}))
        return schema_id, payload, reader(payload, ctx), client.get_compatibility("readings-value")

    async with registry(kafka_broker, topic, tmp_path) as proc:
        schema_id, payload, decoded, level = await asyncio.to_thread(exercise, proc.url)
    assert payload[0] == 0
    assert int.from_bytes(payload[1:5], "big") == schema_id
    assert decoded == {"id": "dev-1", "value": 21.5, "note": None}
    assert level == "FULL"


async def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        records: list[tuple[bytes | None, bytes | None]] = []
        async with asyncio.timeout(30):
            while await consumer.position(tp) < end:
                for batch in (await consumer.getmany(tp, timeout_ms=500)).values():
                    records += [(r.key, r.value) for r in batch]
        return records
    finally:
        await consumer.stop()


async def test_kill_9_loses_nothing_and_a_dead_writers_void_record_is_swept(
    kafka_broker: KafkaBroker, topic: str, tmp_path: Path
) -> None:
    from aiokafka import AIOKafkaProducer

    a = registry(kafka_broker, topic, tmp_path / "a")
    b = registry(kafka_broker, topic, tmp_path / "b")
    await asyncio.gather(a.start(), b.start())
    try:
        async with RegistryClient(a.url) as client:
            kept = await client.register("k-value", record("K", ID))
        await a.kill()  # no shutdown path at all
        # A writer that lost a race and died before cleaning up: its proposal for the
        # version and id that "K" already holds sits in the log, void.
        loser = json.dumps(
            {
                "keytype": "SCHEMA",
                "subject": "k-value",
                "version": 1,
                "magic": 1,
                "proposal": "dead-writer",
            }
        ).encode()
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                topic,
                key=loser,
                value=json.dumps(
                    {
                        "subject": "k-value",
                        "version": 1,
                        "id": kept,
                        "schema": json.dumps(record("Ghost", ID)),
                        "deleted": False,
                    }
                ).encode(),
                partition=0,
            )
        finally:
            await producer.stop()
        await a.start()
        async with RegistryClient(a.url) as on_a, RegistryClient(b.url) as on_b:
            for client in (on_a, on_b):
                found = await client.version("k-value")
                assert (found.version, found.id) == (1, kept)
                assert json.loads(found.schema)["name"] == "K"
            assert await on_b.register("k2-value", record("K2", ID)) != kept
        # The restarted instance tombstoned the dead writer's record before serving.
        assert (loser, None) in await read_topic(kafka_broker.bootstrap, topic)
    finally:
        await asyncio.gather(a.stop(), b.stop())
