"""MQTT intake on asyncio with the hand-made MQTT 5 codec (see mqtt_wire for why).

Same contract as the paho intake (`intake.py`): messages in arrival order through
`batch()`, `ack()` by packet id once Kafka has the record, the broker's Receive Maximum as
the only flow control. Everything runs on the event loop: no thread, no lock; PUBACKs of
one loop iteration leave in one write.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections import deque

from edgeloop.core.logs import get_logger
from edgeloop.core.settings import MqttSettings
from edgeloop.streams import mqtt_wire as wire
from edgeloop.streams.intake import Incoming

log = get_logger(__name__)


class _Connection(asyncio.Protocol):
    def __init__(self, intake: NativeIntake) -> None:
        self.intake = intake
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[tuple[bool, int]] = loop.create_future()
        self.suback: asyncio.Future[list[int]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # Parse immutable bytes: views into them stay valid while the buffer shrinks.
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
        try:
            packets, used = wire.split_packets(data)
            for kind, flags, body in packets:
                self._handle(kind, flags, body)
        except (wire.ProtocolError, IndexError, UnicodeDecodeError) as exc:
            log.warning("mqtt protocol error; dropping the connection", extra={"error": repr(exc)})
            if self.transport:
                self.transport.close()
            return
        self.buf = bytearray(data[used:])

    def _handle(self, kind: int, flags: int, body: memoryview) -> None:
        if kind == wire.PUBLISH:
            self.intake.received(wire.parse_publish(flags, body))
        elif kind == wire.CONNACK and not self.connack.done():
            self.connack.set_result(wire.parse_connack(body))
        elif kind == wire.SUBACK and not self.suback.done():
            self.suback.set_result(wire.parse_suback(body)[1])
        elif kind == wire.DISCONNECT and self.transport:
            log.warning("broker sent DISCONNECT", extra={"reason": body[0] if body else 0})
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for waiting in (self.connack, self.suback):
            if not waiting.done():
                waiting.set_exception(ConnectionError(f"connection lost: {exc!r}"))
                waiting.exception()  # consumed here if nobody is waiting for it any more
        if not self.closed.done():
            self.closed.set_result(None)


class NativeIntake:
    def __init__(
        self,
        mqtt: MqttSettings,
        *,
        client_id: str,
        topic_filter: str,
        receive_maximum: int,
        session_expiry_s: int,
        keepalive_s: int = 30,
    ) -> None:
        self._mqtt = mqtt
        self._client_id = client_id
        self._filter = topic_filter
        self._receive_maximum = receive_maximum
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._pending: deque[Incoming] = deque()
        self._ready = asyncio.Event()
        self._connected = asyncio.Event()
        self._conn: _Connection | None = None
        self._acks: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self.connection_count = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._maintain(), name="mqtt-intake")
        try:
            async with asyncio.timeout(30):
                await self._connected.wait()
        except TimeoutError:
            self.stop()
            raise ConnectionError(
                f"MQTT broker {self._mqtt.host}:{self._mqtt.port} did not "
                "accept the connection within 30 s"
            ) from None

    def stop(self) -> None:
        if self._conn and self._conn.transport and not self._conn.transport.is_closing():
            self._flush()
            self._conn.transport.write(wire.DISCONNECT_PACKET)
            self._conn.transport.close()
        if self._task:
            self._task.cancel()

    async def batch(self, max_items: int) -> list[Incoming]:
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        pending = self._pending
        take = min(max_items, len(pending))
        return [pending.popleft() for _ in range(take)]

    def ack(self, item: Incoming) -> None:
        # Packet ids are per connection: never ack on a later connection (see intake.py).
        if item.qos and item.generation == self.connection_count:
            if not self._acks:
                asyncio.get_running_loop().call_soon(self._flush)
            self._acks.append(wire.puback(item.mid))

    @property
    def depth(self) -> int:
        return len(self._pending)

    def received(self, publish: wire.Publish) -> None:
        self._pending.append(
            Incoming(
                publish.packet_id,
                publish.qos,
                publish.topic,
                publish.payload,
                time.monotonic_ns(),
                self.connection_count,
            )
        )
        self._ready.set()

    def _flush(self) -> None:
        if self._acks and self._conn and self._conn.transport:
            self._conn.transport.write(b"".join(self._acks))
        self._acks.clear()

    async def _maintain(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._session()
                delay = 0.5
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("mqtt connection failed", extra={"error": repr(exc)})
            self._connected.clear()
            # Full jitter: many bridges must not reconnect in lockstep after a broker restart.
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311
            delay = min(delay * 2, 10.0)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        tls = None
        if self._mqtt.ca_file and self._mqtt.port == self._mqtt.tls_port:
            tls = ssl.create_default_context(cafile=str(self._mqtt.ca_file))
        _, conn = await loop.create_connection(
            lambda: _Connection(self), self._mqtt.host, self._mqtt.port, ssl=tls
        )
        assert conn.transport is not None
        password = self._mqtt.password.get_secret_value() if self._mqtt.password else None
        conn.transport.write(
            wire.connect(
                self._client_id,
                username=self._mqtt.username,
                password=password,
                keepalive=self._keepalive_s,
                clean_start=False,
                session_expiry_s=self._session_expiry_s,
                receive_maximum=self._receive_maximum,
            )
        )
        async with asyncio.timeout(10):
            _, reason = await conn.connack
        if reason != 0:
            conn.transport.close()
            raise ConnectionError(f"broker refused CONNECT with reason code {reason:#04x}")
        self.connection_count += 1
        self._conn = conn
        self._acks.clear()  # acks of the old connection must not reach this one
        conn.transport.write(wire.subscribe(1, self._filter))
        async with asyncio.timeout(10):
            codes = await conn.suback
        if not codes or codes[0] >= 0x80:
            conn.transport.close()
            raise ConnectionError(f"broker refused SUBSCRIBE {self._filter}: {codes}")
        log.info(
            "mqtt connected",
            extra={"filter": self._filter, "receive_maximum": self._receive_maximum},
        )
        self._connected.set()
        try:
            while not conn.closed.done():
                await asyncio.wait([conn.closed], timeout=self._keepalive_s / 2)
                if not conn.closed.done() and conn.transport and not conn.transport.is_closing():
                    conn.transport.write(wire.PINGREQ_PACKET)
        finally:
            log.warning("mqtt disconnected", extra={"client_id": self._client_id})
