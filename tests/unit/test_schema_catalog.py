"""The .avsc files are the contract: every event exists, is documented and carries the
fields the design promises (event_id, ts as timestamp-micros, versions)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgeloop.schemas import catalog, topics
from edgeloop.schemas.catalog import EventSchema

REQUIRED_EVENTS = {
    "InferenceEvent",
    "EnrichedInferenceEvent",
    "OffloadRequest",
    "CloudVerdict",
    "HardExample",
    "StreamSignal",
    "ThresholdUpdate",
    "TrainingTrigger",
    "ModelRelease",
    "DeviceStatus",
    "DeviceRecord",
    "DeadLetter",
}
DEVICE_EVENTS = {"InferenceEvent", "OffloadRequest", "DeviceStatus"}
EVENTS = sorted(catalog.catalog().values(), key=lambda s: s.name)
ROOT = Path(__file__).resolve().parents[2]


def test_every_designed_event_has_a_schema_in_the_v1_namespace() -> None:
    assert {s.short_name for s in EVENTS} == REQUIRED_EVENTS
    assert all(s.name.startswith("edgeloop.v1.") for s in EVENTS)


def _fields(node: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    types = node if isinstance(node, list) else [node]
    for t in types:
        if isinstance(t, dict) and t.get("type") == "record":
            for f in t["fields"]:
                out.append((f"{path}.{f['name']}", f))
                out += _fields(f["type"], f"{path}.{f['name']}")
        elif isinstance(t, dict) and t.get("type") == "array":
            out += _fields(t["items"], f"{path}[]")
    return out


@pytest.mark.parametrize("schema", EVENTS, ids=lambda s: s.short_name)
def test_every_field_and_record_is_documented(schema: EventSchema) -> None:
    assert schema.schema.get("doc"), f"{schema.name} has no doc"
    undocumented = [p for p, f in _fields(schema.schema, schema.short_name) if not f.get("doc")]
    assert undocumented == []


@pytest.mark.parametrize("schema", EVENTS, ids=lambda s: s.short_name)
def test_identity_and_time_fields(schema: EventSchema) -> None:
    fields = {f["name"]: f for f in schema.schema["fields"]}
    assert fields["event_id"]["type"] == "string"
    assert fields["ts"]["type"] == {"type": "long", "logicalType": "timestamp-micros"}
    if schema.short_name in DEVICE_EVENTS:
        assert fields["seq"]["type"] == "long"
        assert fields["device_id"]["type"] == "string"
        assert "model_version" in fields and "threshold_version" in fields


@pytest.mark.parametrize("schema", EVENTS, ids=lambda s: s.short_name)
def test_enums_have_a_default_so_symbols_can_be_added_compatibly(schema: EventSchema) -> None:
    def enums(node: Any) -> list[dict[str, Any]]:
        if isinstance(node, list):
            return [e for n in node for e in enums(n)]
        if not isinstance(node, dict):
            return []
        if node.get("type") == "enum":
            return [node]
        children = [f["type"] for f in node.get("fields", [])]
        children += [node[k] for k in ("items", "values") if k in node]
        return [e for c in children for e in enums(c)]

    for enum in enums(schema.schema):
        assert enum.get("default") in enum["symbols"], enum["name"]


def test_every_topic_names_a_shipped_schema() -> None:
    for spec in topics.TOPICS.values():
        assert catalog.get(spec.event).name == spec.event


def test_mqtt_topics_round_trip_and_refuse_bad_device_ids() -> None:
    topic = topics.mqtt_uplink("pi-7", topics.UplinkKind.OFFLOAD)
    assert topic == "edgeloop/pi-7/up/offload"
    assert topics.parse_mqtt_uplink(topic) == ("pi-7", topics.UplinkKind.OFFLOAD)
    from edgeloop.core.errors import ConfigError

    with pytest.raises(ConfigError, match="'a/b'"):
        topics.mqtt_uplink("a/b", topics.UplinkKind.STATUS)
    with pytest.raises(ConfigError, match="unknown uplink kind 'video'"):
        topics.parse_mqtt_uplink("edgeloop/pi-7/up/video")


def test_pyproject_lists_every_package_on_disk() -> None:
    # The explicit package map in pyproject.toml must not forget a new subpackage,
    # or the wheel would ship without it.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    on_disk = set()
    for package, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            # Symlinked part folders under edgeloop/ are mapped on their own.
            if package == "edgeloop" and rel.parts and rel.parts[0] in mapping_parts(mapping):
                continue
            on_disk.add(".".join([package, *rel.parts]))
    assert on_disk == listed


def mapping_parts(mapping: dict[str, str]) -> set[str]:
    return {name.split(".", 1)[1] for name in mapping if "." in name}
