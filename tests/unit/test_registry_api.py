"""Request validation of the embedded registry: bad input gets Confluent's 4xx codes.

The app runs in-process over real HTTP; its store is never opened, so these requests
are answered before any Kafka write (which is what validation must guarantee).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from edgeloop.core.errors import RegistryError
from edgeloop.schemas.registry import api
from edgeloop.schemas.registry.registry import Registry, parse_level, parse_request
from edgeloop.schemas.registry.service import Metrics, build_app
from edgeloop.schemas.registry.state import encode, schema_key, schema_value
from edgeloop.schemas.registry.store import SchemaLog

A = '{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}'


@pytest.fixture
def registry() -> Registry:
    store = SchemaLog("127.0.0.1:1", "_schemas")
    store.state.apply(encode(schema_key("s", 1, "p")), encode(schema_value("s", 1, 1, A)))
    return Registry(store)


@pytest.fixture
async def http(registry: Registry) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(build_app(registry, Metrics(registry))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def error(response: object) -> tuple[int, int]:
    doc = await response.json(content_type=None)  # type: ignore[attr-defined]
    return response.status, doc["error_code"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ('{"schema": "{not json"}', api.INVALID_SCHEMA),
        ('{"schema": "{\\"type\\": \\"record\\"}"}', api.INVALID_SCHEMA),
        ('{"schema": 5}', api.INVALID_SCHEMA),
        ('{"schema": "\\"int\\"", "schemaType": "PROTOBUF"}', api.INVALID_SCHEMA),
        (
            '{"schema": "\\"int\\"", "references": [{"name": "x", "subject": "y", "version": 1}]}',
            api.INVALID_SCHEMA,
        ),
        ("[]", api.INVALID_SCHEMA),
    ],
)
async def test_invalid_schemas_get_42201(http: TestClient, body: str, code: int) -> None:
    response = await http.post("/subjects/s/versions", data=body)
    assert await error(response) == (422, code)
    assert response.content_type == api.CONTENT_TYPE


async def test_a_body_that_is_not_json_is_400(http: TestClient) -> None:
    assert await error(await http.post("/subjects/s/versions", data="{")) == (400, 400)


@pytest.mark.parametrize("version", ["0", "-2", "abc", "2147483648", "1.5"])
async def test_invalid_versions_get_42202(http: TestClient, version: str) -> None:
    assert await error(await http.get(f"/subjects/s/versions/{version}")) == (422, 42202)


@pytest.mark.parametrize("body", ['{"compatibility": "SIDEWAYS"}', '{"level": "FULL"}', "7"])
async def test_invalid_compatibility_gets_42203(http: TestClient, body: str) -> None:
    assert await error(await http.put("/config/s", data=body)) == (422, 42203)


async def test_unknown_route_is_404_with_an_error_code(http: TestClient) -> None:
    assert await error(await http.get("/no/such/route")) == (404, 404)


async def test_reads_from_state(http: TestClient) -> None:
    response = await http.get("/subjects/s/versions/latest")
    assert response.status == 200
    assert await response.json(content_type=None) == {
        "subject": "s",
        "version": 1,
        "id": 1,
        "schema": A,
    }
    assert await (await http.get("/schemas/ids/1")).json(content_type=None) == {"schema": A}
    assert await (await http.get("/")).json(content_type=None) == {}
    assert await (await http.get("/schemas/types")).json(content_type=None) == ["AVRO"]
    verbose = await http.post(
        "/compatibility/subjects/s/versions/latest?verbose=true",
        data=json.dumps(
            {"schema": '{"type":"record","name":"A","fields":[{"name":"x","type":"string"}]}'}
        ),
    )
    doc = await verbose.json(content_type=None)
    assert doc["is_compatible"] is False
    assert any("TYPE_MISMATCH" in m for m in doc["messages"])


def test_registry_lookups_name_the_missing_thing(registry: Registry) -> None:
    with pytest.raises(RegistryError) as subject:
        registry.versions("nope")
    assert subject.value.error_code == api.SUBJECT_NOT_FOUND
    assert subject.value.status == 404
    with pytest.raises(RegistryError) as version:
        registry.version("s", 9)
    assert version.value.error_code == api.VERSION_NOT_FOUND
    with pytest.raises(RegistryError) as schema:
        registry.schema_by_id(42)
    assert schema.value.error_code == api.SCHEMA_NOT_FOUND
    with pytest.raises(RegistryError) as lookup:
        registry.lookup("s", parse_request({"schema": '"string"'}))
    assert lookup.value.error_code == api.SCHEMA_NOT_FOUND


def test_parse_helpers() -> None:
    assert api.parse_version("latest") == api.LATEST == api.parse_version("-1")
    assert api.parse_version("3") == 3
    assert parse_level("full_transitive").value == "FULL_TRANSITIVE"
    with pytest.raises(RegistryError) as bad:
        parse_level(None)
    assert bad.value.error_code == api.INVALID_COMPATIBILITY_LEVEL
    assert not bad.value.retriable
