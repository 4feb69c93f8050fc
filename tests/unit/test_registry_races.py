"""Registry writes when another instance gets there first.

`LogInMemory` stands in for the Kafka topic: a list of records applied in order to the
same state machine the real store uses. `rival` records are appended just before this
instance's next proposal lands, which is exactly the window a second instance races in.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from edgeloop.core.errors import RegistryError
from edgeloop.schemas.registry import api
from edgeloop.schemas.registry.registry import Registry, parse_request
from edgeloop.schemas.registry.state import (
    Outcome,
    RegistryState,
    config_key,
    encode,
    schema_key,
    schema_value,
)

Record = tuple[bytes, bytes | None]


class LogInMemory:
    def __init__(self) -> None:
        self.state = RegistryState()
        self.write_lock = asyncio.Lock()
        self.records: list[Record] = []
        self.rival: list[Record] = []

    def _append(self, key: bytes, value: bytes | None) -> Outcome | None:
        self.records.append((key, value))
        return self.state.apply(key, value)

    async def sync(self) -> None:
        return None

    async def write(self, key: bytes, value: dict[str, Any] | None) -> None:
        self._append(key, encode(value))

    async def propose(self, key: dict[str, Any], value: dict[str, Any]) -> Outcome:
        while self.rival:
            self._append(*self.rival.pop(0))
        outcome = self._append(encode(key) or b"", encode(value))
        assert outcome is not None
        return outcome


def schema(name: str, *fields: dict[str, Any]) -> str:
    return json.dumps({"type": "record", "name": name, "fields": list(fields)})


def rival_registration(subject: str, version: int, schema_id: int, text: str) -> Record:
    key = encode(schema_key(subject, version, "rival"))
    assert key is not None
    compact = parse_request({"schema": text}).text
    return key, encode(schema_value(subject, version, schema_id, compact))


@pytest.fixture
def log() -> LogInMemory:
    return LogInMemory()


@pytest.fixture
def registry(log: LogInMemory) -> Registry:
    return Registry(log)  # type: ignore[arg-type]


async def test_a_lost_race_retries_with_the_next_version_and_a_fresh_id(
    log: LogInMemory, registry: Registry
) -> None:
    log.state.apply(encode(config_key("s")), encode({"compatibilityLevel": "NONE"}))
    log.rival.append(rival_registration("s", 1, 1, schema("Theirs")))
    mine = await registry.register("s", parse_request({"schema": schema("Mine")}))
    assert (mine.id, mine.version) == (2, 2)
    assert [(v.version, v.id) for v in log.state.versions("s")] == [(1, 1), (2, 2)]
    # The void proposal was tombstoned so that compaction can drop it.
    void_key = [k for k, v in log.records if v is not None][1]
    assert (void_key, None) in log.records
    assert json.loads(void_key)["proposal"] != "rival"


async def test_losing_to_the_same_schema_returns_the_winners_id(
    log: LogInMemory, registry: Registry
) -> None:
    text = schema("Same")
    log.rival.append(rival_registration("s", 1, 1, text))
    mine = await registry.register("s", parse_request({"schema": text}))
    assert (mine.id, mine.version) == (1, 1)
    assert len(log.state.versions("s")) == 1


async def test_losing_to_an_incompatible_schema_is_a_409(
    log: LogInMemory, registry: Registry
) -> None:
    log.rival.append(rival_registration("s", 1, 1, schema("R", {"name": "a", "type": "int"})))
    new = parse_request({"schema": schema("R", {"name": "a", "type": "string"})})
    with pytest.raises(RegistryError) as refused:
        await registry.register("s", new)
    assert refused.value.error_code == api.INCOMPATIBLE_SCHEMA
    assert [v.id for v in log.state.versions("s")] == [1]


async def test_soft_deleted_twin_is_removed_when_the_schema_returns(
    log: LogInMemory, registry: Registry
) -> None:
    text = parse_request({"schema": schema("T")})
    first = await registry.register("s", text)
    assert await registry.delete_subject("s", permanent=False) == [1]
    again = await registry.register("s", text)
    assert (again.id, again.version) == (first.id, 2)
    # Confluent removes the older soft-deleted version that carried the same id.
    assert [v.version for v in log.state.versions("s", deleted=True)] == [2]


async def test_delete_rules(log: LogInMemory, registry: Registry) -> None:
    await registry.register("s", parse_request({"schema": schema("D")}))
    with pytest.raises(RegistryError) as not_soft:
        await registry.delete_version("s", 1, permanent=True)
    assert not_soft.value.error_code == api.SCHEMA_VERSION_NOT_SOFT_DELETED
    assert await registry.delete_version("s", api.LATEST, permanent=False) == 1
    with pytest.raises(RegistryError) as twice:
        await registry.delete_version("s", 1, permanent=False)
    assert twice.value.error_code == api.SCHEMA_VERSION_SOFT_DELETED
    assert await registry.delete_version("s", 1, permanent=True) == 1
    with pytest.raises(RegistryError) as gone:
        await registry.delete_version("s", 1, permanent=True)
    assert gone.value.error_code == api.SUBJECT_NOT_FOUND
