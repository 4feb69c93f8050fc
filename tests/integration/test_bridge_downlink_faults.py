"""The downlink on records it cannot deliver and on a registry outage: it neither
crashes nor skips; bad records are dead-lettered with a reason, the rest is delivered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import subject_for
from tests.integration.bridge_support import BridgeProcess, prepare
from tests.integration.test_bridge_downlink import produce, retained, threshold, until
from tests.integration.test_bridge_faults import dead_letters

pytestmark = pytest.mark.integration

BAD_IDS = ["a/b", "x+y", "#", "nul\x00", "", "d" * 200]


async def test_thresholds_for_ids_that_are_no_topic_level_are_dead_lettered(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    tag = uuid.uuid4().hex[:6]
    device = f"g{tag}-0"
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

    bad = [threshold(bad_id, 3) for bad_id in BAD_IDS]
    for record in bad:
        record["reason"] = f"test-{tag}"
    await produce(
        infra_stack,
        [
            *[("control.thresholds.v1", f"k{tag}", "ThresholdUpdate", r) for r in bad],
            ("control.thresholds.v1", device, "ThresholdUpdate", threshold(device, 9)),
        ],
    )

    async def arrived() -> list[dict[str, Any]]:
        return await retained(infra_stack, device, "threshold")

    got = await until(arrived)
    assert [t["threshold_version"] for t in got] == [9]
    assert bridge.proc is not None and bridge.proc.poll() is None, bridge.log.read_text()
    assert infra_stack.registry is not None
    letters = await dead_letters(
        infra_stack.kafka.bootstrap,
        infra_stack.registry.url,
        ["control.thresholds.dlq.v1"],
        device_prefix="",
        expected=len(bad),
        payload_marker=f"test-{tag}".encode(),
    )
    assert sorted(str(r["reason"]) for r in letters) == ["bad_target"] * len(bad)
    assert all(r["stage"] == "bridge-downlink" for r in letters)


async def test_a_registry_outage_delays_a_threshold_but_never_skips_it(
    kafka_flavor: str,
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]],
    mosquitto: Mosquitto,
    bridges: list[BridgeProcess],
    tmp_path: Path,
) -> None:
    # A Kafka of its own: the bridge must not have seen the threshold's schema id before.
    kafka = await kafka_factory(kafka_flavor)
    registry = RegistryProcess(tmp_path / "registry", kafka.bootstrap)
    await registry.start()
    try:
        stack = InfraEndpoints.write(tmp_path / "home", mosquitto, kafka, registry)
        await prepare(stack)
        tag = uuid.uuid4().hex[:6]
        device = f"r{tag}-0"
        bridge = BridgeProcess(
            stack.home,
            f"bridge-{tag}",
            tmp_path / "bridge.log",
            EDGELOOP_BRIDGE_DOWNLINK_GROUP=f"downlink-{tag}",
            EDGELOOP_BRIDGE_SHARE_GROUP=tag,
        )
        bridge.downlink = True
        bridges.append(bridge)
        bridge.start()
        await bridge.subscribed()
        # Framed with the registered id, produced once the registry is down: the bridge
        # has never seen that id and must fetch the schema to decode the record.
        schema = catalog.get("ThresholdUpdate")
        async with RegistryClient(registry.url) as client:
            schema_id = await client.register(subject_for("control.thresholds.v1"), schema.text)
        await registry.stop()
        value = ConfluentCodec().encode(schema_id, schema, threshold(device, 4))
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait("control.thresholds.v1", value, key=device.encode())
        finally:
            await producer.stop()
        async with asyncio.timeout(60):
            while "registry unavailable; retrying (downlink)" not in bridge.log.read_text():
                assert bridge.proc is not None and bridge.proc.poll() is None, (
                    bridge.log.read_text()
                )
                await asyncio.sleep(0.5)
        await registry.start()

        async def arrived() -> list[dict[str, Any]]:
            return await retained(stack, device, "threshold")

        got = await until(arrived, timeout_s=90)
        assert [t["threshold_version"] for t in got] == [4]
        assert bridge.proc is not None and bridge.proc.poll() is None
    finally:
        await registry.stop()


async def test_a_broker_restart_does_not_stop_the_downlink(
    infra_stack: InfraEndpoints,
    mosquitto_factory: Callable[[], Awaitable[Mosquitto]],
    bridges: list[BridgeProcess],
    tmp_path: Path,
) -> None:
    """Mosquitto restarts under a running bridge: the downlink reconnects by itself and a
    threshold produced after the restart reaches its device. Before, the downlink's
    MQTT error ended the bridge process (uplink included)."""
    broker = await mosquitto_factory()  # a broker of its own, to restart
    assert infra_stack.registry is not None
    stack = InfraEndpoints.write(tmp_path / "home", broker, infra_stack.kafka, infra_stack.registry)
    await prepare(stack)
    tag = uuid.uuid4().hex[:6]
    device = f"m{tag}-0"
    bridge = BridgeProcess(
        stack.home,
        f"bridge-{tag}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_DOWNLINK_GROUP=f"downlink-{tag}",
        EDGELOOP_BRIDGE_SHARE_GROUP=tag,
    )
    bridge.downlink = True
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()

    async def version() -> int | None:
        got = await retained(stack, device, "threshold")
        return got[-1]["threshold_version"] if got else None

    await produce(
        stack, [("control.thresholds.v1", device, "ThresholdUpdate", threshold(device, 1))]
    )
    assert await until(version) == 1
    await broker.restart()
    await produce(
        stack, [("control.thresholds.v1", device, "ThresholdUpdate", threshold(device, 2))]
    )

    async def second() -> bool:
        assert bridge.proc is not None and bridge.proc.poll() is None, bridge.log.read_text()
        return await version() == 2

    assert await until(second, timeout_s=90)
    assert "mqtt connection lost; reconnecting (downlink)" in bridge.log.read_text()
