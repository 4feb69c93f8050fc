"""Compatible evolution (issue 12, item 6), without services.

The bridge resolves a fingerprint it did not ship with among the subject's registered
versions (bounded cache, negative cache, rate-limited refresh), and the downlink
resolves a record written with a newer schema to the one devices shipped with.
"""

from __future__ import annotations

from collections import Counter

import pytest

from edgeloop.core.errors import DecodeError, RegistryError, RegistryUnavailableError
from edgeloop.core.retry import is_retriable
from edgeloop.core.settings import KafkaSettings, MqttSettings
from edgeloop.schemas import catalog
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec
from edgeloop.schemas.registry.client import RegistryClient, SubjectVersion
from edgeloop.schemas.resolution import to_shipped
from edgeloop.schemas.samples import example_record
from edgeloop.schemas.topics import UplinkKind, mqtt_uplink
from edgeloop.streams.fingerprints import FingerprintResolver
from edgeloop.streams.intake import Incoming
from edgeloop.streams.metrics import BridgeMetrics
from edgeloop.streams.settings import BridgeSettings
from edgeloop.streams.uplink import Uplink
from tests.evolution import evolved

SUBJECT = "edge.inference.v1-value"


class FakeVersions:
    """A registry's versions endpoints, counting requests (unit tests only)."""

    def __init__(self, versions: dict[str, list[EventSchema]]) -> None:
        self.subjects = versions
        self.calls = 0
        self.down = False

    async def versions(self, subject: str) -> list[int]:
        self.calls += 1
        if self.down:
            raise RegistryUnavailableError("registry down")
        if subject not in self.subjects:
            raise RegistryError("no subject", status=404, error_code=40401)
        return list(range(1, len(self.subjects[subject]) + 1))

    async def version(self, subject: str, version: int | str = "latest") -> SubjectVersion:
        self.calls += 1
        number = int(version)
        schema = self.subjects[subject][number - 1]
        return SubjectVersion(subject, number, 100 + number, schema.text)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(
    registry: FakeVersions,
    clock: Clock,
    *,
    max_entries: int = 1024,
    negative_ttl_s: float = 30.0,
    refresh_interval_s: float = 5.0,
) -> tuple[FingerprintResolver, Counter[str]]:
    results: Counter[str] = Counter()
    r = FingerprintResolver(
        registry,
        clock=clock,
        on_result=lambda result: results.update([result]),
        max_entries=max_entries,
        negative_ttl_s=negative_ttl_s,
        refresh_interval_s=refresh_interval_s,
    )
    return r, results


V1 = catalog.get("InferenceEvent")
V2 = evolved("InferenceEvent")


async def test_a_registered_newer_version_resolves_to_its_id_and_is_then_cached() -> None:
    registry = FakeVersions({SUBJECT: [V1, V2]})
    r, results = resolver(registry, Clock())
    found = await r.resolve(SUBJECT, V2.fingerprint)
    assert found is not None
    assert (found.schema_id, found.schema.fingerprint) == (102, V2.fingerprint)
    calls = registry.calls
    for _ in range(100):
        assert await r.resolve(SUBJECT, V2.fingerprint) == found
    assert registry.calls == calls  # served from the cache
    assert results["found"] == 1 and results["hit"] == 100


async def test_a_version_of_another_subject_is_not_accepted() -> None:
    registry = FakeVersions({SUBJECT: [V1], "edge.status.v1-value": [V2]})
    r, results = resolver(registry, Clock())
    assert await r.resolve(SUBJECT, V2.fingerprint) is None
    assert results["unregistered"] == 1


async def test_junk_fingerprints_cost_one_refresh_per_interval() -> None:
    registry = FakeVersions({SUBJECT: [V1, V2]})
    clock = Clock()
    r, results = resolver(registry, clock, refresh_interval_s=5, negative_ttl_s=30)
    for i in range(10_000):
        assert await r.resolve(SUBJECT, i.to_bytes(8, "little")) is None
    # One refresh: the version list and each version once.
    assert registry.calls == 3
    assert results["unregistered"] == 1 and results["throttled"] == 9_999
    clock.now += 6
    for i in range(10_000, 20_000):
        assert await r.resolve(SUBJECT, i.to_bytes(8, "little")) is None
    assert registry.calls == 4  # the list again; versions already fetched are not


