"""Bad input and a missing registry never stop the bridge and never lose good traffic."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from edgeloop.bench.fleet_load import collect, encoded_events, inference_event, publish_events
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import UplinkKind, mqtt_uplink
from tests.integration.bridge_support import (
    BridgeProcess,
    check_delivery,
    mqtt_settings,
    prepare,
)

pytestmark = pytest.mark.integration


async def dead_letters(
    bootstrap: str,
    registry_url: str,
    topics: list[str],
    device_prefix: str,
    expected: int,
    *,
    payload_marker: bytes | None = None,
) -> list[dict[str, object]]:
    """Dead letters from MQTT topics of `device_prefix` devices, or (with `payload_marker`)
    those whose payload copy contains the marker."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    codec = ConfluentCodec()
    out: list[dict[str, object]] = []
    await consumer.start()
    try:
        async with RegistryClient(registry_url) as registry, asyncio.timeout(90):
            while len(out) < expected:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for rec in records:
                        schema_id = codec.schema_id(rec.value)
                        if not codec.knows(schema_id):
                            codec.add(
                                schema_id, EventSchema.from_text(await registry.schema(schema_id))
                            )
                        _, _, record = codec.decode(rec.value)
                        if payload_marker is not None:
                            payload = record.get("payload")
                            if isinstance(payload, bytes) and payload_marker in payload:
                                out.append(record)
                        elif str(record.get("source", "")).startswith(
                            f"mqtt:edgeloop/{device_prefix}"
                        ):
                            out.append(record)
    finally:
        await consumer.stop()
    return out


async def test_each_malformed_input_class_is_dead_lettered_while_good_traffic_flows(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    prefix = f"m{uuid.uuid4().hex[:6]}"
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
        EDGELOOP_BRIDGE_MAX_MESSAGE_BYTES="4096",
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()

    schema = catalog.get("InferenceEvent")
    codec = SingleObjectCodec([schema])
    good = encoded_events(devices=4, per_device=100, prefix=prefix)
    device = f"{prefix}-bad"
    topic = mqtt_uplink(device, UplinkKind.INFERENCE)
    valid = codec.encode(schema, inference_event(device, 1))
    bad = [
        (f"edgeloop/{device}/up/video", valid),  # bad_topic
        (topic, valid + b"x" * 5000),  # oversize
        (topic, valid[:2] + b"\x00" * 8 + valid[10:]),  # unknown_fingerprint
        (topic, valid[:-6]),  # truncated body
        (topic, b"\xc3\x02" + valid[2:]),  # bad_magic
        (topic, codec.encode(schema, inference_event(f"{prefix}-0", 7))),  # device_mismatch
        (mqtt_uplink(device, UplinkKind.STATUS), valid),  # wrong_schema
    ]
    messages = good[:200] + bad + good[200:]
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
    expected = {f"{prefix}-{d}:{s}" for d in range(4) for s in range(100)}
    check_delivery(got.event_ids, got.keys, expected, window=0)

    assert infra_stack.registry is not None
    letters = await dead_letters(
        infra_stack.kafka.bootstrap,
        infra_stack.registry.url,
        ["edge.inference.dlq.v1", "edge.status.dlq.v1", "edge.uplink.dlq.v1"],
        device_prefix=prefix,
        expected=len(bad),
    )
    reasons = sorted(str(r["reason"]) for r in letters)
    assert reasons == sorted(
        [
            "bad_topic",
            "oversize",
            "unknown_fingerprint",
            "truncated",
            "bad_magic",
            "device_mismatch",
            "wrong_schema",
        ]
    )
    for letter in letters:
        assert letter["detail"], letter
        assert letter["payload_size"] and letter["payload"], letter
        assert letter["stage"] == "bridge-uplink"
    oversize = next(r for r in letters if r["reason"] == "oversize")
    assert oversize["truncated"] is True and oversize["payload_size"] == len(valid) + 5000


async def test_with_the_registry_down_nothing_is_acknowledged_and_nothing_is_lost(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    prefix = f"r{uuid.uuid4().hex[:6]}"
    # A registry of this test's own, on the shared Kafka: stopping it disturbs no one.
    registry = RegistryProcess(tmp_path / "registry", infra_stack.kafka.bootstrap)
    await registry.start()
    try:
        bridge = BridgeProcess(
            infra_stack.home,
            f"bridge-{prefix}",
            tmp_path / "bridge.log",
            EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
            EDGELOOP_REGISTRY_URL=registry.url,
        )
        bridges.append(bridge)
        await registry.stop()
        bridge.start()  # starts with a cold schema-id cache and no registry
        await bridge.subscribed()
        messages = encoded_events(devices=5, per_device=100, prefix=prefix)
        await asyncio.to_thread(
            publish_events, mqtt_settings(infra_stack), messages, client_id=f"load-{prefix}"
        )
        early = await collect(
            infra_stack.kafka.bootstrap,
            "edge.inference.v1",
            1,
            key_prefix=f"{prefix}-",
            timeout_s=8,
            idle_s=8,
        )
        assert early.event_ids == [], "records reached Kafka without a registry"
        log = bridge.log.read_text()
        assert "registry unavailable; retrying" in log

        bridge.kill()  # and the unacknowledged messages must still be with the broker
        await registry.start()
        bridge.start()
        got = await collect(
            infra_stack.kafka.bootstrap,
            "edge.inference.v1",
            len(messages),
            key_prefix=f"{prefix}-",
            timeout_s=120,
        )
        expected = {f"{prefix}-{d}:{s}" for d in range(5) for s in range(100)}
        check_delivery(got.event_ids, got.keys, expected, window=0)
    finally:
        await registry.stop()
