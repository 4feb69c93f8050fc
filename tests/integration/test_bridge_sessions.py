"""The bridge's MQTT session against real Mosquitto: resumed sessions, oversized
publishes, half-open connections and graceful stops. Each test counts events in Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
import uuid
from pathlib import Path

import pytest

from edgeloop.bench.fleet_load import collect, encoded_events, publish_events
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.ports import free_port
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas.topics import UplinkKind, mqtt_uplink
from edgeloop.streams import mqtt_wire as wire
from edgeloop.streams.intake import Incoming, MqttIntake
from edgeloop.streams.native_intake import NativeIntake
from tests.integration.bridge_support import (
    BridgeProcess,
    check_delivery,
    mqtt_settings,
    prepare,
)

pytestmark = pytest.mark.integration


async def test_a_resumed_session_with_a_small_window_delivers_everything(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    """Events queued in a killed bridge's session come right behind the CONNACK when it
    returns: each must be acknowledged, or the window fills and the bridge stalls."""
    await prepare(infra_stack)
    prefix = f"q{uuid.uuid4().hex[:6]}"
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        receive_maximum=50,
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
        EDGELOOP_BRIDGE_METRICS_PORT=str(free_port()),
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()
    bridge.kill()  # its session stays with the broker and queues what comes next

    messages = encoded_events(devices=10, per_device=100, prefix=prefix)
    await asyncio.to_thread(
        publish_events, mqtt_settings(infra_stack), messages, client_id=f"load-{prefix}"
    )
    bridge.start()
    got = await collect(
        infra_stack.kafka.bootstrap,
        "edge.inference.v1",
        len(messages),
        key_prefix=f"{prefix}-",
        timeout_s=90,
        idle_s=30,
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(10) for s in range(100)}
    check_delivery(got.event_ids, got.keys, expected, window=50)
    async with asyncio.timeout(30):
        while (in_flight := bridge.metric("edgeloop_bridge_uplink_in_flight")) != 0:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    assert in_flight == 0

    # Every message was acknowledged: a restart now finds nothing left in the session.
    # An unacknowledged one would come back and land in Kafka a second time.
    bridge.kill()
    bridge.start()
    await bridge.subscribed(times=3)
    after = await collect(
        infra_stack.kafka.bootstrap,
        "edge.inference.v1",
        len(messages) + 1,  # more than can come: read until nothing new for idle_s
        key_prefix=f"{prefix}-",
        timeout_s=60,
        idle_s=10,
    )
    redelivered = len(after.event_ids) - len(got.event_ids)
    assert redelivered == 0, f"{redelivered} messages were never acknowledged"


async def _raw_publish(
    mosquitto: Mosquitto, packets: list[tuple[str, bytes]], client_id: str
) -> list[int]:
    """Publish at QoS 1 one at a time on one MQTT 5 connection; the PUBACK reason codes."""
    reader, writer = await asyncio.open_connection(mosquitto.host, mosquitto.port)
    try:
        writer.write(
            wire.connect(
                client_id,
                username=mosquitto.username,
                password=mosquitto.password.get_secret_value(),
                keepalive=30,
                clean_start=True,
                session_expiry_s=0,
                receive_maximum=10,
            )
        )
        header = await reader.readexactly(2)
        assert header[0] == 0x20 and header[1] < 0x80, header.hex()
        connack = await reader.readexactly(header[1])
        assert connack[1] == 0, f"CONNECT refused: {connack[1]:#04x}"
        reasons = []
        for packet_id, (topic, payload) in enumerate(packets, start=1):
            body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", packet_id)
            body += b"\x00" + payload
            writer.write(b"\x32" + wire._varint(len(body)) + body)
            header = await reader.readexactly(2)
            assert header[0] == 0x40, f"expected PUBACK, got {header.hex()}"
            ack = await reader.readexactly(header[1])
            assert struct.unpack("!H", ack[:2])[0] == packet_id
            reasons.append(ack[2] if len(ack) > 2 else 0)
        return reasons
    finally:
        writer.close()


async def test_an_oversized_publish_is_refused_at_the_broker_while_others_flow(
    infra_stack: InfraEndpoints,
    mosquitto: Mosquitto,
    bridges: list[BridgeProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    prefix = f"h{uuid.uuid4().hex[:6]}"
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()
    good = encoded_events(devices=4, per_device=100, prefix=prefix)
    publishing = asyncio.create_task(
        asyncio.to_thread(
            publish_events, mqtt_settings(infra_stack), good, client_id=f"load-{prefix}"
        )
    )
    big_topic = mqtt_uplink(f"{prefix}-big", UplinkKind.INFERENCE)
    huge = b"\xc3\x01" + bytes(300 * 1024)  # over the generated 256 KiB limit
    reasons = await _raw_publish(
        mosquitto, [(big_topic, huge), (big_topic, good[0][1])], f"big-{prefix}"
    )
    # 0x95 "Packet too large" from Mosquitto: a failure the device can see; the same
    # connection stays usable (its next publish goes through).
    assert reasons[0] >= 0x80, f"oversized publish acknowledged with {reasons[0]:#04x}"
    assert reasons[1] == 0x00
    await publishing
    got = await collect(
        infra_stack.kafka.bootstrap,
        "edge.inference.v1",
        len(good),
        key_prefix=f"{prefix}-",
        timeout_s=90,
        idle_s=15,
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(4) for s in range(100)}
    # The small publish of the "big" device carried device 0's event: a device_mismatch
    # dead letter, so only the good events reach the topic.
    check_delivery(got.event_ids, got.keys, expected, window=0)


class FreezableProxy:
    """A TCP proxy on 127.0.0.1. `freeze()` makes the connections open now go silent in
    both directions while staying open (a half-open path); later ones forward normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._frozen: list[asyncio.Event] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def freeze(self) -> None:
        for frozen in self._frozen:
            frozen.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # swallow it, and everything after it
                dst.write(data)
            if not frozen.is_set():
                dst.close()

        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_a_half_open_connection_is_noticed_and_the_bridge_reconnects(
    infra_stack: InfraEndpoints,
    mosquitto: Mosquitto,
    bridges: list[BridgeProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    prefix = f"p{uuid.uuid4().hex[:6]}"
    async with FreezableProxy(mosquitto.port) as proxy:
        bridge = BridgeProcess(
            infra_stack.home,
            f"bridge-{prefix}",
            tmp_path / "bridge.log",
            EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
            EDGELOOP_MQTT_PORT=str(proxy.port),
            EDGELOOP_BRIDGE_KEEPALIVE_S="2",
        )
        bridges.append(bridge)
        bridge.start()
        await bridge.subscribed()
        mqtt = mqtt_settings(infra_stack)  # devices publish to Mosquitto directly
        messages = encoded_events(devices=5, per_device=80, prefix=prefix)
        half = len(messages) // 2
        await asyncio.to_thread(publish_events, mqtt, messages[:half], client_id=f"a-{prefix}")
        await collect(
            infra_stack.kafka.bootstrap, "edge.inference.v1", half, key_prefix=f"{prefix}-"
        )

        proxy.freeze()  # the bridge's connection still looks open; nothing passes
        await asyncio.to_thread(publish_events, mqtt, messages[half:], client_id=f"b-{prefix}")
        got = await collect(
            infra_stack.kafka.bootstrap,
            "edge.inference.v1",
            len(messages),
            key_prefix=f"{prefix}-",
            timeout_s=60,
            idle_s=30,
        )
        expected = {f"{prefix}-{d}:{s}" for d in range(5) for s in range(80)}
        check_delivery(got.event_ids, got.keys, expected, window=0, ordered=False)
        assert proxy.connections >= 2  # it left the silent connection for a new one


@pytest.mark.parametrize("drain_timeout_s", ["5", "0.001"], ids=["drained", "drain-cut-short"])
async def test_sigterm_under_load_drains_so_a_restart_duplicates_nothing(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path, drain_timeout_s: str
) -> None:
    """SIGTERM while the bridge works through a backlog: every record it put in Kafka is
    acknowledged before it disconnects, so the restarted bridge duplicates nothing.

    Also when the drain runs out of time (cut short here, as a slow Kafka does): the
    records still in the producer reach Kafka when it stops, and must be acknowledged too.

    The backlog is made, not hoped for: the bridge is paused (SIGSTOP) while all events
    are published, so at the SIGTERM its window is full and slices are on their way to
    Kafka whatever the machine's speed (a bridge that keeps up with a paced publisher
    holds nothing at the stop, and the drain is not tested at all)."""
    await prepare(infra_stack)
    prefix = f"t{uuid.uuid4().hex[:6]}"
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
        EDGELOOP_BRIDGE_DRAIN_TIMEOUT_S=drain_timeout_s,
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()
    assert bridge.proc is not None
    messages = encoded_events(devices=20, per_device=400, prefix=prefix)
    bridge.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.to_thread(
            publish_events, mqtt_settings(infra_stack), messages, client_id=f"load-{prefix}"
        )
    finally:
        bridge.proc.send_signal(signal.SIGCONT)
    bootstrap = infra_stack.kafka.bootstrap
    await collect(bootstrap, "edge.inference.v1", len(messages) // 4, key_prefix=f"{prefix}-")
    bridge.stop()  # SIGTERM while thousands are still queued for it
    assert bridge.proc.returncode == 0, bridge.log.read_text()
    bridge.start()
    got = await collect(
        bootstrap,
        "edge.inference.v1",
        len(messages),
        key_prefix=f"{prefix}-",
        timeout_s=120,
        idle_s=20,
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(20) for s in range(400)}
    check_delivery(got.event_ids, got.keys, expected, window=0, ordered=False)


@pytest.mark.parametrize("intake", ["native", "paho"])
async def test_sigterm_right_after_a_paused_backlog_duplicates_nothing(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path, intake: str
) -> None:
    """A small window, a backlog queued while the bridge was paused, and SIGTERM a moment
    after it resumes (while the broker is still pouring the backlog in): whatever the
    broker sent, a graceful stop leaves no record both in Kafka and unacknowledged, so
    the restarted bridge duplicates nothing. Mosquitto 2.0 sends a paused client more
    than its Receive Maximum (see docs/architecture.md, "Receive Maximum"); this once
    left 378 duplicates with the paho intake."""
    await prepare(infra_stack)
    prefix = f"w{uuid.uuid4().hex[:6]}"
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        receive_maximum=50,
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
        EDGELOOP_BRIDGE_INTAKE=intake,
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()
    assert bridge.proc is not None
    messages = encoded_events(devices=10, per_device=300, prefix=prefix)
    bridge.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.to_thread(
            publish_events, mqtt_settings(infra_stack), messages, client_id=f"load-{prefix}"
        )
    finally:
        bridge.proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(0.3)
    bridge.stop()  # SIGTERM while the backlog is still arriving
    assert bridge.proc.returncode == 0, bridge.log.read_text()
    bridge.start()
    got = await collect(
        infra_stack.kafka.bootstrap,
        "edge.inference.v1",
        len(messages),
        key_prefix=f"{prefix}-",
        timeout_s=120,
        idle_s=20,
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(10) for s in range(300)}
    check_delivery(got.event_ids, got.keys, expected, window=0, ordered=False)


async def _batch_or_none(intake: MqttIntake | NativeIntake, timeout_s: float) -> list[Incoming]:
    try:
        async with asyncio.timeout(timeout_s):
            return await intake.batch(100_000)
    except TimeoutError:
        return []


@pytest.mark.parametrize("intake_type", [NativeIntake, MqttIntake], ids=["native", "paho"])
async def test_the_last_pubacks_before_a_close_reach_the_broker(
    infra_stack: InfraEndpoints, intake_type: type[MqttIntake | NativeIntake]
) -> None:
    """Acknowledge everything received, then close while the broker is still writing (it
    overshoots the window of 50 on a backlog): every acknowledged message is settled at
    the broker, so a resumed session brings back exactly the unacknowledged ones. A
    socket closed with bytes unread sends RST, and the broker then dropped the last
    PUBACKs (the paho intake used to close at once). A guard: whether the old close lost
    PUBACKs here depended on timing."""
    mqtt = mqtt_settings(infra_stack)
    client_id = f"c{uuid.uuid4().hex[:6]}"
    topic_filter = f"$share/{client_id}/edgeloop/+/up/#"
    messages = encoded_events(devices=10, per_device=300, size=2000, prefix=client_id)
    intake = intake_type(
        mqtt, client_id=client_id, topic_filter=topic_filter, receive_maximum=50,
        session_expiry_s=300,
    )  # fmt: skip
    await intake.start()
    await asyncio.to_thread(publish_events, mqtt, messages, client_id=f"load-{client_id}")
    acked = 0
    for _ in range(4):  # each PUBACK releases more: the broker is writing at the close
        batch = await _batch_or_none(intake, 5)
        for item in batch:
            intake.ack(item)
        acked += len(batch)
        await asyncio.sleep(0.05)
    await intake.close()
    assert acked > 0

    resumed = NativeIntake(
        mqtt, client_id=client_id, topic_filter=topic_filter, receive_maximum=65535,
        session_expiry_s=0,
    )  # fmt: skip
    await resumed.start()
    back = 0
    while batch := await _batch_or_none(resumed, 3):
        back += len(batch)
    await resumed.close()
    assert back == len(messages) - acked, f"{acked} acknowledged, {back} came back"