async def test_a_missing_fingerprint_is_not_asked_again_until_its_negative_entry_expires() -> None:
    registry = FakeVersions({SUBJECT: [V1]})
    clock = Clock()
    r, results = resolver(registry, clock, refresh_interval_s=5, negative_ttl_s=30)
    assert await r.resolve(SUBJECT, V2.fingerprint) is None
    registry.subjects[SUBJECT].append(V2)  # registered afterwards
    clock.now += 10  # past the refresh interval, inside the negative entry
    assert await r.resolve(SUBJECT, V2.fingerprint) is None
    assert results["negative"] == 1
    clock.now += 25  # the negative entry expired
    found = await r.resolve(SUBJECT, V2.fingerprint)
    assert found is not None and found.schema_id == 102


async def test_the_caches_are_bounded() -> None:
    schemas = [
        evolved("InferenceEvent", {"name": f"f{i}", "type": "int", "default": 0}) for i in range(20)
    ]
    registry = FakeVersions({SUBJECT: schemas})
    clock = Clock()
    r, _ = resolver(registry, clock, max_entries=8, refresh_interval_s=0)
    assert await r.resolve(SUBJECT, schemas[-1].fingerprint) is not None
    assert r.entries == (8, 0)
    for i in range(100):
        await r.resolve(SUBJECT, (10**6 + i).to_bytes(8, "little"))
    assert r.entries == (8, 8)
    # An evicted version is fetched again when it is needed.
    found = await r.resolve(SUBJECT, schemas[0].fingerprint)
    assert found is not None and found.schema_id == 101


async def test_a_registry_outage_is_raised_retriable_and_does_not_spend_the_refresh() -> None:
    registry = FakeVersions({SUBJECT: [V1, V2]})
    r, _ = resolver(registry, Clock(), refresh_interval_s=5)
    registry.down = True
    with pytest.raises(RegistryUnavailableError) as caught:
        await r.resolve(SUBJECT, V2.fingerprint)
    assert is_retriable(caught.value)
    registry.down = False
    assert await r.resolve(SUBJECT, V2.fingerprint) is not None


def test_a_shipped_codec_alone_refuses_the_newer_fingerprint() -> None:
    """What main did with a v2 event: `unknown_fingerprint`."""
    payload = SingleObjectCodec([V2]).encode(V2, {**example_record(V1), "firmware": "2.1"})
    with pytest.raises(DecodeError) as caught:
        SingleObjectCodec(catalog.catalog().values()).decode(payload)
    assert caught.value.reason == "unknown_fingerprint"


def test_a_downlink_record_written_with_a_newer_schema_resolves_to_the_shipped_one() -> None:
    shipped = catalog.get("ThresholdUpdate")
    newer = evolved(
        "ThresholdUpdate",
        {"name": "hysteresis", "type": "float", "default": 0.0, "doc": "added in v2"},
    )
    record = {**example_record(shipped), "confidence_kind": "MARGIN", "hysteresis": 0.25}
    codec = ConfluentCodec()
    codec.add(7, newer)
    value = codec.encode(7, newer, record)
    _, writer, decoded = codec.decode(value)
    schema, resolved = to_shipped(writer, decoded, value)
    assert schema is shipped
    assert "hysteresis" not in resolved
    assert resolved == {k: v for k, v in record.items() if k != "hysteresis"}
    # What the device receives decodes with the codec it shipped with.
    device = SingleObjectCodec([shipped])
    got_schema, got = device.decode(SingleObjectCodec().encode(schema, resolved))
    assert got_schema is shipped and got["threshold_version"] == record["threshold_version"]


def test_a_newer_enum_symbol_resolves_to_the_enums_default() -> None:
    shipped = catalog.get("ThresholdUpdate")
    doc = evolved("ThresholdUpdate").schema
    for field in doc["fields"]:
        if field["name"] == "confidence_kind":
            field["type"]["symbols"].append("TEMPERATURE_SCALED")
    newer = EventSchema(doc)
    record = {**example_record(shipped), "confidence_kind": "TEMPERATURE_SCALED"}
    codec = ConfluentCodec()
    codec.add(8, newer)
    value = codec.encode(8, newer, record)
    _, writer, decoded = codec.decode(value)
    _, resolved = to_shipped(writer, decoded, value)
    assert resolved["confidence_kind"] == "UNKNOWN"


def test_an_incompatible_writer_is_dead_lettered_unresolvable() -> None:
    doc = evolved("ThresholdUpdate", {"name": "must", "type": "int"}).schema
    doc["fields"] = [f for f in doc["fields"] if f["name"] != "tau"]  # required, no default
    newer = EventSchema(doc)
    record = {k: v for k, v in example_record(catalog.get("ThresholdUpdate")).items() if k != "tau"}
    codec = ConfluentCodec()
    codec.add(9, newer)
    value = codec.encode(9, newer, {**record, "must": 1})
    _, writer, decoded = codec.decode(value)
    with pytest.raises(DecodeError) as caught:
        to_shipped(writer, decoded, value)
    assert caught.value.reason == "unresolvable_schema"


