"""MQTT intake: paho's network thread receives, asyncio processes, acks go back by mid.

Why a thread and not aiomqtt here: aiomqtt 2.5 acknowledges QoS 1 messages on receipt,
and when its bounded incoming queue is full it discards the message ("Message queue is
full. Discarding message."), which with manual acks would sit unacknowledged with the
broker until a reconnect; the bridge must acknowledge only after Kafka has the record.
paho 2.x offers manual acknowledgements, and running its network loop on its own thread
let the MQTT receive path and asyncio's Kafka path use the second core (measured on a
2-core machine before the bridge was written: 6.5k msg/s against 3.3k for aiomqtt with
one task per message). Flow control is the broker's: the MQTT 5 Receive Maximum is
announced in CONNECT, but Mosquitto 2.0.11 sends far more than it on a backlog (each
PUBACK can release up to a whole window; see docs/architecture.md), so the hand-off
deque may hold more than the window. Nothing of it reaches Kafka before the uplink takes
it, so a graceful stop leaves what was not taken with the broker.

A graceful stop's last PUBACKs must reach the broker: closing a TCP socket whose receive
buffer holds unread bytes (the broker keeps writing up to the stop) makes the kernel send
RST and drop what it has not sent yet, our last PUBACKs and DISCONNECT included, and the
broker redelivers records Kafka already has. `_LingeringClient` reads and discards until
the broker closes the connection after our DISCONNECT, and only then closes.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, _ConnectionState
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.core.logs import get_logger
from edgeloop.core.settings import MqttSettings

log = get_logger(__name__)


@dataclass(slots=True)
class Incoming:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_ns: int
    # Packet ids are per connection: an ack must never reach a later connection, where
    # the same mid may name another message. The broker redelivers the unacked ones.
    generation: int


# After our DISCONNECT, how long to wait for the broker to close the connection (it does
# at once) before closing it ourselves.
_LINGER_S = 5.0


def _read_until_closed(sock: socket.socket | ssl.SSLSocket, timeout_s: float) -> None:
    """Read and discard until the peer closes the connection, or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            readable, _, _ = select.select([sock], [], [], left)
            if readable and not sock.recv(65536):
                return  # the broker closed: nothing unread, so our close sends FIN
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            continue
        except (OSError, ValueError):
            return


class _LingeringClient(paho.Client):
    """paho's client, except that a connection it ends itself (DISCONNECT written) is
    closed only once the broker closed it: see the module docstring. `_sock_close` is
    paho's private hook (paho-mqtt 2.1, pinned below 3 in pyproject.toml); paho calls it
    right after writing DISCONNECT, and on errors (then this waits for nothing)."""

    def _sock_close(self) -> None:
        sock = self._sock
        if sock is not None and self._state == _ConnectionState.MQTT_CS_DISCONNECTING:
            _read_until_closed(sock, _LINGER_S)  # type: ignore[arg-type]
        super()._sock_close()


class MqttIntake:
    """A paho client subscribed to `topic_filter` with manual acknowledgements."""

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
        self._keepalive_s = keepalive_s
        self._maximum_packet_size = maximum_packet_size
        self._topic_filter = topic_filter
        self._receive_maximum = receive_maximum
        self._session_expiry_s = session_expiry_s
        self._pending: deque[Incoming] = deque()
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = threading.Event()
        self.connection_count = 0
        self._client = _LingeringClient(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self._client.manual_ack_set(True)
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        # Bounded retry delay when the broker is down; paho reconnects by itself.
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        if mqtt.username:
            password = mqtt.password.get_secret_value() if mqtt.password else None
            self._client.username_pw_set(mqtt.username, password)
        if mqtt.ca_file and mqtt.port == mqtt.tls_port:
            self._client.tls_set(ca_certs=str(mqtt.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = self._receive_maximum
        props.SessionExpiryInterval = self._session_expiry_s
        if self._maximum_packet_size is not None:
            props.MaximumPacketSize = self._maximum_packet_size
        # paho sends PINGREQs and drops a connection whose PINGRESP does not come.
        self._client.connect_async(
            self._mqtt.host,
            self._mqtt.port,
            keepalive=self._keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        await asyncio.to_thread(self._connected.wait, 30)
        if not self._connected.is_set():
            self.stop()
            raise ConnectionError(
                f"MQTT broker {self._mqtt.host}:{self._mqtt.port} "
                "did not accept the connection within 30 s"
            )

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    async def close(self) -> None:
        """`stop()` off the event loop: paho's thread sends the queued PUBACKs, then
        DISCONNECT, and `loop_stop()` waits for it (a join, which must not block the loop).
        """
        await asyncio.to_thread(self.stop)

    async def batch(self, max_items: int) -> list[Incoming]:
        """Wait for messages, then take up to `max_items` of them in arrival order."""
        while not self._pending:
            self._ready.clear()
            if self._pending:
                break
            await self._ready.wait()
        out: list[Incoming] = []
        pending = self._pending
        while pending and len(out) < max_items:
            out.append(pending.popleft())
        return out

    def ack(self, item: Incoming) -> None:
        # paho queues the PUBACK under its own lock and wakes its network thread.
        if item.qos and item.generation == self.connection_count:
            self._client.ack(item.mid, item.qos)

    @property
    def depth(self) -> int:
        return len(self._pending)

    # --- paho thread ---

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self._pending.append(
            Incoming(
                msg.mid,
                msg.qos,
                msg.topic,
                bytes(msg.payload),
                time.monotonic_ns(),
                self.connection_count,
            )
        )
        # Wake the consumer when this append made the deque non-empty, judged *after* the
        # append. Judged before it, the consumer could empty the deque and start waiting
        # in between: the append then woke nobody, and neither did any later one (the
        # deque was never empty again), so the bridge stopped taking messages for good.
        # After it, a waiting consumer (which pops nothing) always sees this length at 1;
        # paho's network thread is the only producer.
        if len(self._pending) == 1 and self._loop is not None:
            self._loop.call_soon_threadsafe(self._ready.set)

    def _on_connect(self, client: paho.Client, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("mqtt connect refused", extra={"reason": str(reason)})
            return
        self.connection_count += 1
        client.subscribe(self._topic_filter, qos=1)
        log.info(
            "mqtt connected",
            extra={"filter": self._topic_filter, "receive_maximum": self._receive_maximum},
        )
        self._connected.set()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        log.warning("mqtt disconnected", extra={"reason": str(reason)})
