"""The embedded registry answers as Confluent does on ordinary requests (issue 12, items
1 and 2), over HTTP and through confluent-kafka's `SchemaRegistryClient`, on both brokers.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest

from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.schemas.registry import api

pytestmark = pytest.mark.integration

# The example: the second text is the first with attributes in Java's order.
A = '{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}'
A_REORDERED = '{"name":"A","type":"record","fields":[{"type":"int","name":"x"}]}'
A_STRING = '{"type":"record","name":"A","fields":[{"name":"x","type":"string"}]}'


def registry(broker: KafkaBroker, workdir: Path) -> RegistryProcess:
    return RegistryProcess(workdir, broker.bootstrap, topic=f"_schemas-{uuid.uuid4().hex[:8]}")


async def test_a_reordered_schema_is_the_same_schema_over_http(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    async with (
        registry(kafka_broker, tmp_path) as proc,
        httpx.AsyncClient(base_url=proc.url) as http,
    ):
        first = await http.post("/subjects/a-value/versions", json={"schema": A})
        assert first.status_code == 200 and first.json()["id"] == 1
        found = await http.post("/subjects/a-value", json={"schema": A_REORDERED})
        assert found.status_code == 200, found.text
        assert (found.json()["id"], found.json()["version"]) == (1, 1)
        again = await http.post("/subjects/a-value/versions", json={"schema": A_REORDERED})
        assert again.json()["id"] == 1
        assert (await http.get("/subjects/a-value/versions")).json() == [1]
        # normalize=true also ignores custom property order and name qualification.
        props = {"type": "record", "name": "B", "namespace": "t", "fields": [], "a": 1, "b": 2}
        swapped = {"type": "record", "name": "t.B", "fields": [], "b": 2, "a": 1}
        one = await http.post(
            "/subjects/b-value/versions",
            json={"schema": json.dumps(props)},
            params={"normalize": "true"},
        )
        other = await http.post(
            "/subjects/b-value", json={"schema": json.dumps(swapped)}, params={"normalize": "true"}
        )
        assert other.status_code == 200, other.text
        assert other.json()["id"] == one.json()["id"]
        plain = await http.post("/subjects/b-value", json={"schema": json.dumps(swapped)})
        assert plain.json()["error_code"] == api.SCHEMA_NOT_FOUND


async def test_a_reordered_schema_through_confluent_kafkas_client(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    def exercise(url: str) -> tuple[int, tuple[int, int], int]:
        client = SchemaRegistryClient({"url": url})
        first = client.register_schema("a-value", Schema(A, "AVRO"))
        found = client.lookup_schema("a-value", Schema(A_REORDERED, "AVRO"))
        again = SchemaRegistryClient({"url": url}).register_schema(
            "a-value", Schema(A_REORDERED, "AVRO")
        )
        return first, (found.schema_id, found.version), again

    async with registry(kafka_broker, tmp_path) as proc:
        first, found, again = await asyncio.to_thread(exercise, proc.url)
    assert first == 1
    assert found == (1, 1)
    assert again == 1


async def test_deleting_a_subject_deletes_its_level_over_http(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    async with (
        registry(kafka_broker, tmp_path) as proc,
        httpx.AsyncClient(base_url=proc.url) as http,
    ):
        assert (await http.put("/config/c-value", json={"compatibility": "NONE"})).is_success
        assert (await http.post("/subjects/c-value/versions", json={"schema": A})).is_success
        assert (await http.delete("/subjects/c-value")).json() == [1]
        gone = await http.get("/config/c-value")
        assert (gone.status_code, gone.json()["error_code"]) == (
            404,
            api.SUBJECT_COMPATIBILITY_NOT_CONFIGURED,
        )
        permanent = await http.delete("/subjects/c-value", params={"permanent": "true"})
        assert permanent.json() == [1]
        assert (await http.get("/config/c-value")).status_code == 404
        # Created again: the global level (BACKWARD) applies, so int -> string is refused.
        assert (await http.post("/subjects/c-value/versions", json={"schema": A})).is_success
        refused = await http.post("/subjects/c-value/versions", json={"schema": A_STRING})
        assert (refused.status_code, refused.json()["error_code"]) == (
            409,
            api.INCOMPATIBLE_SCHEMA,
        )
    # A restarted instance replays the log to the same answer.
    async with (
        RegistryProcess(tmp_path / "again", kafka_broker.bootstrap, topic=proc.topic) as again,
        httpx.AsyncClient(base_url=again.url) as http,
    ):
        assert (await http.get("/config/c-value")).status_code == 404
        refused = await http.post("/subjects/c-value/versions", json={"schema": A_STRING})
        assert refused.status_code == 409


async def test_deleting_a_subject_deletes_its_level_through_confluent_kafkas_client(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    def exercise(url: str) -> tuple[int, int]:
        client = SchemaRegistryClient({"url": url})
        client.set_compatibility("c-value", "NONE")
        client.register_schema("c-value", Schema(A, "AVRO"))
        client.delete_subject("c-value")
        client.delete_subject("c-value", permanent=True)
        try:
            client.get_compatibility("c-value")
        except SchemaRegistryError as exc:
            missing = exc.error_code
        else:
            missing = 0
        client.register_schema("c-value", Schema(A, "AVRO"))
        try:
            client.register_schema("c-value", Schema(A_STRING, "AVRO"))
        except SchemaRegistryError as exc:
            return missing, exc.error_code
        return missing, 0

    async with registry(kafka_broker, tmp_path) as proc:
        missing, refused = await asyncio.to_thread(exercise, proc.url)
    assert missing == api.SUBJECT_COMPATIBILITY_NOT_CONFIGURED
    assert refused == api.INCOMPATIBLE_SCHEMA