def uplink_with(registry: FakeVersions) -> Uplink:
    """The bridge's uplink with its resolver on `registry` (no services are started)."""
    uplink = Uplink(
        BridgeSettings(),
        MqttSettings(),
        KafkaSettings(),
        RegistryClient("http://127.0.0.1:9"),
        BridgeMetrics(),
    )
    uplink.resolver = FingerprintResolver(registry)
    return uplink


async def evolved_outcome(uplink: Uplink, device: str, payload: bytes) -> str | int:
    """The schema id an evolved message is forwarded with, or why it is dead-lettered."""
    item = Incoming(1, 1, mqtt_uplink(device, UplinkKind.INFERENCE), payload, 0, 0)
    unknown = DecodeError("unknown schema fingerprint", reason="unknown_fingerprint")
    try:
        _, headers, schema_id = await uplink._evolved(item, device, UplinkKind.INFERENCE, unknown)
    except DecodeError as exc:
        return exc.reason
    assert dict(headers)["event_id"] == f"{device}:1".encode()
    return schema_id


async def test_an_evolved_message_is_decoded_strictly_and_checked_like_a_shipped_one() -> None:
    other = evolved("OffloadRequest")
    uplink = uplink_with(FakeVersions({SUBJECT: [V1, V2, other]}))
    codec = SingleObjectCodec([V2, other])
    record = {**example_record(V1), "device_id": "pi-1", "event_id": "pi-1:1", "firmware": None}
    good = codec.encode(V2, record)
    assert await evolved_outcome(uplink, "pi-1", good) == 102
    # The device rule applies to the writer's record.
    assert await evolved_outcome(uplink, "pi-2", good) == "device_mismatch"
    # A registered version of another event is still the wrong schema for the topic.
    offload = codec.encode(other, example_record(other))
    assert await evolved_outcome(uplink, "pi-1", offload) == "wrong_schema"
    # The strict reader checks the body: the added field's union branch -1 (zig-zag 1),
    # which fastavro would read as the last branch.
    assert good[-1:] == b"\x00"  # firmware: branch 0, null (the last field)
    assert await evolved_outcome(uplink, "pi-1", good[:-1] + b"\x01") == "bad_union_index"
    # A fingerprint the subject does not have is still unknown.
    junk = good[:2] + b"\x00" * 8 + good[10:]
    assert await evolved_outcome(uplink, "pi-1", junk) == "unknown_fingerprint"


def test_device_status_gains_its_uplink_capacity_compatibly() -> None:
    """DeviceStatus `uplink_capacity_bytes_per_s` (the threshold controller's per-device
    uplink limit) is optional with a null default: the shipped schema and the one before
    it are FULL_TRANSITIVE compatible, so devices that do not report it keep publishing
    and the agents read their statuses with no capacity (no per-device limit)."""
    import copy
    import io

    from fastavro import schemaless_reader, schemaless_writer

    from edgeloop.schemas.registry import compat
    from edgeloop.schemas.samples import example_record

    shipped = catalog.get("DeviceStatus")
    before = copy.deepcopy(shipped.schema)
    before["fields"] = [f for f in before["fields"] if f["name"] != "uplink_capacity_bytes_per_s"]
    assert len(before["fields"]) == len(shipped.schema["fields"]) - 1
    old, new = EventSchema(before), shipped
    level = compat.CompatibilityLevel.FULL_TRANSITIVE
    assert compat.check(compat.parse(new.text), [(1, compat.parse(old.text))], level) == []
    record = example_record(old, seed=4)
    buf = io.BytesIO()
    schemaless_writer(buf, old.parsed, record)
    read = schemaless_reader(io.BytesIO(buf.getvalue()), old.parsed, new.parsed)
    assert read["uplink_capacity_bytes_per_s"] is None  # an old device: undeclared
    newer = {**example_record(new, seed=4), "uplink_capacity_bytes_per_s": 65536.0}
    buf = io.BytesIO()
    schemaless_writer(buf, new.parsed, newer)
    back = schemaless_reader(io.BytesIO(buf.getvalue()), new.parsed, old.parsed)
    assert "uplink_capacity_bytes_per_s" not in back  # an old consumer drops it
