"""MQTT intake on asyncio with the hand-made MQTT 5 codec (see mqtt_wire for why).

Same contract as the paho intake (`intake.py`): messages in arrival order through
`batch()`, `ack()` by packet id once Kafka has the record, the Receive Maximum announced
in CONNECT as the only flow control (which Mosquitto 2.0.11 overshoots on a backlog, so
the deque may hold more than the window; see docs/architecture.md). Everything runs on the
event loop: no thread, no lock; PUBACKs of one loop iteration leave in one write.

What the hand-written receive path guarantees (each was a fault once):

- **Generations belong to connections.** Packet ids are per connection, so every message
  carries the generation of the connection it arrived on, fixed when that connection was
  made. A resumed session's queued PUBLISHes that arrive in the same read as the CONNACK
  (Mosquitto writes them right behind it) are this connection's and are acknowledged on
  it; an ack for an earlier connection's message is never sent on a later one.
- **Bounded, linear reassembly.** A packet's remaining length is checked against the
  Maximum Packet Size announced in CONNECT as soon as it is decoded; a partial packet is
  appended to, never re-parsed or re-copied per read, and parsed once when complete.
- **Keep-alive in full** (MQTT 5 section 3.1.2.10 and 4.13): a PINGREQ every half
  keep-alive (the server's Server Keep Alive when it sets one), and a connection that
  stays silent for a whole keep-alive after a PINGREQ (no PINGRESP, nothing else either)
  is lost: it is aborted and the intake reconnects. The 1.5x rule is the server's.
- **A graceful stop's last PUBACKs arrive.** Closing a TCP socket whose receive buffer
  still holds unread bytes makes the kernel send RST and drop what it has not sent yet,
  our last PUBACKs and the DISCONNECT included. The broker keeps writing up to the stop
  (Mosquitto 2.0.11 sends far more than the Receive Maximum on a backlog, see
  docs/architecture.md), so the socket is never closed with data pending: after
  DISCONNECT the intake reads and discards until the broker closes the connection
  (bounded by `_LINGER_S`), and only then closes its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque

from edgeloop.core.logs import get_logger
from edgeloop.core.retry import Backoff
from edgeloop.core.settings import MqttSettings
from edgeloop.streams import mqtt_wire as wire
from edgeloop.streams.intake import Incoming

log = get_logger(__name__)

# Reconnecting to the broker: 0.5 s doubling to 10 s, jittered (many bridges must not
# reconnect in lockstep after a broker restart).
_RECONNECT = Backoff(initial_s=0.5, max_s=10.0)
# After our DISCONNECT, how long to wait for the broker to close the connection (it does
# at once) before closing it ourselves.
_LINGER_S = 5.0


class _Connection(asyncio.Protocol):
    def __init__(self, intake: NativeIntake, generation: int, max_body: int | None) -> None:
        self.intake = intake
        self.generation = generation
        self.max_body = max_body
        # A packet being reassembled, and its full size once its header was complete.
        self.partial = bytearray()
        self.need = 0
        self.transport: asyncio.Transport | None = None
        # Set once our DISCONNECT is written: what still comes is read and discarded.
        self.stopping = False
        self.last_received = time.monotonic()
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[wire.Connack] = loop.create_future()
        self.suback: asyncio.Future[list[int]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        if self.stopping:
            return  # read only so that closing sends FIN, not RST (module docstring)
        if self.partial:
            # Append only (amortised linear); parse once the packet is complete.
            self.partial += data
            if len(self.partial) < self.need:
                return
            data = bytes(self.partial)
            self.partial = bytearray()
        try:
            # Parse immutable bytes: views into them stay valid while handlers run.
            packets, used, self.need = wire.split_packets(data, self.max_body)
            for kind, flags, body in packets:
                self._handle(kind, flags, body)
        except wire.PacketTooLargeError as exc:
            log.warning(
                "broker sent a packet over our Maximum Packet Size; disconnecting (0x95)",
                extra={"error": str(exc)},
            )
            self._drop(wire.DISCONNECT_TOO_LARGE)
            return
        except (wire.ProtocolError, IndexError, UnicodeDecodeError) as exc:
            log.warning("mqtt protocol error; dropping the connection", extra={"error": repr(exc)})
            self._drop(None)
            return
        if used < len(data):
            self.partial = bytearray(memoryview(data)[used:])

    def _drop(self, last_words: bytes | None) -> None:
        self.partial = bytearray()
        if self.transport and not self.transport.is_closing():
            if last_words:
                self.transport.write(last_words)
            self.transport.close()

    def _handle(self, kind: int, flags: int, body: memoryview) -> None:
        if kind == wire.PUBLISH:
            self.intake.received(wire.parse_publish(flags, body), self.generation)
        elif kind == wire.CONNACK and not self.connack.done():
            self.connack.set_result(wire.parse_connack(body))
        elif kind == wire.SUBACK and not self.suback.done():
            self.suback.set_result(wire.parse_suback(body)[1])
        elif kind == wire.DISCONNECT and self.transport:
            log.warning("broker sent DISCONNECT", extra={"reason": body[0] if body else 0})
            self.transport.close()
        # PINGRESP needs no handling: any packet refreshes `last_received`.

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
        maximum_packet_size: int | None = None,
    ) -> None:
        self._mqtt = mqtt
        self._client_id = client_id
        self._filter = topic_filter
        self._receive_maximum = receive_maximum
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._maximum_packet_size = maximum_packet_size
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
        """Send the acknowledgements queued so far, then DISCONNECT (normal); the broker
        closes the connection, or we do after `_LINGER_S` (see the module docstring)."""
        conn = self._conn
        if conn and conn.transport and not conn.transport.is_closing() and not conn.stopping:
            self._flush()
            conn.transport.write(wire.DISCONNECT_PACKET)
            conn.stopping = True
            asyncio.get_running_loop().call_later(_LINGER_S, conn.transport.close)
        if self._task:
            self._task.cancel()

    async def close(self, timeout_s: float = 5.0) -> None:
        """`stop()`, then wait (at most `timeout_s`) until the connection is closed.

        The last PUBACKs and the DISCONNECT are written by the event loop after `stop()`,
        and the broker has read them once it closes the connection. A process that ends
        before that may lose them, and the broker then redelivers messages whose records
        are already in Kafka. After `timeout_s` the connection is closed regardless.
        """
        conn = self._conn
        self.stop()
        if conn is not None and conn.transport is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await conn.closed
            conn.transport.close()

    async def batch(self, max_items: int) -> list[Incoming]:
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        pending = self._pending
        take = min(max_items, len(pending))
        return [pending.popleft() for _ in range(take)]

    def ack(self, item: Incoming) -> None:
        # Packet ids are per connection: only the connection a message came on may ack it.
        conn = self._conn
        if item.qos and conn is not None and item.generation == conn.generation:
            if not self._acks:
                asyncio.get_running_loop().call_soon(self._flush)
            self._acks.append(wire.puback(item.mid))

    @property
    def depth(self) -> int:
        return len(self._pending)

    def received(self, publish: wire.Publish, generation: int) -> None:
        self._pending.append(
            Incoming(
                publish.packet_id,
                publish.qos,
                publish.topic,
                publish.payload,
                time.monotonic_ns(),
                generation,
            )
        )
        self._ready.set()

    def _flush(self) -> None:
        conn = self._conn
        if (
            self._acks
            and conn
            and conn.transport
            and not conn.transport.is_closing()
            and not conn.stopping  # nothing may follow our DISCONNECT
        ):
            conn.transport.write(b"".join(self._acks))
        self._acks.clear()

    async def _maintain(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("mqtt connection failed", extra={"error": repr(exc)})
            self._connected.clear()
            await asyncio.sleep(_RECONNECT.delay(attempt))
            attempt += 1

    def _new_connection(self) -> _Connection:
        # The generation is fixed before the first byte arrives: whatever this connection
        # delivers, in whichever read, is acknowledged on it and nowhere else.
        self.connection_count += 1
        conn = _Connection(self, self.connection_count, self._max_body())
        self._conn = conn
        self._acks.clear()  # acks of an earlier connection must not reach this one
        return conn

    def _max_body(self) -> int | None:
        # Maximum Packet Size counts the whole packet; the fixed header is 2 to 5 bytes.
        return None if self._maximum_packet_size is None else self._maximum_packet_size - 5

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        tls = None
        if self._mqtt.ca_file and self._mqtt.port == self._mqtt.tls_port:
            tls = ssl.create_default_context(cafile=str(self._mqtt.ca_file))
        _, conn = await loop.create_connection(
            self._new_connection, self._mqtt.host, self._mqtt.port, ssl=tls
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
                maximum_packet_size=self._maximum_packet_size,
            )
        )
        try:
            connack = await self._handshake(conn)
        except BaseException:
            conn.transport.close()
            raise
        keepalive = self._keepalive_s
        if connack.server_keep_alive is not None:
            keepalive = connack.server_keep_alive  # MQTT 5 section 3.2.2.3.14: it wins
        log.info(
            "mqtt connected",
            extra={
                "filter": self._filter,
                "receive_maximum": self._receive_maximum,
                "keepalive_s": keepalive,
                "session_present": connack.session_present,
            },
        )
        self._connected.set()
        try:
            await self._keep_alive(conn, keepalive)
        finally:
            log.warning("mqtt disconnected", extra={"client_id": self._client_id})

    async def _handshake(self, conn: _Connection) -> wire.Connack:
        """Wait for CONNACK, subscribe, wait for SUBACK; a refusal is a ConnectionError."""
        assert conn.transport is not None
        async with asyncio.timeout(10):
            connack = await conn.connack
        if connack.reason != 0:
            raise ConnectionError(f"broker refused CONNECT with reason code {connack.reason:#04x}")
        conn.transport.write(wire.subscribe(1, self._filter))
        async with asyncio.timeout(10):
            codes = await conn.suback
        if not codes or codes[0] >= 0x80:
            raise ConnectionError(f"broker refused SUBSCRIBE {self._filter}: {codes}")
        return connack

    async def _keep_alive(self, conn: _Connection, keepalive: int) -> None:
        """Until the connection closes: ping every half keep-alive; abort a silent one.

        MQTT 5 section 4.13 lets a client close a connection whose PINGRESP does not come
        "within a reasonable amount of time"; here that is one keep-alive with nothing
        received at all after the PINGREQ (a busy broker's PUBLISHes count as life).
        """
        if keepalive <= 0:  # keep-alive switched off (section 3.1.2.10)
            await conn.closed
            return
        tick = keepalive / 2
        pinged_at: float | None = None
        while not conn.closed.done():
            await asyncio.wait([conn.closed], timeout=tick)
            transport = conn.transport
            if conn.closed.done() or transport is None or transport.is_closing():
                break
            now = time.monotonic()
            if pinged_at is not None and conn.last_received < pinged_at:
                if now - pinged_at >= keepalive:
                    log.warning(
                        "no PINGRESP within the keep-alive; the connection is lost",
                        extra={"keepalive_s": keepalive},
                    )
                    transport.abort()
                    break
                continue  # still waiting for this PINGREQ's answer
            transport.write(wire.PINGREQ_PACKET)
            pinged_at = now
