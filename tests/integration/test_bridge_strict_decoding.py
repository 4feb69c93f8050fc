"""Values the Avro specification forbids never reach Kafka: the real bridge dead-letters
them with the precise reason (issue 12, items 4 and 5), on both brokers, while good
traffic flows. Without it, confluent-kafka's AvroDeserializer raises on the record."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from edgeloop.bench.fleet_load import collect, encoded_events, inference_event, publish_events
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import SingleObjectCodec, single_to_confluent
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import UplinkKind, mqtt_uplink, subject_for
from tests.integration.bridge_support import BridgeProcess, check_delivery, mqtt_settings, prepare
from tests.integration.test_bridge_faults import dead_letters

pytestmark = pytest.mark.integration

SCHEMA = catalog.get("InferenceEvent")
CODEC = SingleObjectCodec([SCHEMA])


def zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def with_field_byte(record: dict[str, Any], field: str, one: Any, other: Any, new: bytes) -> bytes:
    """The encoded record with the one byte that encodes `field` replaced by `new`."""
    a = CODEC.encode(SCHEMA, {**record, field: one})
    b = CODEC.encode(SCHEMA, {**record, field: other})
    at = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return a[:at] + new + a[at + 1 :]


async def test_forbidden_values_are_dead_lettered_with_their_reason(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    prefix = f"s{uuid.uuid4().hex[:6]}"
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()

    device = f"{prefix}-bad"
    topic = mqtt_uplink(device, UplinkKind.INFERENCE)
    base = inference_event(device, 1)
    far_future = CODEC.encode(SCHEMA, {**base, "ts": 2**62})
    bad = {
        # The poison pill: zig-zag -1 for confidence_kind (fastavro: ENTROPY).
        "bad_enum_index": with_field_byte(base, "confidence_kind", "UNKNOWN", "MAX_PROB", b"\x01"),
        # Branch -1 of frame_ts ["null", long] (fastavro: the long branch).
        "bad_union_index": with_field_byte(base, "frame_ts", None, 5, b"\x01"),
        "bad_timestamp": far_future,
        "bad_int": CODEC.encode(SCHEMA, {**base, "prediction": 2**31}),
    }
    good = encoded_events(devices=2, per_device=50, prefix=prefix)
    messages = good[:50] + [(topic, payload) for payload in bad.values()] + good[50:]
    await asyncio.to_thread(
        publish_events, mqtt_settings(infra_stack), messages, client_id=f"load-{prefix}"
    )

    got = await collect(
        infra_stack.kafka.bootstrap,
        "edge.inference.v1",
        len(good),
        key_prefix=f"{prefix}-",
        timeout_s=90,
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(2) for s in range(50)}
    check_delivery(got.event_ids, got.keys, expected, window=0)
    assert not any(key == device for key in got.keys), "a forbidden value reached Kafka"

    assert infra_stack.registry is not None
    letters = await dead_letters(
        infra_stack.kafka.bootstrap,
        infra_stack.registry.url,
        ["edge.inference.dlq.v1"],
        device_prefix=prefix,
        expected=len(bad),
    )
    assert sorted(str(r["reason"]) for r in letters) == sorted(bad)
    by_reason = {str(r["reason"]): r for r in letters}
    assert "InferenceEvent.confidence_kind" in str(by_reason["bad_enum_index"]["detail"])
    assert "InferenceEvent.ts" in str(by_reason["bad_timestamp"]["detail"])
    assert by_reason["bad_timestamp"]["payload"] == far_future

    # What a consumer would have met: confluent-kafka's AvroDeserializer (fastavro with
    # logical types) raises on the 2^62 us record instead of reading it.
    async with RegistryClient(infra_stack.registry.url) as registry:
        schema_id = await registry.register(subject_for("edge.inference.v1"), SCHEMA.text)
    pill = single_to_confluent(far_future, schema_id)

    def deserialize(url: str) -> BaseException | None:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        reader = AvroDeserializer(SchemaRegistryClient({"url": url}))
        try:
            reader(pill, SerializationContext("edge.inference.v1", MessageField.VALUE))
        except Exception as exc:  # the point is that it raises; which class is asserted
            return exc
        return None

    error = await asyncio.to_thread(deserialize, infra_stack.registry.url)
    assert isinstance(error, OverflowError), repr(error)  # "date value out of range"
