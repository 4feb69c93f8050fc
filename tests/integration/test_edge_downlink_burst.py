"""A burst of downlink messages at a device that handles them slowly: none is lost.

aiomqtt acknowledges a QoS 1 message when it arrives, before the device handled it, so
the broker goes on sending; a bounded incoming queue then discarded messages the broker
already counted as delivered ("Message queue is full. Discarding message.")."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiomqtt
import pytest

from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.outbox import Outbox
from edgeloop.edge.uplink import LinkConfig, MqttUplink
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.schemas.topics import DownlinkKind, mqtt_downlink

pytestmark = pytest.mark.integration

BURST = 400


async def test_a_burst_of_verdicts_at_a_slow_device_loses_none(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    device = f"burst-{uuid.uuid4().hex[:6]}"
    creds = mosquitto.device_credentials(device)
    got: list[bytes] = []

    async def slow(kind: DownlinkKind, payload: bytes) -> None:
        await asyncio.sleep(0.005)  # a device busy with inference between messages
        if kind is DownlinkKind.VERDICT:
            got.append(payload)

    uplink = MqttUplink(
        LinkConfig(device, mosquitto.host, mosquitto.tls_port, creds.ssl_context()),
        Outbox(tmp_path / "o.db", capacity=10),
        on_downlink=slow,
        will=lambda: b"",
        metrics=EdgeMetrics(),
    )
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(uplink.run())
        async with asyncio.timeout(30):
            await uplink.connected.wait()
        async with aiomqtt.Client(
            mosquitto.host,
            mosquitto.port,
            username=mosquitto.username,
            password=mosquitto.password.get_secret_value(),
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as cloud:
            topic = mqtt_downlink(device, DownlinkKind.VERDICT)
            for i in range(BURST):
                await cloud.publish(topic, f"verdict-{i}".encode(), qos=1)
        try:
            async with asyncio.timeout(60):
                while len(got) < BURST:  # noqa: ASYNC110 - filled by the uplink's task
                    await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        run.cancel()
    assert sorted(got, key=lambda p: int(p.split(b"-")[1])) == [
        f"verdict-{i}".encode() for i in range(BURST)
    ], f"{BURST - len(set(got))} of {BURST} verdicts lost"
