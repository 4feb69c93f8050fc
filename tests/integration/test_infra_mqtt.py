"""Mosquitto as the launcher configures it: who may connect, and who may publish where.

Every claim here is about messages a user would (not) see: a refused device gets no
session, a spoofed topic is not delivered to the cloud, a shared group splits the load.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.pki import DevPki

pytestmark = pytest.mark.integration

V5 = aiomqtt.ProtocolVersion.V5


def cloud(m: Mosquitto, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(
        m.host,
        m.port,
        username=m.username,
        password=m.password.get_secret_value(),
        protocol=V5,
        timeout=10,
        **kwargs,
    )  # type: ignore[arg-type]


def device(m: Mosquitto, device_id: str) -> aiomqtt.Client:
    creds = m.device_credentials(device_id)
    return aiomqtt.Client(
        m.host,
        m.tls_port,
        tls_context=creds.ssl_context(),
        protocol=V5,
        identifier=f"{device_id}-{uuid.uuid4().hex[:6]}",
        timeout=10,
    )


async def receive_until(
    client: aiomqtt.Client, last: bytes, limit_s: float = 30
) -> list[tuple[str, bytes]]:
    """Every message up to and including the one whose payload is `last`."""
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(limit_s):
        async for message in client.messages:
            payload = bytes(message.payload)  # type: ignore[arg-type]
            got.append((str(message.topic), payload))
            if payload == last:
                return got
    return got


async def connects(client: aiomqtt.Client) -> bool:
    try:
        async with client:
            return True
    except aiomqtt.MqttError:
        return False


async def test_device_without_client_certificate_is_refused(mosquitto: Mosquitto) -> None:
    no_identity = ssl.create_default_context(cafile=str(mosquitto.ca_file))
    client = aiomqtt.Client(
        mosquitto.host, mosquitto.tls_port, tls_context=no_identity, protocol=V5, timeout=5
    )
    assert not await connects(client)
    # The same TLS settings with a certificate get in: the refusal was about the cert.
    assert await connects(device(mosquitto, "dev-a"))


async def test_certificate_from_another_ca_is_refused(mosquitto: Mosquitto, tmp_path: Path) -> None:
    foreign = DevPki(tmp_path / "other-ca").device_cert("dev-a")
    ctx = ssl.create_default_context(cafile=str(mosquitto.ca_file))  # trusts the broker
    ctx.load_cert_chain(str(foreign.cert), str(foreign.key))
    client = aiomqtt.Client(
        mosquitto.host, mosquitto.tls_port, tls_context=ctx, protocol=V5, timeout=5
    )
    assert not await connects(client)


async def test_cloud_listener_needs_the_password(mosquitto: Mosquitto) -> None:
    anonymous = aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=V5, timeout=5)
    wrong = aiomqtt.Client(
        mosquitto.host,
        mosquitto.port,
        username=mosquitto.username,
        password="not-the-password",
        protocol=V5,
        timeout=5,
    )
    # A device name without a password is no way in either.
    device_name = aiomqtt.Client(
        mosquitto.host, mosquitto.port, username="dev-a", protocol=V5, timeout=5
    )
    assert not await connects(anonymous)
    assert not await connects(wrong)
    assert not await connects(device_name)
    assert await connects(cloud(mosquitto))


async def test_device_cannot_publish_under_another_device(mosquitto: Mosquitto) -> None:
    run = uuid.uuid4().hex[:8].encode()
    async with cloud(mosquitto) as sub:
        await sub.subscribe("edgeloop/dev-a/up/#", qos=1)
        await sub.subscribe("edgeloop/dev-b/up/#", qos=1)
        async with device(mosquitto, "dev-a") as dev_a:
            # Interleaved: spoofed messages sent before and between the genuine ones.
            await dev_a.publish("edgeloop/dev-b/up/inference", b"spoof-1-" + run, qos=1)
            await dev_a.publish("edgeloop/dev-a/up/inference", b"own-1-" + run, qos=1)
            await dev_a.publish("edgeloop/dev-b/up/status", b"spoof-2-" + run, qos=1)
            await dev_a.publish("edgeloop/dev-a/up/status", b"own-2-" + run, qos=1)
        got = await receive_until(sub, b"own-2-" + run)
    # Mosquitto routes one connection's publishes in order: had a spoof been let through,
    # it would have arrived before own-2.
    assert got == [
        ("edgeloop/dev-a/up/inference", b"own-1-" + run),
        ("edgeloop/dev-a/up/status", b"own-2-" + run),
    ]


async def test_device_reads_only_its_own_subtree(mosquitto: Mosquitto) -> None:
    run = uuid.uuid4().hex[:8].encode()
    async with device(mosquitto, "dev-b") as dev_b, cloud(mosquitto) as pub:
        # Granted (Mosquitto checks reads per message, not per filter) but filtered.
        await dev_b.subscribe("edgeloop/#", qos=1)
        await pub.publish("edgeloop/dev-a/down/threshold", b"for-a-" + run, qos=1)
        await pub.publish("edgeloop/dev-b/down/threshold", b"for-b-" + run, qos=1)
        got = await receive_until(dev_b, b"for-b-" + run)
    assert [payload for _, payload in got if payload.endswith(run)] == [b"for-b-" + run]


async def test_cloud_shared_subscription_splits_the_uplink(mosquitto: Mosquitto) -> None:
    group = f"bridge-{uuid.uuid4().hex[:6]}"
    topic_filter = f"$share/{group}/edgeloop/+/up/#"
    n = 40
    received: list[list[bytes]] = [[], []]
    all_seen = asyncio.Event()

    async def collect(client: aiomqtt.Client, into: list[bytes]) -> None:
        async for message in client.messages:
            into.append(bytes(message.payload))  # type: ignore[arg-type]
            if sum(map(len, received)) >= n:
                all_seen.set()

    async with cloud(mosquitto) as one, cloud(mosquitto) as two:
        for client in (one, two):
            await client.subscribe(topic_filter, qos=1)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(collect(one, received[0])),
                tg.create_task(collect(two, received[1])),
            ]
            async with device(mosquitto, "dev-share") as dev:
                for i in range(n):
                    await dev.publish("edgeloop/dev-share/up/inference", b"%d" % i, qos=1)
            async with asyncio.timeout(30):
                await all_seen.wait()
            for task in tasks:
                task.cancel()
    everything = received[0] + received[1]
    assert sorted(everything, key=int) == [b"%d" % i for i in range(n)]  # once each
    # Both members of the group got work.
    assert received[0]
    assert received[1]


@asynccontextmanager
async def persistent_bridge(m: Mosquitto, client_id: str) -> AsyncIterator[aiomqtt.Client]:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    async with cloud(m, identifier=client_id, clean_start=False, properties=props) as client:
        yield client


async def test_queued_qos1_messages_survive_a_broker_restart(
    mosquitto_factory: Callable[[], Awaitable[Mosquitto]],
) -> None:
    m = await mosquitto_factory()
    async with persistent_bridge(m, "bridge-1") as bridge:
        await bridge.subscribe("$share/bridge/edgeloop/+/up/#", qos=1)
    # The bridge is away; the device's messages queue in its persistent session.
    async with device(m, "dev-p") as dev:
        for i in range(5):
            await dev.publish("edgeloop/dev-p/up/inference", b"m%d" % i, qos=1)
    await m.restart()  # SIGTERM: Mosquitto writes its persistence file on the way out
    async with persistent_bridge(m, "bridge-1") as bridge:
        got = await receive_until(bridge, b"m4")
    assert [payload for _, payload in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
