"""The bridge against real Mosquitto, a real Kafka broker and the real registry.

Every test counts what a user would count: events in Kafka by event id, duplicates,
per-device order, dead letters by reason. The bridge runs as its own process (the way
operators run it), so SIGKILL is real.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import pytest

from edgeloop.bench.fleet_load import collect, encoded_events, publish_events
from edgeloop.infra.testing import InfraEndpoints
from tests.integration.bridge_support import (
    RECEIVE_MAXIMUM,
    BridgeProcess,
    check_delivery,
    distinct_records,
    duplicate_report,
    mqtt_settings,
    prepare,
)

pytestmark = pytest.mark.integration


async def test_no_event_is_lost_when_the_bridge_is_killed_twice(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    prefix = f"k{uuid.uuid4().hex[:6]}"
    messages = encoded_events(devices=50, per_device=1000, prefix=prefix)  # 50,000 events
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()
    mqtt = mqtt_settings(infra_stack)
    publishing = asyncio.create_task(
        asyncio.to_thread(publish_events, mqtt, messages, client_id=f"load-{prefix}", rate=8000)
    )
    bootstrap = infra_stack.kafka.bootstrap
    for kills, fraction in enumerate((0.3, 0.6), start=1):
        # Kill once the bridge has moved a share of the events into Kafka.
        await collect(
            bootstrap,
            "edge.inference.v1",
            int(len(messages) * fraction),
            key_prefix=prefix,
            timeout_s=120,
            idle_s=60,
        )
        bridge.kill()
        await asyncio.sleep(0.5)
        bridge.start()
        await bridge.subscribed(times=kills + 1)
    published = await publishing
    got = await collect(
        bootstrap, "edge.inference.v1", len(messages), key_prefix=prefix, timeout_s=240, idle_s=30
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(50) for s in range(1000)}
    # Each kill may leave Receive Maximum messages in Kafka but not acknowledged on MQTT:
    # redelivered, so written twice. A publisher that reconnected resent its own window.
    reconnects = max(0, published.connects - 1)
    check_delivery(
        *distinct_records(got), expected,
        window=2 * RECEIVE_MAXIMUM + reconnects * published.inflight, logs=(bridge.log,),
        context=f"publisher connects: {published.connects}; {duplicate_report(got)}",
    )  # fmt: skip


async def test_two_bridges_share_the_load_and_deliver_everything(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    prefix = f"s{uuid.uuid4().hex[:6]}"
    messages = encoded_events(devices=20, per_device=500, prefix=prefix)
    # One bridge on each MQTT receive path: the asyncio one (default) and paho's.
    for i, intake in enumerate(("native", "paho")):
        bridge = BridgeProcess(
            infra_stack.home,
            f"bridge-{prefix}-{i}",
            tmp_path / f"bridge-{i}.log",
            EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
            EDGELOOP_BRIDGE_INTAKE=intake,
        )
        bridges.append(bridge)
        bridge.start()
    for bridge in bridges:
        await bridge.subscribed()
    await asyncio.to_thread(
        publish_events, mqtt_settings(infra_stack), messages, client_id=f"load-{prefix}"
    )
    got = await collect(
        infra_stack.kafka.bootstrap,
        "edge.inference.v1",
        len(messages),
        key_prefix=prefix,
        timeout_s=120,
        idle_s=15,
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(20) for s in range(500)}
    # A shared subscription deals one device's messages to both bridges, so Kafka order
    # across them is not per-device order: consumers order by seq (docs/architecture.md).
    check_delivery(got.event_ids, got.keys, expected, window=0, ordered=False)
    shares = Counter(got.bridges)
    assert set(shares) == {f"bridge-{prefix}-0", f"bridge-{prefix}-1"}, shares
    assert min(shares.values()) > len(messages) * 0.1, f"one bridge idled: {shares}"
