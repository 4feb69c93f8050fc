"""Compatible evolution end to end (issue 12, item 6), on both brokers.

Uplink: a device on a newer InferenceEvent (one optional field added, registered
FULL_TRANSITIVE under `edge.inference.v1-value`) publishes through the real bridge; the
events reach Kafka with v2's schema id, confluent-kafka's AvroDeserializer sees the new
field and our consumer on the shipped schema still decodes them. On main they were
dead-lettered `unknown_fingerprint`.

Downlink: a ThresholdUpdate written with a newer schema reaches a device that shipped
with the old one, which decodes it with the edge's own codec and applies it. On main the
bridge forwarded the newer fingerprint and the device could not decode it.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from edgeloop.bench.fleet_load import inference_event
from edgeloop.edge.control import ThresholdGate
from edgeloop.edge.daemon import DOWNLINK_SCHEMAS, STATUS
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.state import AppliedThreshold, DeviceState, StateFile
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.resolution import to_shipped
from edgeloop.schemas.topics import DownlinkKind, UplinkKind, mqtt_uplink, subject_for
from tests.evolution import evolved
from tests.integration.bridge_support import BridgeProcess, prepare
from tests.integration.test_bridge_downlink import device_record, produce, threshold
from tests.integration.test_bridge_faults import dead_letters

pytestmark = pytest.mark.integration

INFERENCE = "edge.inference.v1"
V1 = catalog.get("InferenceEvent")
V2 = evolved("InferenceEvent")


async def publish_as_device(stack: InfraEndpoints, device: str, payloads: list[bytes]) -> None:
    """Publish over mTLS with the device's own certificate, QoS 1, as a device does."""
    creds = stack.mosquitto.device_credentials(device)
    async with aiomqtt.Client(
        stack.mosquitto.host,
        stack.mosquitto.tls_port,
        identifier=device,
        tls_context=creds.ssl_context(),
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        for payload in payloads:
            await client.publish(mqtt_uplink(device, UplinkKind.INFERENCE), payload, qos=1)


async def read_values(bootstrap: str, topic: str, key: str, expected: int) -> list[bytes]:
    """The values of `topic` keyed `key`, from the start, until `expected` arrived."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    out: list[bytes] = []
    await consumer.start()
    try:
        async with asyncio.timeout(90):
            while len(out) < expected:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    out.extend(r.value for r in records if r.key == key.encode() and r.value)
    finally:
        await consumer.stop()
    return out


def confluent_deserialize(url: str, values: list[bytes]) -> list[dict[str, Any]]:
    """What a Confluent consumer reads: AvroDeserializer with the writer's schema."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    reader = AvroDeserializer(SchemaRegistryClient({"url": url}))
    ctx = SerializationContext(INFERENCE, MessageField.VALUE)
    return [reader(value, ctx) for value in values]


async def test_a_device_on_a_newer_schema_is_forwarded_with_that_versions_id(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    assert infra_stack.registry is not None
    url = infra_stack.registry.url
    subject = subject_for(INFERENCE)
    async with RegistryClient(url) as registry:
        await registry.set_compatibility("FULL_TRANSITIVE", subject)
        v1_id = await registry.register(subject, V1.text)
        v2_id = await registry.register(subject, V2.text)  # accepted: the gate
    assert v2_id != v1_id

    tag = uuid.uuid4().hex[:6]
    bridge = BridgeProcess(
        infra_stack.home, f"bridge-{tag}", tmp_path / "bridge.log", EDGELOOP_BRIDGE_SHARE_GROUP=tag
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()

    device = f"evo-{tag}"
    old, new = SingleObjectCodec([V1]), SingleObjectCodec([V2])
    v1_events = [inference_event(device, seq) for seq in range(10)]
    v2_events = [{**inference_event(device, seq), "firmware": f"2.{seq}"} for seq in range(10, 30)]
    # A fingerprint registered nowhere is still dead-lettered.
    junk = b"\xc3\x01" + uuid.uuid4().bytes[:8] + new.encode(V2, v2_events[0])[10:]
    payloads = [
        *(old.encode(V1, e) for e in v1_events),
        *(new.encode(V2, e) for e in v2_events),
        junk,
    ]
    await publish_as_device(infra_stack, device, payloads)

    values = await read_values(infra_stack.kafka.bootstrap, INFERENCE, device, 30)
    ids = [int.from_bytes(v[1:5], "big") for v in values]
    assert ids == [v1_id] * 10 + [v2_id] * 20  # each event with its own version's id

    # A Confluent consumer reads the new field.
    read = await asyncio.to_thread(confluent_deserialize, url, values)
    assert [r["seq"] for r in read] == list(range(30))
    assert [r.get("firmware") for r in read[10:]] == [f"2.{s}" for s in range(10, 30)]

    # Our consumer on the shipped (old) schema decodes every record.
    codec = ConfluentCodec()
    async with RegistryClient(url) as registry:
        for schema_id in {v1_id, v2_id}:
            codec.add(schema_id, EventSchema.from_text(await registry.schema(schema_id)))
    for value, sent in zip(values, v1_events + v2_events, strict=True):
        _, writer, record = codec.decode(value)
        schema, shipped = to_shipped(writer, record, value)
        assert schema.fingerprint == V1.fingerprint
        assert shipped == {k: v for k, v in sent.items() if k != "firmware"}

    letters = await dead_letters(
        infra_stack.kafka.bootstrap, url, ["edge.inference.dlq.v1"], device, expected=1
    )
    assert [r["reason"] for r in letters] == ["unknown_fingerprint"]


class EdgeSubscriber:
    """A device's downlink receive path: the edge daemon's codec and ThresholdGate."""

    def __init__(self, device: str, state_dir: Path) -> None:
        self.device = device
        self.codec = SingleObjectCodec([STATUS, *DOWNLINK_SCHEMAS.values()])  # as the daemon
        self.applied: list[AppliedThreshold] = []
        default = DeviceState(threshold=AppliedThreshold(0, 0.5, "MAX_PROB", 0.0, "DEVICE"))
        self.gate = ThresholdGate(
            device_id=device,
            cohort="default",
            state=StateFile(state_dir / "state.json", default),
            metrics=EdgeMetrics(),
            on_apply=self.applied.append,
        )
        self.undecodable = 0

    def receive(self, payload: bytes) -> None:
        try:
            schema, record = self.codec.decode(payload)
        except Exception:
            self.undecodable += 1
            return
        assert schema is DOWNLINK_SCHEMAS[DownlinkKind.THRESHOLD]
        self.gate.handle(record)  # type: ignore[arg-type]


async def test_a_threshold_written_with_a_newer_schema_is_applied_by_an_old_device(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    assert infra_stack.registry is not None
    tag = uuid.uuid4().hex[:6]
    device = f"old-{tag}"
    await produce(
        infra_stack, [("fleet.devices.v1", device, "DeviceRecord", device_record(device, tag))]
    )
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{tag}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_DOWNLINK_GROUP=f"downlink-{tag}",
        EDGELOOP_BRIDGE_SHARE_GROUP=tag,
    )
    bridge.downlink = True
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()

    # A newer controller writes ThresholdUpdate v2 (an added field with a default).
    subject = subject_for("control.thresholds.v1")
    newer = evolved(
        "ThresholdUpdate",
        {"name": "hysteresis", "type": "float", "default": 0.0, "doc": "Added in v2."},
    )
    async with RegistryClient(infra_stack.registry.url) as registry:
        await registry.set_compatibility("FULL_TRANSITIVE", subject)
        await registry.register(subject, catalog.get("ThresholdUpdate").text)
        newer_id = await registry.register(subject, newer.text)
    record = {**threshold(device, 9), "hysteresis": 0.125}
    producer = AIOKafkaProducer(bootstrap_servers=infra_stack.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        value = ConfluentCodec().encode(newer_id, newer, record)
        await producer.send_and_wait("control.thresholds.v1", value, key=device.encode())
    finally:
        await producer.stop()

    edge = EdgeSubscriber(device, tmp_path)
    creds = infra_stack.mosquitto.device_credentials(device)
    async with aiomqtt.Client(
        infra_stack.mosquitto.host,
        infra_stack.mosquitto.tls_port,
        identifier=f"{device}-probe",
        tls_context=creds.ssl_context(),
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"edgeloop/{device}/down/threshold", qos=1)
        async with asyncio.timeout(60):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                edge.receive(message.payload)
                break
    assert edge.undecodable == 0
    assert [(a.version, a.tau) for a in edge.applied] == [(9, 0.625)]
