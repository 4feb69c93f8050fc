"""The bridge's asyncio MQTT receive path against a scripted broker on 127.0.0.1.

The "broker" here is a few lines of asyncio that write exact bytes, so each test pins one
rule of the protocol: which connection acknowledges what, keep-alive, packet size.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from edgeloop.core.settings import MqttSettings
from edgeloop.streams import mqtt_wire as wire
from edgeloop.streams.native_intake import NativeIntake, _Connection

TOPIC = "edgeloop/pi-1/up/inference"
CONNACK_SESSION_PRESENT = bytes.fromhex("2003010000")
SUBACK = bytes.fromhex("9004000100") + b"\x01"  # packet id 1, no properties, QoS 1 granted


def publish(packet_id: int, payload: bytes = b"x", topic: str = TOPIC) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", packet_id)
    body += b"\x00" + payload  # no properties
    return bytes([0x32]) + wire._varint(len(body)) + body  # PUBLISH, QoS 1


@dataclass
class Session:
    """What one client connection sent the scripted broker."""

    packets: list[tuple[int, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def of(self, kind: int) -> list[bytes]:
        return [body for k, body in self.packets if k == kind]


Script = Callable[[int, asyncio.StreamWriter], None]


@contextlib.asynccontextmanager
async def scripted_broker(
    on_connect: Script, *, answer_pings: bool = True, after_suback: bytes = b""
) -> AsyncIterator[tuple[int, list[Session]]]:
    """A broker on a free loopback port; `on_connect(n, writer)` answers the n-th CONNECT."""
    sessions: list[Session] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session()
        sessions.append(session)
        buf = b""
        try:
            while data := await reader.read(65536):
                buf += data
                packets, used, _ = wire.split_packets(buf)
                buf = buf[used:]
                for kind, _flags, body in packets:
                    session.packets.append((kind, bytes(body)))
                    session.changed.set()
                    if kind == wire.CONNECT:
                        on_connect(len(sessions), writer)
                    elif kind == wire.SUBSCRIBE:
                        writer.write(SUBACK + after_suback)
                    elif kind == wire.PINGREQ and answer_pings:
                        writer.write(b"\xd0\x00")
        except ConnectionError:
            pass
        finally:
            session.changed.set()
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, sessions
    finally:
        server.close()


def intake(port: int, **kw: int) -> NativeIntake:
    return NativeIntake(
        MqttSettings(host="127.0.0.1", port=port, username=None, password=None),
        client_id="bridge-test",
        topic_filter="$share/g/edgeloop/+/up/#",
        receive_maximum=50,
        session_expiry_s=3600,
        **kw,
    )


async def wait_for(condition: Callable[[], bool], sessions: list[Session]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - state of several connections
            await asyncio.sleep(0.02)


def pubacks(session: Session) -> list[int]:
    return [struct.unpack("!H", body[:2])[0] for body in session.of(wire.PUBACK)]


def _in_one_write(_n: int, writer: asyncio.StreamWriter) -> None:
    writer.write(CONNACK_SESSION_PRESENT + publish(101) + publish(102))


def _byte_by_byte(_n: int, writer: asyncio.StreamWriter) -> None:
    # Every read boundary at once: the transport may deliver these in any slices.
    for byte in CONNACK_SESSION_PRESENT + publish(101) + publish(102):
        writer.write(bytes([byte]))


@pytest.mark.parametrize("script", [_in_one_write, _byte_by_byte], ids=["one-write", "bytes"])
async def test_publishes_that_arrive_with_the_connack_are_acknowledged(script: Script) -> None:
    """A resumed session: CONNACK and the queued PUBLISHes of the session in one read."""
    async with scripted_broker(script) as (port, sessions):
        client = intake(port)
        await client.start()
        try:
            got = await client.batch(10)
            while len(got) < 2:
                got += await client.batch(10)
            assert [(m.mid, m.topic, m.payload) for m in got] == [
                (101, TOPIC, b"x"),
                (102, TOPIC, b"x"),
            ]
            for message in got:
                client.ack(message)
            await wait_for(lambda: len(pubacks(sessions[0])) == 2, sessions)
            assert pubacks(sessions[0]) == [101, 102]
        finally:
            client.stop()


async def test_an_ack_never_reaches_a_later_connection() -> None:
    def answer(n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(CONNACK_SESSION_PRESENT + (publish(7) if n == 1 else b""))
        if n == 1:
            writer.close()  # the first connection dies with message 7 unacknowledged

    async with scripted_broker(answer) as (port, sessions):
        client = intake(port)
        await client.start()
        try:
            [message] = await client.batch(10)
            await wait_for(
                lambda: len(sessions) == 2 and bool(sessions[1].of(wire.SUBSCRIBE)), sessions
            )
            client.ack(message)  # Kafka took it only now: packet id 7 means nothing here
            await asyncio.sleep(0.2)
            assert pubacks(sessions[1]) == []
        finally:
            client.stop()


async def test_a_broker_that_stops_answering_pings_is_left_and_reconnected() -> None:
    """Half-open: the connection stays up but nothing comes back, PINGRESP included."""

    def answer(_n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(CONNACK_SESSION_PRESENT)

    async with scripted_broker(answer, answer_pings=False) as (port, sessions):
        client = intake(port, keepalive_s=1)
        await client.start()
        try:
            await wait_for(lambda: len(sessions) >= 2, sessions)
            assert sessions[0].of(wire.PINGREQ), "no PINGREQ was sent on the silent connection"
        finally:
            client.stop()


async def test_a_server_keep_alive_in_the_connack_replaces_our_own() -> None:
    def answer(_n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes.fromhex("2006000003130001"))  # Server Keep Alive = 1 s

    async with scripted_broker(answer, answer_pings=False) as (port, sessions):
        client = intake(port, keepalive_s=600)
        await client.start()
        try:
            await wait_for(lambda: len(sessions) >= 2, sessions)
        finally:
            client.stop()


async def test_a_packet_over_our_maximum_is_refused_from_its_header() -> None:
    """The cap applies as soon as the remaining length is known: no body is awaited."""

    def answer(_n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(CONNACK_SESSION_PRESENT)

    # A PUBLISH that claims 64 MiB; only its first bytes ever come.
    huge = b"\x32" + wire._varint(64 << 20) + b"\x00"
    async with scripted_broker(answer, after_suback=huge) as (port, sessions):
        client = intake(port, maximum_packet_size=4096)
        # Not awaited: the connection is refused before it ever counts as established.
        starting = asyncio.create_task(client.start())
        try:
            await wait_for(lambda: bool(sessions and sessions[0].of(wire.DISCONNECT)), sessions)
            assert sessions[0].of(wire.DISCONNECT) == [b"\x95"]  # Packet too large
            [connect] = sessions[0].of(wire.CONNECT)
            assert b"\x27" + struct.pack("!I", 4096) in connect  # announced in CONNECT
        finally:
            client.stop()
            starting.cancel()


class _Recorder:
    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def received(self, publish: wire.Publish, _generation: int) -> None:
        self.payloads.append(publish.payload)


async def test_reassembly_parses_a_large_packet_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear reassembly: a 4 MiB PUBLISH in 64 KiB reads is parsed once it is complete,
    not re-copied and re-parsed on every read (which was quadratic in its size)."""
    parsed: list[int] = []
    real = wire.split_packets

    def counting(buf: bytes, max_body: int | None = None) -> tuple[object, int, int]:
        parsed.append(len(buf))
        return real(buf, max_body)

    monkeypatch.setattr(wire, "split_packets", counting)
    recorder = _Recorder()
    conn = _Connection(recorder, generation=1, max_body=None)  # type: ignore[arg-type]
    payload = bytes(range(256)) * (16 * 1024)
    data = publish(1, payload) + publish(2, b"tail")
    for i in range(0, len(data), 65536):
        conn.data_received(data[i : i + 65536])
    assert recorder.payloads == [payload, b"tail"]
    assert sum(parsed) <= 2 * len(data), f"{sum(parsed)} bytes parsed for {len(data)} received"
