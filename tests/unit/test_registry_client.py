"""The registry client's contract: error mapping, retry policy, caching.

The HTTP side is httpx's MockTransport: these are properties of the client alone (the
integration tests drive it against the real registry process).
"""

from __future__ import annotations

import json

import httpx
import pytest

from edgeloop.core.errors import RegistryError, RegistryUnavailableError
from edgeloop.core.settings import RegistrySettings
from edgeloop.schemas.registry.client import RegistryClient

SCHEMA = {"type": "record", "name": "A", "fields": []}


def client(handler: httpx.MockTransport, attempts: int = 4) -> RegistryClient:
    return RegistryClient(
        "http://registry.test", transport=handler, backoff_s=0.0, attempts=attempts
    )


async def test_errors_carry_confluent_codes_and_4xx_is_not_retried() -> None:
    calls: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(422, json={"error_code": 42201, "message": "Invalid schema"})

    async with client(httpx.MockTransport(handle)) as registry:
        with pytest.raises(RegistryError) as caught:
            await registry.register("s", SCHEMA)
    assert (caught.value.status, caught.value.error_code) == (422, 42201)
    assert not caught.value.retriable
    assert "Invalid schema" in str(caught.value)
    assert calls == ["/subjects/s/versions"]


async def test_5xx_is_retried_then_succeeds() -> None:
    answers = [
        httpx.Response(503, text="busy"),
        httpx.Response(500, json={"error_code": 50002, "message": "timeout"}),
        httpx.Response(200, json={"id": 7}),
    ]

    def handle(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    async with client(httpx.MockTransport(handle)) as registry:
        assert await registry.register("s", SCHEMA) == 7
    assert answers == []


async def test_an_unreachable_registry_is_retriable_and_named() -> None:
    attempts = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        raise httpx.ConnectError("refused", request=request)

    async with client(httpx.MockTransport(handle), attempts=3) as registry:
        with pytest.raises(RegistryUnavailableError) as caught:
            await registry.schema(1)
    assert attempts == 3
    assert caught.value.retriable
    assert "registry.test" in str(caught.value)


async def test_ids_and_schemas_are_cached_and_deletes_forget_the_subject() -> None:
    calls: list[tuple[str, str]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.method == "POST":
            body = json.loads(request.content)
            assert body["schema"] == json.dumps(SCHEMA, separators=(",", ":"))
            assert request.headers["content-type"] == "application/vnd.schemaregistry.v1+json"
            return httpx.Response(200, json={"id": 3})
        if request.method == "DELETE":
            return httpx.Response(200, json=[1])
        return httpx.Response(200, json={"schema": "{}"})

    async with client(httpx.MockTransport(handle)) as registry:
        assert await registry.register("s", json.dumps(SCHEMA, indent=2)) == 3
        assert await registry.register("s", SCHEMA) == 3  # whitespace is not identity
        assert json.loads(await registry.schema(3)) == SCHEMA  # filled by register
        await registry.delete_subject("s")
        assert await registry.register("s", SCHEMA) == 3
    assert calls == [
        ("POST", "/subjects/s/versions"),
        ("DELETE", "/subjects/s"),
        ("POST", "/subjects/s/versions"),
    ]


async def test_subjects_are_url_encoded_and_settings_give_basic_auth() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[1, 2])

    settings = RegistrySettings(url="http://registry.test", username="u", password="p")
    registry = RegistryClient.from_settings(settings, transport=httpx.MockTransport(handle))
    async with registry:
        assert await registry.versions("a/b c") == [1, 2]
    assert seen[0].url.raw_path == b"/subjects/a%2Fb%20c/versions"
    assert seen[0].headers["authorization"].startswith("Basic ")
