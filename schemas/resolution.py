"""Reading a record written with one registered version as another (schema evolution).

Devices upgrade late, so fleet subjects are FULL_TRANSITIVE: any registered version can
read data written with any other. The strict reader (`strict_reader`) validates the
bytes against the writer's schema first; resolution to the reader's schema is
fastavro's, on bytes already known to be valid.
"""

from __future__ import annotations

import io
from typing import Any

from fastavro import schemaless_reader
from fastavro.read import SchemaResolutionError

from edgeloop.core.errors import DecodeError
from edgeloop.schemas import catalog
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import CONFLUENT_HEADER

Record = dict[str, Any]


def to_shipped(
    writer: EventSchema, record: Record, value: bytes, header: int = CONFLUENT_HEADER
) -> tuple[EventSchema, Record]:
    """The record in the schema this package shipped for its event (Avro schema resolution).

    Avro specification, "Schema Resolution": fields the reader lacks are dropped,
    missing ones take their defaults, unknown enum symbols the enum's default. The
    bridge's downlink uses it so devices, which have no registry, always receive a
    schema they shipped with; a consumer on the shipped schema reads a newer writer's
    records the same way.

    Args:
        writer: the schema `record` was strictly decoded with.
        record: that decoded record (returned as is when `writer` is the shipped schema
            or no schema of its name was shipped).
        value: the framed bytes it came from.
        header: the framing's header length (Confluent: 5, single-object: 10).

    Returns:
        The shipped schema and the resolved record.

    Raises:
        DecodeError: `unresolvable_schema` when the writer's schema cannot be read as
            the shipped one (the registry's compatibility check should prevent it).
    """
    shipped = catalog.catalog().get(writer.name)
    if shipped is None or shipped.fingerprint == writer.fingerprint:
        return writer, record
    try:
        resolved = schemaless_reader(io.BytesIO(value[header:]), writer.parsed, shipped.parsed)
    except (SchemaResolutionError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise DecodeError(
            f"{writer.name} written with fingerprint {writer.fingerprint.hex()} does not "
            f"resolve to the shipped schema {shipped.fingerprint.hex()}: {exc}",
            reason="unresolvable_schema",
            schema=writer.name,
        ) from exc
    assert isinstance(resolved, dict)  # a record schema reads as a dict
    return shipped, resolved
