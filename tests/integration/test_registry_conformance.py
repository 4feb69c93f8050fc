"""The embedded registry answers as Confluent does on ordinary requests (issue 12, items
1 and 2), over HTTP and through confluent-kafka's `SchemaRegistryClient`, on both brokers.

The `registry` fixture is shared by the session, so each test uses its own subjects and
compares ids with the ones it got, never with literal numbers.
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


def subject(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}-value"


async def test_a_reordered_schema_is_the_same_schema_over_http(
    registry: RegistryProcess,
) -> None:
    a, b = subject("a"), subject("b")
    async with httpx.AsyncClient(base_url=registry.url) as http:
        first = await http.post(f"/subjects/{a}/versions", json={"schema": A})
        assert first.status_code == 200, first.text
        schema_id = first.json()["id"]
        found = await http.post(f"/subjects/{a}", json={"schema": A_REORDERED})
        assert found.status_code == 200, found.text
        assert (found.json()["id"], found.json()["version"]) == (schema_id, 1)
        again = await http.post(f"/subjects/{a}/versions", json={"schema": A_REORDERED})
        assert again.json()["id"] == schema_id
        assert (await http.get(f"/subjects/{a}/versions")).json() == [1]
        # normalize=true also ignores custom property order and name qualification.
        props = {"type": "record", "name": "B", "namespace": "t", "fields": [], "a": 1, "b": 2}
        swapped = {"type": "record", "name": "t.B", "fields": [], "b": 2, "a": 1}
        one = await http.post(
            f"/subjects/{b}/versions",
            json={"schema": json.dumps(props)},
            params={"normalize": "true"},
        )
        other = await http.post(
            f"/subjects/{b}", json={"schema": json.dumps(swapped)}, params={"normalize": "true"}
        )
        assert other.status_code == 200, other.text
        assert other.json()["id"] == one.json()["id"]
        plain = await http.post(f"/subjects/{b}", json={"schema": json.dumps(swapped)})
        assert plain.json()["error_code"] == api.SCHEMA_NOT_FOUND


async def test_a_reordered_schema_through_confluent_kafkas_client(
    registry: RegistryProcess,
) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    a = subject("a")

    b = subject("b")
    props = json.dumps(
        {"type": "record", "name": "B", "namespace": "t", "fields": [], "p": 1, "q": 2}
    )
    swapped = json.dumps({"type": "record", "name": "t.B", "fields": [], "q": 2, "p": 1})

    def exercise(url: str) -> tuple[int, tuple[int, int], int, int, int]:
        client = SchemaRegistryClient({"url": url})
        first = client.register_schema(a, Schema(A, "AVRO"))
        found = client.lookup_schema(a, Schema(A_REORDERED, "AVRO"))
        # A fresh client: nothing answered from its cache.
        again = SchemaRegistryClient({"url": url}).register_schema(a, Schema(A_REORDERED, "AVRO"))
        # normalize_schemas=True sends normalize=true on register and lookup.
        normalized = client.register_schema(b, Schema(props, "AVRO"), normalize_schemas=True)
        fresh = SchemaRegistryClient({"url": url})
        same = fresh.lookup_schema(b, Schema(swapped, "AVRO"), normalize_schemas=True).schema_id
        return first, (found.schema_id, found.version), again, normalized, same

    first, found, again, normalized, same = await asyncio.to_thread(exercise, registry.url)
    assert found == (first, 1)
    assert again == first
    assert same == normalized


async def test_deleting_a_subject_deletes_its_level_over_http(
    registry: RegistryProcess, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    c = subject("c")
    async with httpx.AsyncClient(base_url=registry.url) as http:
        assert (await http.put(f"/config/{c}", json={"compatibility": "NONE"})).is_success
        assert (await http.post(f"/subjects/{c}/versions", json={"schema": A})).is_success
        assert (await http.delete(f"/subjects/{c}")).json() == [1]
        gone = await http.get(f"/config/{c}")
        assert (gone.status_code, gone.json()["error_code"]) == (
            404,
            api.SUBJECT_COMPATIBILITY_NOT_CONFIGURED,
        )
        permanent = await http.delete(f"/subjects/{c}", params={"permanent": "true"})
        assert permanent.json() == [1]
        assert (await http.get(f"/config/{c}")).status_code == 404
        # Created again: the global level (BACKWARD) applies, so int -> string is refused.
        assert (await http.post(f"/subjects/{c}/versions", json={"schema": A})).is_success
        refused = await http.post(f"/subjects/{c}/versions", json={"schema": A_STRING})
        assert (refused.status_code, refused.json()["error_code"]) == (
            409,
            api.INCOMPATIBLE_SCHEMA,
        )
    # A second instance replays the shared log to the same answer.
    async with (
        RegistryProcess(tmp_path, kafka_broker.bootstrap, topic=registry.topic) as again,
        httpx.AsyncClient(base_url=again.url) as http,
    ):
        assert (await http.get(f"/config/{c}")).status_code == 404
        refused = await http.post(f"/subjects/{c}/versions", json={"schema": A_STRING})
        assert refused.status_code == 409


async def test_deleting_a_subject_deletes_its_level_through_confluent_kafkas_client(
    registry: RegistryProcess,
) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    c = subject("c")

    def exercise(url: str) -> tuple[int, int]:
        client = SchemaRegistryClient({"url": url})
        client.set_compatibility(c, "NONE")
        client.register_schema(c, Schema(A, "AVRO"))
        client.delete_subject(c)
        client.delete_subject(c, permanent=True)
        try:
            client.get_compatibility(c)
        except SchemaRegistryError as exc:
            missing = exc.error_code
        else:
            missing = 0
        client.register_schema(c, Schema(A, "AVRO"))
        try:
            client.register_schema(c, Schema(A_STRING, "AVRO"))
        except SchemaRegistryError as exc:
            return missing, exc.error_code
        return missing, 0

    missing, refused = await asyncio.to_thread(exercise, registry.url)
    assert missing == api.SUBJECT_COMPATIBILITY_NOT_CONFIGURED
    assert refused == api.INCOMPATIBLE_SCHEMA
