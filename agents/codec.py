"""Confluent framing for the agents: writer schemas by id from the registry, and the
schema ids of the topics the agents write.

Faust topics carry raw bytes (`value_serializer="raw"`); this is the only codec: no JSON,
no pickles between Kafka and the step functions.
"""

from __future__ import annotations

from typing import Any

from edgeloop.core.errors import DecodeError, RegistryError, SchemaError
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import CONFLUENT_HEADER, ConfluentCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import subject_for


class SchemaBook:
    """Decodes what the agents read, encodes what they write.

    Writer schemas are learnt from the registry on first sight of an id (ids are
    immutable, so once is enough); an id the registry does not know is a DecodeError
    (`unknown_schema_id`), a registry that cannot be reached is retriable and raised as is.
    """

    def __init__(self, registry: RegistryClient | None, limits: DecodeLimits) -> None:
        self.registry = registry
        self.codec = ConfluentCodec(limits)
        self._out: dict[str, tuple[int, EventSchema, bytes]] = {}

    async def register_output(self, topic: str, schema: EventSchema) -> int:
        """Register `schema` under the topic's subject (idempotent) and remember its id."""
        if self.registry is None:
            raise SchemaError("no registry to register with (use add_output)")
        schema_id = await self.registry.register(subject_for(topic), schema.text)
        self.add_output(topic, schema_id, schema)
        return schema_id

    def add_output(self, topic: str, schema_id: int, schema: EventSchema) -> None:
        """Use `schema_id` for `topic` (what `register_output` does after registering)."""
        self.codec.add(schema_id, schema)
        self._out[topic] = (schema_id, schema, b"\x00" + schema_id.to_bytes(4, "big"))

    def header(self, topic: str) -> bytes:
        """The 5-byte Confluent header of `topic`'s registered schema."""
        return self._out[topic][2]

    def encode(self, topic: str, record: Any) -> bytes:
        """Encode `record` for `topic` (registered with `register_output` first).

        Raises:
            EncodeError: the record does not match the schema; the message names the field.
        """
        schema_id, schema, _ = self._out[topic]
        return self.codec.encode(schema_id, schema, record)

    def decode(self, data: bytes) -> tuple[EventSchema, dict[str, Any]]:
        """Decode a message whose writer schema is known (see `learn`).

        Raises:
            DecodeError: `reason` says why (unknown_schema_id, bad_magic, oversize, ...).
        """
        _, schema, record = self.codec.decode(data)
        return schema, record

    async def learn(self, data: bytes) -> None:
        """Fetch the writer schema of `data` from the registry.

        Raises:
            DecodeError: bad framing, or an id the registry does not know.
            RegistryUnavailableError / retriable RegistryError: try again later.
        """
        schema_id = self.codec.schema_id(data)
        if self.codec.knows(schema_id):
            return
        if self.registry is None:
            raise DecodeError(f"unknown schema id {schema_id}", reason="unknown_schema_id")
        try:
            text = await self.registry.schema(schema_id)
        except RegistryError as exc:
            if exc.retriable:
                raise
            raise DecodeError(
                f"schema id {schema_id} is unknown to the registry: {exc}",
                reason="unknown_schema_id",
            ) from exc
        try:
            self.codec.add(schema_id, EventSchema.from_text(text))
        except SchemaError as exc:
            raise DecodeError(
                f"schema id {schema_id} is not a usable Avro record schema: {exc}",
                reason="unknown_schema_id",
            ) from exc

    async def read(self, data: bytes) -> dict[str, Any]:
        """`learn` the writer schema of `data`, then `decode` it: the decode callable
        `edgeloop.schemas.topic_reader.read_topic` takes.

        Raises:
            DecodeError: bad framing, an unknown schema id, a body that does not decode.
            RegistryUnavailableError / retriable RegistryError: try again later.
        """
        await self.learn(data)
        return self.decode(data)[1]


__all__ = ["CONFLUENT_HEADER", "SchemaBook"]
