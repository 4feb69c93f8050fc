"""Registry operations with Confluent's semantics, on top of the log-backed state.

Reads answer from this instance's state. Writes take the instance's write lock, catch up
with the log (so a proposal is made from the freshest view), then propose and retry when
the log voids the proposal because another instance got there first.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass
from typing import Any

from edgeloop.core.errors import SchemaError
from edgeloop.core.logs import get_logger
from edgeloop.schemas.registry import api, compat
from edgeloop.schemas.registry.compat import CompatibilityLevel
from edgeloop.schemas.registry.state import (
    RegistryState,
    Version,
    config_key,
    delete_subject_key,
    encode,
    schema_key,
    schema_value,
)
from edgeloop.schemas.registry.store import SchemaLog

log = get_logger(__name__)

# Each void proposal means another instance wrote in between. An instance serializes its
# own writes, so a loser waits at most for the others' queued writes; the jitter keeps
# two busy instances from losing to each other in lockstep.
MAX_PROPOSALS = 16
RETRY_JITTER_S = 0.02


_parsed = compat.parse_cached


def same_schema(stored: str, schema: compat.AvroSchema, *, normalize: bool) -> bool:
    """Whether a stored version holds `schema` (Confluent: canonical strings are equal;
    with `normalize=true`, their normalized forms are)."""
    if stored == schema.text:
        return True
    return normalize and _parsed(stored, True).text == schema.text


def parse_request(body: Any, *, normalize: bool = False) -> compat.AvroSchema:
    """The `{"schema": ..., "schemaType": ..., "references": [...]}` body of a request."""
    if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
        raise api.invalid_schema('the request body must be a JSON object with a "schema" string')
    schema_type = body.get("schemaType") or "AVRO"
    if schema_type != "AVRO":
        raise api.invalid_schema(f"schema type {schema_type!r} is not supported (AVRO only)")
    if body.get("references"):
        raise api.invalid_schema("schema references are not supported")
    try:
        return _parsed(body["schema"], normalize)
    except SchemaError as exc:
        raise api.invalid_schema(str(exc)) from None


def parse_level(value: Any) -> CompatibilityLevel:
    if not isinstance(value, str):  # str(None) would read as the level NONE
        raise api.invalid_compatibility(value)
    try:
        return CompatibilityLevel(value.upper())
    except ValueError:
        raise api.invalid_compatibility(value) from None


@dataclass(frozen=True)
class Registered:
    id: int
    version: int


class Registry:
    def __init__(self, store: SchemaLog) -> None:
        self.store = store

    @property
    def state(self) -> RegistryState:
        return self.store.state

    # ---- reads ----------------------------------------------------------------------

    def level(self, subject: str | None) -> CompatibilityLevel:
        configs = self.state.configs
        found = configs.get(subject) if subject is not None else None
        return parse_level(found or configs.get(None) or compat.DEFAULT_LEVEL)

    def versions(self, subject: str, *, deleted: bool = False) -> list[Version]:
        found = self.state.versions(subject, deleted=deleted)
        if not found:
            raise api.subject_not_found(subject)
        return found

    def version(self, subject: str, version: int, *, deleted: bool = False) -> Version:
        found = self.versions(subject, deleted=deleted)
        if version == api.LATEST:
            return found[-1]
        for v in found:
            if v.version == version:
                return v
        raise api.version_not_found(subject, version)

    def schema_by_id(self, schema_id: int) -> str:
        try:
            return self.state.schema_by_id[schema_id]
        except KeyError:
            raise api.schema_not_found(f"Schema {schema_id} not found") from None

    def id_versions(self, schema_id: int, *, deleted: bool = False) -> list[Version]:
        self.schema_by_id(schema_id)
        found = [self.state.subjects[s][v] for s, v in self.state.refs.get(schema_id, ())]
        return sorted(
            (v for v in found if deleted or not v.deleted), key=lambda v: (v.subject, v.version)
        )

    def lookup(
        self,
        subject: str,
        schema: compat.AvroSchema,
        *,
        deleted: bool = False,
        normalize: bool = False,
    ) -> Version:
        for v in reversed(self.versions(subject, deleted=deleted)):
            if same_schema(v.schema, schema, normalize=normalize):
                return v
        raise api.schema_not_found()

    def check(
        self, subject: str, schema: compat.AvroSchema, version: int = api.LATEST
    ) -> list[compat.Incompatibility]:
        """Incompatibilities of `schema` with `subject`. LATEST checks what a registration
        would (the subject's level, transitive where it says so); a number checks that one
        version with the level's direction."""
        level = self.level(subject)
        live = self.state.versions(subject)
        if version == api.LATEST:
            previous = live
        else:
            previous = [self.version(subject, version)]
            level = CompatibilityLevel(level.value.removesuffix("_TRANSITIVE"))
        return compat.check(schema, [(v.version, _parsed(v.schema)) for v in previous], level)

    # ---- writes ---------------------------------------------------------------------

    async def register(
        self, subject: str, schema: compat.AvroSchema, *, normalize: bool = False
    ) -> Registered:
        async with self.store.write_lock:
            await self.store.sync()
            for attempt in range(MAX_PROPOSALS):
                for v in self.state.versions(subject):
                    if same_schema(v.schema, schema, normalize=normalize):
                        return Registered(v.id, v.version)  # already there: same id
                problems = self.check(subject, schema)
                if problems:
                    raise api.incompatible(
                        subject,
                        [*map(str, problems), f"compatibility: {self.level(subject).value}"],
                    )
                st = self.state
                schema_id = st.id_by_schema.get(schema.text) or st.next_id()
                version = st.next_version(subject)
                key = schema_key(subject, version, uuid.uuid4().hex)
                outcome = await self.store.propose(
                    key, schema_value(subject, version, schema_id, schema.text)
                )
                if outcome.accepted:
                    await self._drop_deleted_twins(subject, schema_id, version)
                    log.info(
                        "schema registered",
                        extra={"subject": subject, "version": version, "id": schema_id},
                    )
                    return Registered(schema_id, version)
                log.info(
                    "proposal voided by the log, retrying",
                    extra={"subject": subject, "reason": outcome.reason},
                )
                # The void record can never take effect; a tombstone lets compaction drop
                # it, so it cannot look valid to a replay after the winner is deleted.
                await self.store.write(encode(key) or b"", None)
                await asyncio.sleep(random.uniform(0, RETRY_JITTER_S * (attempt + 1)))  # noqa: S311 - jitter, not a secret
        raise api.timed_out(f"registration under {subject!r} lost {MAX_PROPOSALS} races")

    async def _drop_deleted_twins(self, subject: str, schema_id: int, version: int) -> None:
        # Confluent: re-registering a soft-deleted schema removes the older deleted
        # versions that carried the same id.
        for v in self.state.versions(subject, deleted=True):
            if v.deleted and v.id == schema_id and v.version < version:
                await self.store.write(v.key, None)

    async def delete_subject(self, subject: str, *, permanent: bool) -> list[int]:
        async with self.store.write_lock:
            await self.store.sync()
            every = self.versions(subject, deleted=True)
            live = [v for v in every if not v.deleted]
            if not permanent:
                if not live:
                    raise api.subject_soft_deleted(subject)
                await self.store.write(
                    encode(delete_subject_key(subject)) or b"",
                    {"subject": subject, "version": live[-1].version},
                )
                await self._drop_subject_config(subject)
                return [v.version for v in live]
            if live:
                raise api.subject_not_soft_deleted(subject)
            for v in every:
                await self.store.write(v.key, None)
            await self.store.write(encode(delete_subject_key(subject)) or b"", None)
            await self._drop_subject_config(subject)
            return [v.version for v in every]

    async def _drop_subject_config(self, subject: str) -> None:
        # Confluent deletes a subject's compatibility level with the subject (soft delete
        # already), so a subject created again under that name starts from the global
        # level. A tombstone on the CONFIG key, not a side effect of DELETE_SUBJECT:
        # compaction may drop the DELETE_SUBJECT record, never the config's newest one.
        # Also after a permanent delete, for a level set while the subject was soft-deleted.
        if subject in self.state.configs:
            await self.store.write(encode(config_key(subject)) or b"", None)

    async def delete_version(self, subject: str, version: int, *, permanent: bool) -> int:
        async with self.store.write_lock:
            await self.store.sync()
            every = self.versions(subject, deleted=True)
            live = [v for v in every if not v.deleted]
            if version == api.LATEST:
                target = live[-1] if live and not permanent else every[-1]
            else:
                found = [v for v in every if v.version == version]
                if not found:
                    raise api.version_not_found(subject, version)
                target = found[0]
            if not permanent:
                if target.deleted:
                    raise api.version_soft_deleted(subject, target.version)
                value = schema_value(
                    subject, target.version, target.id, target.schema, deleted=True
                )
                await self.store.write(target.key, value)
            elif not target.deleted:
                raise api.version_not_soft_deleted(subject, target.version)
            else:
                await self.store.write(target.key, None)
            return target.version

    async def set_level(self, subject: str | None, level: CompatibilityLevel) -> None:
        async with self.store.write_lock:
            await self.store.write(
                encode(config_key(subject)) or b"", {"compatibilityLevel": level.value}
            )

    async def clear_level(self, subject: str | None) -> CompatibilityLevel:
        async with self.store.write_lock:
            await self.store.sync()
            previous = self.level(subject)
            if (
                subject is not None
                and subject not in self.state.configs
                and not self.state.versions(subject, deleted=True)
            ):
                raise api.subject_not_found(subject)
            await self.store.write(encode(config_key(subject)) or b"", None)
            return previous
