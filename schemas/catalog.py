"""The event schemas shipped in `avro/*.avsc`: the single source of truth for every event.

`EventSchema` bundles what the codecs need once per schema (parsed form, canonical form,
fingerprint) so nothing is recomputed per message.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

from edgeloop.core.errors import SchemaError

NAMESPACE = "edgeloop.v1"


def _without_logical_types(node: Any) -> Any:
    """A copy of a schema with logicalType annotations dropped.

    The codecs hand timestamps to code as int microseconds: the bytes on the wire are
    the same, and a stream processor wants integers it can subtract, not datetimes that
    cost a microsecond each to build.
    """
    if isinstance(node, dict):
        return {k: _without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_without_logical_types(v) for v in node]
    return node


@dataclass(frozen=True, eq=False)
class EventSchema:
    """One Avro record schema, ready for encoding and decoding."""

    schema: dict[str, Any]
    text: str = field(init=False)
    canonical: str = field(init=False)
    fingerprint: bytes = field(init=False)  # 8 bytes, CRC-64-AVRO, little-endian
    parsed: Any = field(init=False, repr=False)  # fastavro's parsed form, logical types off

    def __post_init__(self) -> None:
        if not isinstance(self.schema, dict) or self.schema.get("type") != "record":
            raise SchemaError(f"an event schema must be an Avro record, got {self.schema!r:.80}")
        try:
            canonical = to_parsing_canonical_form(self.schema)
            parsed = parse_schema(_without_logical_types(copy.deepcopy(self.schema)))
        except Exception as exc:
            raise SchemaError(f"invalid Avro schema {self.schema.get('name')!r}: {exc}") from exc
        object.__setattr__(self, "text", json.dumps(self.schema, separators=(",", ":")))
        object.__setattr__(self, "canonical", canonical)
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
        object.__setattr__(self, "fingerprint", fp)
        object.__setattr__(self, "parsed", parsed)

    @functools.cached_property
    def name(self) -> str:
        """Full name, e.g. `edgeloop.v1.InferenceEvent`."""
        name = str(self.schema["name"])
        namespace = self.schema.get("namespace")
        return f"{namespace}.{name}" if namespace and "." not in name else name

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @classmethod
    def from_text(cls, text: str) -> EventSchema:
        try:
            return cls(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SchemaError(f"schema is not valid JSON: {exc}") from exc


@cache
def catalog() -> dict[str, EventSchema]:
    """Every shipped event schema by full name (`edgeloop.v1.InferenceEvent`)."""
    folder = resources.files("edgeloop.schemas") / "avro"
    out: dict[str, EventSchema] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".avsc"):
            schema = EventSchema.from_text(entry.read_text(encoding="utf-8"))
            out[schema.name] = schema
    return out


def get(name: str) -> EventSchema:
    """Look up a shipped schema by full (`edgeloop.v1.X`) or short (`X`) name."""
    full = name if "." in name else f"{NAMESPACE}.{name}"
    try:
        return catalog()[full]
    except KeyError:
        known = ", ".join(s.short_name for s in catalog().values())
        raise SchemaError(f"unknown event schema {name!r}; known: {known}") from None


def load_schemas() -> dict[str, dict[str, Any]]:
    """Full name -> the schema as JSON, as written in its .avsc file."""
    return {name: s.schema for name, s in catalog().items()}


def schema_text(name: str) -> str:
    return get(name).text
