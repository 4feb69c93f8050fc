"""Kafka goes away under load: the bridge stops acknowledging, the broker holds the
messages, and everything arrives once Kafka is back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from edgeloop.bench.fleet_load import collect, encoded_events, publish_events
from edgeloop.core.settings import MqttSettings
from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.infra.testing import InfraEndpoints
from tests.integration.bridge_support import RECEIVE_MAXIMUM, BridgeProcess, check_delivery, prepare

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_kafka_outage_holds_acks_and_loses_nothing(
    kafka_flavor: str,
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]],
    mosquitto: Mosquitto,
    bridges: list[BridgeProcess],
    tmp_path: Path,
) -> None:
    if kafka_flavor != "apache":
        pytest.skip(
            "Tansu's memory storage forgets every topic on restart; the outage "
            "is tested on Apache Kafka, whose log survives it"
        )
    kafka = await kafka_factory("apache")
    registry = RegistryProcess(tmp_path / "registry", kafka.bootstrap)
    await registry.start()
    try:
        stack = InfraEndpoints.write(tmp_path / "home", mosquitto, kafka, registry)
        await prepare(stack)
        prefix = f"o{uuid.uuid4().hex[:6]}"
        bridge = BridgeProcess(
            stack.home,
            f"bridge-{prefix}",
            tmp_path / "bridge.log",
            EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
        )
        bridges.append(bridge)
        bridge.start()
        await bridge.subscribed()
        messages = encoded_events(devices=10, per_device=300, prefix=prefix)
        mqtt = MqttSettings.load(stack.home)
        await asyncio.to_thread(publish_events, mqtt, messages[:1000], client_id=f"a-{prefix}")
        await collect(kafka.bootstrap, "edge.inference.v1", 1000, key_prefix=f"{prefix}-")

        await kafka.stop()
        await asyncio.to_thread(publish_events, mqtt, messages[1000:], client_id=f"b-{prefix}")
        await asyncio.sleep(5)  # the bridge is now holding a full window, unacknowledged
        await kafka.start()

        got = await collect(
            kafka.bootstrap,
            "edge.inference.v1",
            len(messages),
            key_prefix=f"{prefix}-",
            timeout_s=180,
            idle_s=60,
        )
        expected = {f"{prefix}-{d}:{s}" for d in range(10) for s in range(300)}
        check_delivery(got.event_ids, got.keys, expected, window=RECEIVE_MAXIMUM)
        # The outage really hit traffic in flight (aiokafka's or the bridge's own retries).
        assert "retrying" in bridge.log.read_text()
    finally:
        await registry.stop()
