"""Single-object fingerprint → registry schema id, looked up once per (subject, schema)."""

from __future__ import annotations

from edgeloop.core.errors import RegistryError
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.streams.metrics import BridgeMetrics

SUBJECT_NOT_FOUND = 40401
SCHEMA_NOT_FOUND = 40403


class UnregisteredSchemaError(RegistryError):
    """The schema is not registered under the subject: an operator must register it."""


class SchemaIds:
    def __init__(self, registry: RegistryClient, metrics: BridgeMetrics) -> None:
        self._registry = registry
        self._metrics = metrics
        # Keys come from known fingerprints only, so this holds at most
        # (#topics x #schema versions) entries.
        self._ids: dict[tuple[str, bytes], int] = {}
        self._hits = metrics.registry_lookups.labels("hit")

    async def id_for(self, subject: str, schema: EventSchema) -> int:
        key = (subject, schema.fingerprint)
        schema_id = self._ids.get(key)
        if schema_id is not None:
            self._hits.inc()
            return schema_id
        self._metrics.registry_lookups.labels("miss").inc()
        try:
            found = await self._registry.lookup(subject, schema.text)
        except RegistryError as exc:
            if exc.error_code in (SUBJECT_NOT_FOUND, SCHEMA_NOT_FOUND):
                raise UnregisteredSchemaError(
                    f"schema {schema.name} ({schema.fingerprint.hex()}) is not registered "
                    f"under {subject}: run `edgeloop schemas register`",
                    status=exc.status,
                    error_code=exc.error_code,
                ) from exc
            raise
        self._ids[key] = found.id
        return found.id
