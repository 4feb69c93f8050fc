"""Newer versions of shipped schemas, as a later release of edgeloop would write them."""

from __future__ import annotations

import copy
from typing import Any

from edgeloop.schemas import catalog
from edgeloop.schemas.catalog import EventSchema

# A field a later release adds: optional, with a default, so the change is
# FULL_TRANSITIVE compatible (Avro specification, "Schema Resolution").
ADDED_FIELD: dict[str, Any] = {
    "name": "firmware",
    "type": ["null", "string"],
    "default": None,
    "doc": "Firmware build of the device (added in v2).",
}


def evolved(name: str, field: dict[str, Any] | None = None) -> EventSchema:
    """The shipped schema `name` with one more optional field (its v2)."""
    doc = copy.deepcopy(catalog.get(name).schema)
    doc["fields"].append(copy.deepcopy(field or ADDED_FIELD))
    return EventSchema(doc)
