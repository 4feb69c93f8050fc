"""The two framings of an Avro body, both from public specifications.

- MQTT: Avro single-object encoding: `C3 01` + 8-byte CRC-64-AVRO fingerprint
  (little-endian) + body. A device needs no registry to publish.
- Kafka: Confluent wire format: `00` + 4-byte big-endian schema id + body, so any Kafka
  tool and Confluent-compatible deserializer reads the topics.

The body is the same in both, so re-framing (`single_to_confluent`) swaps the header and
never re-encodes. Decoding treats bytes as hostile: a size cap, header checks, and a
strict reader per schema (`strict_reader`) that rejects every value the Avro
specification forbids, bounds collections and checks the timestamp window, with errors
that name the reason, the schema and the field path. Encoding is fastavro's.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

from fastavro import schemaless_writer
from fastavro.validation import ValidationError, validate

from edgeloop.core.errors import DecodeError, EncodeError
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.strict_reader import cached_reader

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
SINGLE_OBJECT_HEADER = 10
CONFLUENT_MAGIC = 0
CONFLUENT_HEADER = 5

Record = dict[str, Any]


class _Entry:
    """What decoding needs for one schema, computed once: its strict reader."""

    __slots__ = ("read", "schema", "schema_id")

    def __init__(self, schema: EventSchema, limits: DecodeLimits, schema_id: int = 0) -> None:
        self.schema = schema
        self.schema_id = schema_id
        self.read = cached_reader(schema.text, limits)


def _encode_body(buf: io.BytesIO, schema: EventSchema, record: Record) -> None:
    try:
        schemaless_writer(buf, schema.parsed, record)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise EncodeError(_explain_encode(schema, record, exc)) from exc


def _explain_encode(schema: EventSchema, record: Record, exc: Exception) -> str:
    # Slow path only: fastavro's own errors do not say which field was wrong.
    try:
        validate(record, schema.parsed, raise_errors=True)
    except ValidationError as verr:
        details = "; ".join(str(e) for e in verr.errors)
        return f"record does not match schema {schema.name}: {details}"
    except Exception:  # noqa: S110 - fall back to fastavro's own message below
        pass
    return f"record does not match schema {schema.name}: {exc}"


def _check_size(data: bytes, limits: DecodeLimits, header: int) -> None:
    if len(data) > limits.max_message_bytes:
        raise DecodeError(
            f"message of {len(data)} bytes exceeds the cap of {limits.max_message_bytes}",
            reason="oversize",
        )
    if len(data) < header:
        raise DecodeError(
            f"message of {len(data)} bytes is shorter than the {header}-byte header",
            reason="truncated_header",
        )


class SingleObjectCodec:
    """Avro single-object encoding; knows schemas by their 8-byte fingerprint."""

    def __init__(
        self, schemas: Iterable[EventSchema] = (), limits: DecodeLimits | None = None
    ) -> None:
        self.limits = limits or DecodeLimits()
        self._max_bytes = self.limits.max_message_bytes
        self._by_fingerprint: dict[bytes, _Entry] = {}
        for schema in schemas:
            self.add(schema)

    def add(self, schema: EventSchema) -> None:
        self._by_fingerprint[schema.fingerprint] = _Entry(schema, self.limits)

    def encode(self, schema: EventSchema, record: Record) -> bytes:
        buf = io.BytesIO()
        buf.write(SINGLE_OBJECT_MAGIC)
        buf.write(schema.fingerprint)
        _encode_body(buf, schema, record)
        return buf.getvalue()

    def peek(self, data: bytes) -> EventSchema:
        """Header-only validation: size, magic and a known fingerprint."""
        return self._entry(data).schema

    def decode(self, data: bytes) -> tuple[EventSchema, Record]:
        """Check the header and decode the body strictly.

        Args:
            data: a whole single-object message.

        Returns:
            The writer's schema and the record (timestamps as int microseconds).

        Raises:
            DecodeError: with the dead-letter `reason`: `oversize`, `truncated_header`,
                `bad_magic`, `unknown_fingerprint`, or the body's (see `strict_reader`).
        """
        # The hot path of every consumer, kept flat and with literal offsets (10 = the
        # header, 2 = the marker): each Python call or global lookup here is ~2% of a
        # small event's decode.
        entry = self._by_fingerprint.get(data[2:10])
        if entry is None or len(data) > self._max_bytes or data[:2] != b"\xc3\x01":
            entry = self._entry(data)
        return entry.schema, entry.read(data, 10)

    def _entry(self, data: bytes) -> _Entry:
        entry = self._by_fingerprint.get(data[2:SINGLE_OBJECT_HEADER])
        if entry is not None and len(data) <= self._max_bytes and data[:2] == SINGLE_OBJECT_MAGIC:
            return entry
        _check_size(data, self.limits, SINGLE_OBJECT_HEADER)
        if data[:2] != SINGLE_OBJECT_MAGIC:
            raise DecodeError(
                f"bad single-object marker {data[:2].hex()} (expected c301)", reason="bad_magic"
            )
        raise DecodeError(
            f"unknown schema fingerprint {data[2:SINGLE_OBJECT_HEADER].hex()}",
            reason="unknown_fingerprint",
        )


class ConfluentCodec:
    """Confluent wire format; knows schemas by registry id (filled from the registry)."""

    def __init__(self, limits: DecodeLimits | None = None) -> None:
        self.limits = limits or DecodeLimits()
        self._max_bytes = self.limits.max_message_bytes
        # Keyed by the 4 id bytes as they appear on the wire: no int conversion per message.
        self._by_header: dict[bytes, _Entry] = {}

    def add(self, schema_id: int, schema: EventSchema) -> None:
        self._by_header[schema_id.to_bytes(4, "big")] = _Entry(schema, self.limits, schema_id)

    def knows(self, schema_id: int) -> bool:
        return schema_id.to_bytes(4, "big") in self._by_header

    def encode(self, schema_id: int, schema: EventSchema, record: Record) -> bytes:
        buf = io.BytesIO()
        buf.write(b"\x00")
        buf.write(schema_id.to_bytes(4, "big"))
        _encode_body(buf, schema, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> tuple[int, EventSchema, Record]:
        """Check the header and decode the body strictly.

        Args:
            data: a whole Confluent-framed message.

        Returns:
            The schema id, its schema and the record.

        Raises:
            DecodeError: `oversize`, `truncated_header`, `bad_magic`, `unknown_schema_id`,
                or the body's reason (see `strict_reader`).
        """
        # Flat for the same reason as SingleObjectCodec.decode (5 = the header).
        entry = self._by_header.get(data[1:5])
        if entry is None or len(data) > self._max_bytes or data[0] != 0:
            schema_id = self.schema_id(data)  # raises for size and magic
            raise DecodeError(f"unknown schema id {schema_id}", reason="unknown_schema_id")
        return entry.schema_id, entry.schema, entry.read(data, 5)

    def schema_id(self, data: bytes) -> int:
        _check_size(data, self.limits, CONFLUENT_HEADER)
        if data[0] != CONFLUENT_MAGIC:
            raise DecodeError(
                f"bad Confluent magic byte {data[0]:#04x} (expected 0x00)", reason="bad_magic"
            )
        return int.from_bytes(data[1:CONFLUENT_HEADER], "big")


def single_to_confluent(data: bytes, schema_id: int) -> bytes:
    """Re-frame a single-object message for Kafka without touching its body."""
    return b"\x00" + schema_id.to_bytes(4, "big") + data[SINGLE_OBJECT_HEADER:]


def confluent_to_single(data: bytes, schema: EventSchema) -> bytes:
    """Re-frame a Kafka message for MQTT without touching its body."""
    return SINGLE_OBJECT_MAGIC + schema.fingerprint + data[CONFLUENT_HEADER:]
