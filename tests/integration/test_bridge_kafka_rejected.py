"""A record Kafka will never accept is dead-lettered (`kafka_rejected`); every other
device's events keep flowing instead of waiting behind it forever."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from edgeloop.bench.fleet_load import collect, encoded_events, inference_event, publish_events
from edgeloop.core.settings import MqttSettings
from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import SingleObjectCodec
from edgeloop.schemas.topics import UplinkKind, mqtt_uplink
from tests.integration.bridge_support import BridgeProcess, check_delivery, prepare
from tests.integration.test_bridge_faults import dead_letters

pytestmark = pytest.mark.integration

LIMIT = 4096


async def create_small_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, 6, 1, topic_configs={"max.message.bytes": str(LIMIT)})]
        )
    finally:
        await admin.close()


@pytest.mark.parametrize("limit", ["topic", "producer"])
async def test_a_record_kafka_never_accepts_is_dead_lettered_and_the_rest_flows(  # noqa: PLR0917 - fixtures
    kafka_flavor: str,
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]],
    mosquitto: Mosquitto,
    bridges: list[BridgeProcess],
    tmp_path: Path,
    limit: str,
) -> None:
    """`topic`: the broker refuses a record over the topic's max.message.bytes.
    `producer`: the producer refuses one over its max_request_size before sending."""
    if limit == "topic" and kafka_flavor == "tansu":
        pytest.skip(
            "Tansu 0.6 stores records over a topic's max.message.bytes (checked by hand); "
            "the producer limit covers the refusal on this leg"
        )
    kafka = await kafka_factory(kafka_flavor)
    registry = RegistryProcess(tmp_path / "registry", kafka.bootstrap)
    await registry.start()
    try:
        stack = InfraEndpoints.write(tmp_path / "home", mosquitto, kafka, registry)
        if limit == "topic":
            await create_small_topic(kafka.bootstrap, "edge.inference.v1")
        await prepare(stack)
        prefix = f"x{uuid.uuid4().hex[:6]}"
        env = {"EDGELOOP_BRIDGE_MAX_REQUEST_BYTES": str(LIMIT)} if limit == "producer" else {}
        bridge = BridgeProcess(
            stack.home,
            f"bridge-{prefix}",
            tmp_path / "bridge.log",
            EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
            **env,
        )
        bridges.append(bridge)
        bridge.start()
        await bridge.subscribed()

        schema = catalog.get("InferenceEvent")
        big_device = f"{prefix}-big"
        big = (
            mqtt_uplink(big_device, UplinkKind.INFERENCE),
            SingleObjectCodec([schema]).encode(
                schema, inference_event(big_device, 1, pad=2 * LIMIT)
            ),
        )
        good = encoded_events(devices=4, per_device=100, prefix=prefix)
        messages = [*good[:100], big, *good[100:]]
        await asyncio.to_thread(
            publish_events, MqttSettings.load(stack.home), messages, client_id=f"load-{prefix}"
        )
        got = await collect(
            kafka.bootstrap,
            "edge.inference.v1",
            len(good),
            key_prefix=f"{prefix}-",
            timeout_s=120,
            idle_s=60,
        )
        expected = {f"{prefix}-{d}:{s}" for d in range(4) for s in range(100)}
        check_delivery(got.event_ids, got.keys, expected, window=0, ordered=False)

        letters = await dead_letters(
            kafka.bootstrap,
            registry.url,
            ["edge.inference.dlq.v1"],
            device_prefix=big_device,
            expected=1,
        )
        assert [r["reason"] for r in letters] == ["kafka_rejected"]
        assert "MessageSizeTooLarge" in str(letters[0]["detail"])
        assert letters[0]["payload_size"] == len(big[1])
    finally:
        await registry.stop()
