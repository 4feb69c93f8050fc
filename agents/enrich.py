"""Enrichment: an InferenceEvent joined with its device's fleet record.

`EnrichedInferenceEvent` starts with exactly InferenceEvent's fields, in order, and adds
the enrichment fields after them (a unit test holds the schemas to that). Avro encodes a
record as its fields one after another, so the enriched body is the device's body bytes
followed by the encoded enrichment fields (the "tail"): no re-encoding on the hot path.

The fleet and status tables store tails, not records: a device's tail is computed once
when its DeviceRecord (or DeviceStatus) arrives, and every event of the device reuses it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from edgeloop.schemas import catalog
from edgeloop.schemas.events import DeviceRecord, DeviceStatus, EnrichmentSource

ENRICHED = catalog.get("EnrichedInferenceEvent")
BASE = catalog.get("InferenceEvent")
_BASE_FIELDS = len(BASE.schema["fields"])
TAIL_FIELDS: list[dict[str, Any]] = ENRICHED.schema["fields"][_BASE_FIELDS:]
_TAIL = parse_schema(
    {
        "type": "record",
        "name": "EnrichmentTail",
        "namespace": "edgeloop.v1.agents",
        "fields": TAIL_FIELDS,
    }
)
CONFLUENT_HEADER = 5


@dataclass(frozen=True)
class Enrichment:
    """What the agents add to an InferenceEvent."""

    enrichment: EnrichmentSource
    fleet_cohort: str
    hardware: str = ""
    target: str = ""
    site: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    decommissioned: bool = False

    def fields(self) -> dict[str, Any]:
        return {
            "enrichment": self.enrichment,
            "fleet_cohort": self.fleet_cohort,
            "hardware": self.hardware,
            "target": self.target,
            "site": self.site,
            "labels": self.labels,
            "decommissioned": self.decommissioned,
        }

    def tail(self) -> bytes:
        """The Avro encoding of the enrichment fields (appended to an event body)."""
        buf = io.BytesIO()
        schemaless_writer(buf, _TAIL, self.fields())
        return buf.getvalue()


def from_device_record(record: DeviceRecord) -> Enrichment:
    """A registered device: everything comes from its fleet record."""
    return Enrichment(
        "FLEET",
        record["cohort"],
        record["hardware"],
        record["target"],
        record["site"],
        dict(record["labels"]),
        record["decommissioned"],
    )


def from_status(status: DeviceStatus) -> Enrichment:
    """A device missing from the fleet table: its latest status says its cohort; flagged."""
    return Enrichment("STATUS", status["cohort"])


def unknown_device(cohort: str) -> Enrichment:
    """Nothing is known about the device: the event's own cohort; flagged."""
    return Enrichment("NONE", cohort)


def source_of(tail: bytes) -> EnrichmentSource:
    """The enrichment source a tail encodes (its first byte: the enum index, zig-zag)."""
    symbols: list[EnrichmentSource] = ["UNKNOWN", "FLEET", "STATUS", "NONE"]
    index = tail[0] >> 1 if tail else 0
    return symbols[index] if index < len(symbols) else "UNKNOWN"


def tail_fields(tail: bytes) -> Enrichment:
    """The Enrichment a tail encodes (the inverse of `Enrichment.tail`)."""
    doc: Any = schemaless_reader(io.BytesIO(tail), _TAIL, None)
    return Enrichment(
        doc["enrichment"],
        doc["fleet_cohort"],
        doc["hardware"],
        doc["target"],
        doc["site"],
        dict(doc["labels"]),
        doc["decommissioned"],
    )


def enriched_value(data: bytes, header: bytes, tail: bytes) -> bytes:
    """Confluent-framed EnrichedInferenceEvent from a Confluent-framed InferenceEvent.

    Args:
        data: the input message; its writer schema must be the shipped InferenceEvent
            (same field list), which the caller checks by fingerprint.
        header: the 5-byte Confluent header of the enriched topic's schema id.
        tail: `Enrichment.tail()` of the device.

    Returns:
        The output message bytes.
    """
    return header + data[CONFLUENT_HEADER:] + tail


def enriched_record(event: dict[str, Any], enrichment: Enrichment) -> dict[str, Any]:
    """The enriched record as a dict: the slow path, for events written with another
    version of the InferenceEvent schema (their body cannot be reused as is)."""
    out = {f["name"]: event.get(f["name"], f.get("default")) for f in BASE.schema["fields"]}
    out.update(enrichment.fields())
    return out
