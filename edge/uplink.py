"""MQTT 5 over mutual TLS: the outbox drains here, downlink messages arrive here.

- One aiomqtt client per connection; on any MQTT error the connection is rebuilt after a
  backoff (exponential, capped, with jitter so a fleet does not reconnect in lockstep).
- Publishing reads the outbox in seq order, `publish_window` rows at a time, sends them
  all (QoS 1, pipelined on one connection, so the broker keeps their order), waits for
  every PUBACK and deletes the batch in one transaction. A reconnect starts again from
  the oldest row still stored: at most one window is sent twice.
- A PUBACK's reason code decides the row's fate (aiomqtt drops it, so we read it from
  the paho client underneath; the table is in `edge/puback.py`): 0x00 deletes it;
  0x10 "no matching subscribers" and transient refusals keep it and the window is sent
  again after a backoff (from the oldest kept row); permanent refusals move it to the
  outbox's quarantine. "Not authorized" means the certificate is not this device's,
  which no retry fixes; the service stops with that error and the rows stay stored.
- Delivered and quarantined rows are settled in one transaction. When the disk refuses
  even that, they are kept in memory and settled with the next window (a restart in
  between re-sends them: duplicates, bounded by the window, never a loss).
- The last will is a DeviceStatus OFFLINE on the status topic.
- Downlink: the device's `down/#` topics with a persistent session (verdicts queue while
  it is offline), bounded by the MQTT 5 Receive Maximum.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeloop.core.errors import EdgeloopError
from edgeloop.core.logs import get_logger
from edgeloop.edge import paho_compat
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.outbox import Outbox, OutboxStorageError, Refusal, Row
from edgeloop.edge.puback import Disposition, classify, reason_name
from edgeloop.edge.rates import ThroughputMeter
from edgeloop.schemas.topics import DownlinkKind, UplinkKind, mqtt_downlink, mqtt_uplink

log = get_logger(__name__)

RECEIVE_MAXIMUM = 16
ACK_TIMEOUT_S = 30.0
GOODBYE_TIMEOUT_S = 2.0


class UplinkRejectedError(EdgeloopError):
    """The broker refused our publishes as not authorized: the certificate's identity is
    not this device id (the ACL allows edgeloop/<CN>/# only)."""


class _ImpairedError(Exception):
    """Raised inside a connection to drop it (simulated partition)."""


@dataclass
class Impairment:
    """Network knobs for the simulator: a partition until a time, added one-way latency."""

    partition_until: float = 0.0
    latency_s: float = 0.0
    cuts: int = 0  # connections dropped by a partition

    def partitioned(self) -> bool:
        return time.monotonic() < self.partition_until


@dataclass(frozen=True)
class LinkConfig:
    device_id: str
    host: str
    port: int
    tls: ssl.SSLContext | None
    window: int = 64
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    session_expiry_s: int = 86_400
    connect_timeout_s: float = 10.0


Downlink = Callable[[DownlinkKind, bytes], Awaitable[None]]


def backoff_s(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Capped exponential backoff with "equal jitter": between half and all of the step."""
    step: float = min(high, low * (2.0 ** min(attempt, 30)))
    return step / 2 + rng.uniform(0, step / 2)


class MqttUplink:
    def __init__(
        self,
        config: LinkConfig,
        outbox: Outbox,
        *,
        on_downlink: Downlink,
        will: Callable[[], bytes],
        metrics: EdgeMetrics,
        impairment: Impairment | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.on_downlink = on_downlink
        self.will = will
        self.metrics = metrics
        self.impairment = impairment or Impairment()
        self.rng = rng or random.Random()  # noqa: S311 - jitter and audit draws, not secrets
        self.name = f"uplink-{config.device_id}"
        # So that a PUBACK 0x95 (Mosquitto's "packet too large") reaches us at all.
        paho_compat.install()
        self._wake = asyncio.Event()
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}
        self._client_now: aiomqtt.Client | None = None
        # Settled on the broker, not yet on disk (the disk refused the write).
        self._unsettled: tuple[list[int], list[Refusal]] = ([], [])
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        # CONNECT -> CONNACK at each connect, then each window's first publish -> PUBACK:
        # a status reports the link as it is now, not as it was at the last reconnect.
        self.rtt_ms: float | None = None
        self.throughput = ThroughputMeter()
        self._m_connected = metrics.connected.labels(config.device_id)
        self._m_depth = metrics.outbox_depth.labels(config.device_id)

    def notify(self) -> None:
        """New rows are in the outbox (call from the loop's thread)."""
        self._wake.set()

    async def run(self) -> None:
        attempt = 0
        cfg = self.config
        while True:
            # The partition is a deadline, not an event: poll it (simulator only).
            while self.impairment.partitioned():  # noqa: ASYNC110
                await asyncio.sleep(min(0.5, self.impairment.partition_until - time.monotonic()))
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                self.last_error = f"mqtt: {exc}"
                log.info(
                    "mqtt connection lost",
                    extra={"device": cfg.device_id, "error": str(exc), "attempt": attempt},
                )
            except _ImpairedError:
                self.impairment.cuts += 1
                log.info(
                    "mqtt connection cut (simulated partition)", extra={"device": cfg.device_id}
                )
            finally:
                self.connected.clear()
                self._m_connected.set(0)
                self._fail_pending()
            if self.impairment.partitioned():
                attempt = 0
                continue
            self.metrics.reconnects.labels(cfg.device_id).inc()
            await asyncio.sleep(
                backoff_s(attempt, cfg.reconnect_min_s, cfg.reconnect_max_s, self.rng)
            )
            attempt += 1

    def _client(self) -> aiomqtt.Client:
        cfg = self.config
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = cfg.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        try:
            will: aiomqtt.Will | None = aiomqtt.Will(
                mqtt_uplink(cfg.device_id, UplinkKind.STATUS), self.will(), qos=1, retain=False
            )
        except OutboxStorageError as exc:
            # The will's seq is reserved on disk; on a full disk connect without one.
            log.warning("no last will (disk)", extra={"device": cfg.device_id, "error": str(exc)})
            will = None
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=cfg.device_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=cfg.tls,
            will=will,
            clean_start=False,
            properties=props,
            keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s,
            max_inflight_messages=cfg.window,
            # Unbounded (0). aiomqtt 2.x acknowledges a QoS 1 message on arrival, before
            # we handle it, so the broker's flow control (our Receive Maximum) does not
            # hold the queue to any size: the broker keeps sending while a busy device
            # handles slowly. A bounded queue then discarded messages the broker counted
            # as delivered ("Message queue is full": 278 of a burst of 400 verdicts).
            # Downlink traffic is bounded by the device itself: a verdict per offload it
            # made, thresholds and releases by version.
            max_queued_incoming_messages=0,
        )

    async def _session(self) -> None:
        cfg = self.config
        started = time.perf_counter()
        async with self._client() as client:
            self.rtt_ms = (time.perf_counter() - started) * 1000.0
            client.pending_calls_threshold = cfg.window * 2
            self._hook_pubacks(client)
            await client.subscribe([(mqtt_downlink(cfg.device_id, k), 1) for k in DownlinkKind])
            self.connected.set()
            self._m_connected.set(1)
            self._client_now = client
            self.last_error = None
            log.info("mqtt connected", extra={"device": cfg.device_id, "rtt_ms": self.rtt_ms})
            try:
                await self._connected_tasks(client)
            except asyncio.CancelledError:
                await self._goodbye(client)
                raise
            finally:
                self._client_now = None

    async def _connected_tasks(self, client: aiomqtt.Client) -> None:
        # Unwrap the task group's exception group: callers decide on the one cause.
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publish_loop(client), name=f"{self.name}-publish")
                tg.create_task(self._receive_loop(client), name=f"{self.name}-receive")
                tg.create_task(self._watch_partition(), name=f"{self.name}-partition")
        except* UplinkRejectedError as group:
            raise group.exceptions[0] from None
        except* (aiomqtt.MqttError, _ImpairedError) as group:
            raise group.exceptions[0] from None
        except* TimeoutError:
            raise aiomqtt.MqttError(f"no PUBACK within {ACK_TIMEOUT_S}s") from None

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """On a graceful stop, say OFFLINE ourselves: a clean DISCONNECT drops the will."""
        try:
            async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                payload = await asyncio.to_thread(self.will)
                info = client._client.publish(
                    mqtt_uplink(self.config.device_id, UplinkKind.STATUS), payload, qos=1
                )
                fut: asyncio.Future[ReasonCode] = asyncio.get_running_loop().create_future()
                self._acks[info.mid] = fut
                await fut
        except (
            TimeoutError,
            asyncio.CancelledError,
            aiomqtt.MqttError,
            OSError,
            OutboxStorageError,
        ):
            log.info("no OFFLINE status sent at shutdown", extra={"device": self.config.device_id})

    async def publish_now(self, kind: UplinkKind, payload: bytes) -> bool:
        """Publish one event that is not in the outbox (a status while the disk is full).

        Returns:
            True when the broker answered 0x00; False when not connected, refused, or no
            PUBACK came within ACK_TIMEOUT_S. Never raises for the link's state.
        """
        client = self._client_now
        if client is None:
            return False
        info = client._client.publish(mqtt_uplink(self.config.device_id, kind), payload, qos=1)
        if info.rc != 0:
            return False
        fut: asyncio.Future[ReasonCode] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = fut
        # asyncio.wait, not await: a dropped connection cancels `fut`, which must read
        # as "not delivered" here, not as this task being cancelled.
        await asyncio.wait({fut}, timeout=ACK_TIMEOUT_S)
        if not fut.done() or fut.cancelled():
            self._acks.pop(info.mid, None)
            return False
        if classify(fut.result().value) is not Disposition.DELIVERED:
            return False
        self.throughput.add(len(payload))
        return True

    async def _watch_partition(self) -> None:
        while not self.impairment.partitioned():  # noqa: ASYNC110 - a deadline set by the simulator
            await asyncio.sleep(0.2)
        raise _ImpairedError

    def _hook_pubacks(self, client: aiomqtt.Client) -> None:
        # aiomqtt resolves publish() on any PUBACK and drops its reason code; we need the
        # code (not authorized must not count as delivered), so we chain paho's callback.
        paho = client._client
        original: Any = paho.on_publish

        def on_publish(c: Any, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
            fut = self._acks.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(rc)
            if original is not None:
                original(c, userdata, mid, rc, props)

        paho.on_publish = on_publish

    def _fail_pending(self) -> None:
        for fut in self._acks.values():
            if not fut.done():
                fut.cancel()
        self._acks.clear()

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        cfg = self.config
        cursor = 0
        attempt = 0  # consecutive windows with a row to send again
        while True:
            # SQLite off the loop thread: the inference thread may hold the outbox lock
            # for a commit (an fsync with outbox_sync=FULL).
            rows = await asyncio.to_thread(self.outbox.peek, cursor, cfg.window)
            self._m_depth.set(self.outbox.depth)
            if not rows:
                self._wake.clear()
                rows = await asyncio.to_thread(self.outbox.peek, cursor, cfg.window)
                if not rows:
                    await self._wake.wait()
                    continue
            if self.impairment.latency_s:
                await asyncio.sleep(self.impairment.latency_s)
            retry = await self._send_window(client, rows)
            self._m_depth.set(self.outbox.depth)
            if retry is None:
                cursor, attempt = rows[-1].seq, 0
                continue
            # Sent again from the oldest row kept, after a backoff: a broker that drops
            # (no subscriber yet) or is busy is not hammered, and the rows behind wait
            # so per-device order holds for everything delivered from here on.
            cursor = retry - 1
            await asyncio.sleep(
                backoff_s(attempt, cfg.reconnect_min_s, cfg.reconnect_max_s, self.rng)
            )
            attempt += 1

    async def _send_window(self, client: aiomqtt.Client, rows: list[Row]) -> int | None:
        """Publish `rows`, wait for every PUBACK, settle them by reason code.

        Returns:
            The seq of the oldest row to send again, or None when none is kept.

        Raises:
            UplinkRejectedError: the broker said "not authorized" (after settling the rest).
        """
        cfg = self.config
        paho = client._client
        loop = asyncio.get_running_loop()
        futures: list[tuple[Row, asyncio.Future[ReasonCode]]] = []
        sent = time.perf_counter()
        for row in rows:
            info = paho.publish(
                mqtt_uplink(cfg.device_id, UplinkKind(row.kind)), row.payload, qos=1
            )
            if info.rc != 0:
                raise aiomqtt.MqttCodeError(info.rc, "could not publish")
            fut: asyncio.Future[ReasonCode] = loop.create_future()
            self._acks[info.mid] = fut
            futures.append((row, fut))
        delivered, refused = self._unsettled
        retry: list[Row] = []
        retry_reasons: set[str] = set()
        rejected: Row | None = None
        now = time.time_ns() // 1000
        first = True
        async with asyncio.timeout(ACK_TIMEOUT_S):
            for row, fut in futures:
                code = (await fut).value
                if first:
                    self.rtt_ms = (time.perf_counter() - sent) * 1000.0
                    first = False
                disposition = classify(code)
                if disposition is Disposition.DELIVERED:
                    self.throughput.add(len(row.payload))
                    self.metrics.published.labels(cfg.device_id, row.kind).inc()
                    self.metrics.publish_latency.labels(cfg.device_id).observe(
                        max(0, now - row.created_us) / 1e6
                    )
                    delivered.append(row.seq)
                    continue
                self.metrics.publish_rejected.labels(cfg.device_id, reason_name(code)).inc()
                if disposition is Disposition.QUARANTINE:
                    refused.append(Refusal(row.seq, code, reason_name(code)))
                    self.metrics.outbox_quarantined.labels(cfg.device_id, reason_name(code)).inc()
                    log.error(
                        "broker refused an event for good; quarantined",
                        extra={"device": cfg.device_id, "seq": row.seq, "kind": row.kind,
                               "reason": reason_name(code)},
                    )  # fmt: skip
                elif disposition is Disposition.IDENTITY:
                    rejected = rejected or row
                else:
                    retry.append(row)
                    retry_reasons.add(reason_name(code))
        await self._settle(delivered, refused)
        if rejected is not None:
            raise UplinkRejectedError(
                f"the broker refused {cfg.device_id}'s publish to its own topics as "
                "not authorized: the client certificate's CN must be the device id"
            )
        if not retry:
            return None
        self.last_error = f"publish: {len(retry)} event(s) kept: {', '.join(sorted(retry_reasons))}"
        log.info(
            "broker did not deliver; rows kept, sending again after a backoff",
            extra={"device": cfg.device_id, "kept": len(retry), "first_seq": retry[0].seq,
                   "why": self.last_error},
        )  # fmt: skip
        return retry[0].seq

    async def _settle(self, delivered: list[int], refused: list[Refusal]) -> None:
        try:
            await asyncio.to_thread(self.outbox.settle, delivered, refused)
        except OutboxStorageError as exc:
            # Kept for the next window; the rows stay on disk meanwhile (never a loss).
            self._unsettled = (delivered, refused)
            log.warning(
                "could not delete delivered rows (disk); kept for the next window",
                extra={"device": self.config.device_id, "error": str(exc)},
            )
            return
        self._unsettled = ([], [])

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            kind = DownlinkKind(str(message.topic).rsplit("/", 1)[-1])
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                await self.on_downlink(kind, bytes(payload))
