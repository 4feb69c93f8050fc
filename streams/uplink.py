"""Uplink: MQTT (single-object Avro) → validated, re-framed → Kafka (Confluent framing).

At-least-once: a message's PUBACK goes to the broker only after Kafka acknowledged its
record (acks=all) or its dead-letter record. Until then the broker holds it; a crash of
the bridge means redelivery to the same persistent session, never loss. The in-flight
window is the MQTT Receive Maximum.

A produce failure is judged per record by the one retry policy (`core/retry.py`):
transient ones are re-sent with backoff, holding the acks; a record Kafka will never take
(over the topic's `max.message.bytes`, a missing write ACL, ...) is re-sent alone once to
be sure it is its own fault, then dead-lettered as `kafka_rejected` and acknowledged once
the dead letter is in Kafka, so the rest of the window goes on.

A graceful stop drains before anything is cancelled: the runner calls `drain()` (on
SIGTERM/SIGINT), which lets the router finish the slice in hand and take no new message,
waits until every slice handed to Kafka is settled and acknowledged, and returns; then
the runner cancels `run`, whose `finally` disconnects. A restart therefore re-sends
nothing that is already in Kafka. Cancellation without a drain first (or after a drain
that ran out of time) still acknowledges everything Kafka has: the producers are stopped
first (which flushes and waits for what they hold), the records Kafka took are
acknowledged, and only then does the intake disconnect. Records that reached Kafka are
never left unacknowledged while the process lives.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from edgeloop.core.errors import ConfigError, DecodeError, EdgeloopError, RegistryError
from edgeloop.core.logs import get_logger
from edgeloop.core.retry import Backoff, is_retriable, retry
from edgeloop.core.settings import KafkaSettings, MqttSettings
from edgeloop.schemas import catalog
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import (
    SINGLE_OBJECT_HEADER,
    SingleObjectCodec,
    single_to_confluent,
)
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.strict_reader import cached_reader
from edgeloop.schemas.topics import (
    TOPICS,
    UPLINK_DLQ,
    UPLINK_TOPIC,
    UplinkKind,
    dlq_topic,
    parse_mqtt_uplink,
    subject_for,
)
from edgeloop.streams.dead_letters import DeadLetters
from edgeloop.streams.fingerprints import FingerprintResolver
from edgeloop.streams.intake import Incoming, MqttIntake
from edgeloop.streams.metrics import BridgeMetrics
from edgeloop.streams.native_intake import NativeIntake
from edgeloop.streams.producers import Producers
from edgeloop.streams.schema_ids import SchemaIds, UnregisteredSchemaError
from edgeloop.streams.settings import BridgeSettings

log = get_logger(__name__)


EXPECTED_SCHEMA = {kind: catalog.get(TOPICS[topic].event) for kind, topic in UPLINK_TOPIC.items()}
# Every topic the uplink writes: the event topics, their dead letters, and the dead
# letters of messages on an MQTT topic of no known kind (`edgeloop bridge` checks they exist).
WRITES = frozenset(
    [*UPLINK_TOPIC.values(), *(dlq_topic(t) for t in UPLINK_TOPIC.values()), UPLINK_DLQ]
)
T = TypeVar("T")
ROUTE_SLICE = 128
# Room for the topic (at most 65,535 bytes), the packet id and properties around a payload
# of `max_message_bytes`: the Maximum Packet Size the bridge announces in CONNECT.
PACKET_OVERHEAD = 64 * 1024
# aiokafka's default partitioner (murmur2 of the key, as the Java client): a record sent
# alone lands where `send()` would have put it, so a device's order is kept.
_PARTITIONER = DefaultPartitioner()
# Header of a dead letter that already carries no payload copy.
_STRIPPED = ("stripped", b"1")


@dataclass(slots=True)
class Routed:
    item: Incoming
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    label: str  # uplink kind, or "dlq"
    device_id: str | None = None


def _failure(fut: asyncio.Future[object]) -> BaseException | None:
    """Why a finished delivery failed (None: Kafka has the record). A cancelled one (the
    producer was stopping) is a transient failure: the record is sent again."""
    if fut.cancelled():
        cancelled: BaseException = KafkaConnectionError("delivery cancelled")
        return cancelled
    return fut.exception()


@dataclass(slots=True)
class _Sent:
    """One routed slice on its way to Kafka: `futures[i]` is the delivery of `routed[i]`.

    Records are sent in order, so `futures` may be shorter than `routed` while (or when
    a stop interrupted) sending; only the sent prefix is ever acknowledged.
    """

    routed: list[Routed]
    futures: list[asyncio.Future[object]] = field(default_factory=list)
    generation: int = 0  # of the main producer that sent it


class Uplink:
    name = "bridge-uplink"

    def __init__(
        self,
        settings: BridgeSettings,
        mqtt: MqttSettings,
        kafka: KafkaSettings,
        registry: RegistryClient,
        metrics: BridgeMetrics,
    ) -> None:
        self.settings = settings
        self.mqtt = mqtt
        self.kafka = kafka
        self.metrics = metrics
        self.ids = SchemaIds(registry, metrics)
        resolutions = metrics.fingerprint_resolutions
        self.resolver = FingerprintResolver(
            registry, on_result=lambda result: resolutions.labels(result).inc()
        )
        self.registry = registry
        self.codec = SingleObjectCodec(
            catalog.catalog().values(),
            settings.decode_limits(),
        )
        self.dead_letters = DeadLetters(registry, "bridge-uplink", settings.dlq_payload_bytes)
        self._bridge_id = settings.client_id.encode()
        self._received = {kind: metrics.uplink_in.labels(kind.value) for kind in UplinkKind}
        self._backoff = Backoff(initial_s=0.1, max_s=settings.retry_backoff_max_s)
        # Slices sent to Kafka and not yet acknowledged on MQTT, oldest first.
        self._unsettled: deque[_Sent] = deque()
        # Messages taken from the intake and not yet acknowledged (the in-flight gauge).
        self._held = 0
        # Graceful stop: set by `drain()`; the router takes no new slice once it is set.
        self._stopping = False
        # Whether the router is waiting in `intake.batch()` (holding nothing), and its task.
        self._taking = False
        self._router: asyncio.Task[None] | None = None
        self._handoff: asyncio.Queue[_Sent] | None = None
        self._intake: MqttIntake | NativeIntake | None = None
        self._acknowledged = 0  # PUBACKs sent in all, for the drain's log line

    async def run(self) -> None:
        intake = self._make_intake()
        producers = Producers(
            self._producer_factory, self._retry, idempotent=self.kafka.idempotence
        )
        await producers.start()
        await self._warm_up(producers.main)
        # Slices travel from the router to the acknowledger; two in flight keeps both busy.
        handoff: asyncio.Queue[_Sent] = asyncio.Queue(maxsize=2)
        self._handoff, self._intake = handoff, intake
        try:
            await intake.start()
            async with asyncio.TaskGroup() as tg:
                self._router = tg.create_task(self._route_loop(intake, producers, handoff))
                tg.create_task(self._ack_loop(intake, producers, handoff))
        finally:
            await self._close(intake, producers)

    def _producer_factory(self, idempotent: bool) -> AIOKafkaProducer:
        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap,
            acks="all",
            enable_idempotence=idempotent,
            linger_ms=s.linger_ms,
            max_batch_size=s.max_batch_bytes,
            max_request_size=s.max_request_bytes,
            request_timeout_ms=15_000,
            client_id=f"{s.client_id}-uplink",
        )

    def _make_intake(self) -> MqttIntake | NativeIntake:
        s = self.settings
        intake_type = NativeIntake if s.intake == "native" else MqttIntake
        return intake_type(
            self.mqtt,
            client_id=s.client_id,
            topic_filter=f"$share/{s.share_group}/edgeloop/+/up/#",
            receive_maximum=s.receive_maximum,
            session_expiry_s=s.session_expiry_s,
            keepalive_s=s.keepalive_s,
            maximum_packet_size=s.max_message_bytes + PACKET_OVERHEAD,
        )

    async def drain(self) -> None:
        """Graceful stop, before cancellation: take no new message, and return once every
        message taken is settled in Kafka and acknowledged on MQTT.

        The router is never interrupted inside a slice (where a record can be in the
        producer without being noted as sent); it finishes the slice and stops at the top
        of its loop. Waiting in `intake.batch()` it holds nothing, so it is cancelled
        there. Bounded by `drain_timeout_s` (keep it under the runner's shutdown timeout);
        what is left then is dealt with by the cancellation (`_close`).
        """
        self._stopping = True
        router, handoff = self._router, self._handoff
        if router is None or handoff is None:  # not started: nothing taken
            return
        if self._taking:
            router.cancel()
        before = self._acknowledged
        try:
            async with asyncio.timeout(self.settings.drain_timeout_s):
                await asyncio.wait([router])
                await handoff.join()  # every slice handed over is settled and acked
        except TimeoutError:
            log.warning(
                "drain timed out; stopping the producers settles the rest",
                extra={"unsettled_slices": len(self._unsettled)},
            )
            return
        depth = self._intake.depth if self._intake is not None else 0
        log.info(
            "uplink drained",
            extra={"acknowledged": self._acknowledged - before, "not_taken": depth},
        )

    async def _close(self, intake: MqttIntake | NativeIntake, producers: Producers) -> None:
        """Stop the producers, acknowledge what Kafka took, then disconnect.

        The producers go first: stopping one delivers (or fails) every record it holds,
        so after it nothing more can reach Kafka, and each record Kafka has is
        acknowledged before DISCONNECT. Acknowledging first and stopping after would
        let records in the producer land in Kafka unacknowledged: duplicates after a
        restart. What is not in Kafka stays unacknowledged and is redelivered.
        """
        try:
            await producers.stop()
        finally:
            acked = 0
            while self._unsettled:
                acked += self._acknowledge(intake, self._unsettled.popleft(), delivered_only=True)
            if acked:
                log.info("acknowledged on close", extra={"acknowledged": acked})
            # Acks queued so far leave before DISCONNECT, and the process does not end
            # before they are written; the rest stays with the session.
            await intake.close()

    async def _warm_up(self, producer: AIOKafkaProducer) -> None:
        """Fetch topic metadata and schema ids before the first message, not during it:
        otherwise the first few hundred events carry tens of ms of lookups. Best effort,
        bounded: whatever is missing is looked up (and retried) when it is needed."""
        try:
            async with asyncio.timeout(5):
                for kind, topic in UPLINK_TOPIC.items():
                    await producer.partitions_for(topic)
                    await self.ids.id_for(subject_for(topic), EXPECTED_SCHEMA[kind])
        except UnregisteredSchemaError as exc:
            # Not transient: every event of this kind is dead-lettered until an operator
            # registers the schemas, so say it where an operator looks.
            log.warning(
                "a schema the uplink frames with is not registered: its events go to the "
                "dead-letter topic until `edgeloop schemas register` is run",
                extra={"error": str(exc)},
            )
        except (TimeoutError, KafkaError, EdgeloopError, OSError) as exc:
            log.info("warm-up incomplete; continuing", extra={"error": repr(exc)})

    async def _route_loop(
        self,
        intake: MqttIntake | NativeIntake,
        producers: Producers,
        handoff: asyncio.Queue[_Sent],
    ) -> None:
        while not self._stopping:
            # Small slices keep the loop responsive: while a slice is routed, Kafka's acks
            # (and so the PUBACKs of earlier slices) wait. 1000 at once cost 10+ ms of p99.
            # Only this wait may be cancelled by `drain()`: it takes nothing until it returns.
            self._taking = True
            try:
                batch = await intake.batch(ROUTE_SLICE)
            finally:
                self._taking = False
            self._held += len(batch)
            self.metrics.in_flight.set(self._held + intake.depth)
            sent = _Sent([await self._route(item) for item in batch])
            # Registered before the first send: a cancellation in the middle still
            # acknowledges the records that went out (and only those) before disconnecting.
            self._unsettled.append(sent)
            sent.generation = producers.generation
            await self._send(producers.main, sent.routed, sent.futures)
            await handoff.put(sent)

    async def _ack_loop(
        self,
        intake: MqttIntake | NativeIntake,
        producers: Producers,
        handoff: asyncio.Queue[_Sent],
    ) -> None:
        while True:
            sent = await handoff.get()
            await self._settle(producers, sent)
            self._acknowledge(intake, sent)
            self._unsettled.popleft()
            handoff.task_done()
            self.metrics.in_flight.set(self._held + intake.depth)

    def _acknowledge(
        self, intake: MqttIntake | NativeIntake, sent: _Sent, *, delivered_only: bool = False
    ) -> int:
        """PUBACK the settled records of `sent` (with `delivered_only`, of those sent only
        the ones Kafka has: used when no more settling can happen); returns how many."""
        now = time.monotonic_ns()
        produced: Counter[str] = Counter()
        observe = self.metrics.added_latency.observe
        done = sent.routed[: len(sent.futures)]
        if delivered_only:
            done = [
                r
                for r, f in zip(done, sent.futures, strict=False)
                if f.done() and _failure(f) is None
            ]
        for r in done:
            intake.ack(r.item)
            produced[r.label] += 1
            observe((now - r.item.received_ns) / 1e9)
        # One labelled increment per kind and batch: label lookups cost per call.
        for label, count in produced.items():
            self.metrics.uplink_out.labels(label).inc(count)
        self._held -= len(sent.routed)
        self._acknowledged += len(done)
        return len(done)

    async def _send(
        self,
        producer: AIOKafkaProducer,
        routed: Sequence[Routed],
        futures: list[asyncio.Future[object]],
    ) -> None:
        """Hand `routed` to the producer in order, appending each delivery to `futures`."""
        for r in routed:
            try:
                fut = await producer.send(r.topic, r.value, key=r.key, headers=r.headers)
            except KafkaError as exc:  # refused before sending (e.g. over max_request_size)
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(exc)
            futures.append(fut)

    async def _settle(self, producers: Producers, sent: _Sent) -> None:
        """Wait until Kafka has every sent record of `sent` (or its dead letter).

        Transient failures re-send the failed records, in order, with backoff. A
        non-retriable one re-sends each failed record alone (a batch is refused whole, so
        a good record can share a bad one's error), dead-lettering the ones Kafka refuses
        on their own. `sent` is updated in place, so settling again (after a stop
        interrupted this) neither loses nor repeats a record.

        An idempotent producer cannot go on after a refused batch: aiokafka keeps the
        refused batch's sequence numbers, so every later batch to that partition fails
        with OutOfOrderSequenceNumber. The producer that sent `sent` is therefore
        replaced first, and the single-record probes go through a separate producer
        without idempotence, so a probe that is refused poisons nothing.
        """
        attempt = 0
        while True:
            waiting = [f for f in sent.futures if not f.done()]
            if waiting:
                await asyncio.wait(waiting)
            failed = [i for i, f in enumerate(sent.futures) if _failure(f) is not None]
            if not failed:
                return
            errors = [_failure(sent.futures[i]) for i in failed]
            if all(e is not None and is_retriable(e) for e in errors):
                delay = self._backoff.delay(attempt)
                attempt += 1
                self.metrics.retries.labels("kafka").inc()
                log.warning(
                    "kafka produce failed; holding MQTT acks and retrying",
                    extra={"error": repr(errors[0]), "pending": len(failed), "delay_s": delay},
                )
                await asyncio.sleep(delay)
                sent.generation = producers.generation  # the producer these go out on
                for i in failed:
                    sent.futures[i] = await self._resend(producers.main, sent.routed[i])
                continue
            await producers.renew_after_refusal(sent.generation)
            for i in failed:
                await self._deliver_alone(producers.probe, sent, i)

    async def _resend(self, producer: AIOKafkaProducer, r: Routed) -> asyncio.Future[object]:
        futures: list[asyncio.Future[object]] = []
        await self._send(producer, [r], futures)
        return futures[0]

    async def _send_alone(self, producer: AIOKafkaProducer, r: Routed) -> asyncio.Future[object]:
        """Send `r` as a batch of its own (to the partition its key maps to), so that a
        refusal is this record's and not a batch-mate's."""
        try:
            # send() refuses a record over max_request_size itself; send_batch() does not
            # check, so the same limit is applied here.
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(r.key, r.value, r.headers)
            if size > self.settings.max_request_bytes:
                raise MessageSizeTooLargeError(
                    f"the record is {size} bytes, over max_request_size "
                    f"{self.settings.max_request_bytes}"
                )
            partitions = sorted(await producer.partitions_for(r.topic))
            batch = producer.create_batch()
            batch.append(key=r.key, value=r.value, timestamp=None, headers=r.headers)
            partition = _PARTITIONER(r.key, partitions, partitions)
            fut: asyncio.Future[object] = await producer.send_batch(
                batch, r.topic, partition=partition
            )
        except KafkaError as exc:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
        # Not awaited here: the caller stores the delivery in its slice first, so a stop
        # while it is in flight still sees (and acknowledges) a record Kafka then takes.
        return fut

    async def _deliver_alone(self, producer: AIOKafkaProducer, sent: _Sent, i: int) -> None:
        """Send record `i` by itself until Kafka has it or its dead letter."""
        if not sent.futures[i].done():  # still in flight (a stop interrupted settling)
            await asyncio.wait([sent.futures[i]])
        if _failure(sent.futures[i]) is None:
            return
        attempt = 0
        sent.futures[i] = await self._send_alone(producer, sent.routed[i])
        await asyncio.wait([sent.futures[i]])
        while (exc := _failure(sent.futures[i])) is not None:
            r = sent.routed[i]
            detail = f"Kafka refused the record for {r.topic}: {exc!r}"
            if is_retriable(exc):
                self.metrics.retries.labels("kafka").inc()
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
            elif r.label != "dlq":
                sent.routed[i] = await self._dead(
                    r.item, dlq_topic(r.topic), "kafka_rejected", detail, r.device_id
                )
            elif _STRIPPED not in r.headers:
                # The dead letter itself is refused: keep its facts, drop the payload copy.
                sent.routed[i] = await self._dead(
                    r.item, r.topic, "kafka_rejected", detail, r.device_id, payload_bytes=0
                )
            else:
                # Not even a bare dead letter is taken (the dead-letter topic is missing or
                # not writable): nothing can be written for this message, so it is held,
                # never dropped, until an operator fixes the dead-letter topic.
                self.metrics.retries.labels("kafka_dlq").inc()
                delay = self._backoff.delay(attempt)
                attempt += 1
                log.error(
                    "dead-letter topic refuses records; holding the message",
                    extra={"topic": r.topic, "error": repr(exc), "delay_s": delay},
                )
                await asyncio.sleep(delay)
            sent.futures[i] = await self._send_alone(producer, sent.routed[i])
            await asyncio.wait([sent.futures[i]])

    async def _route(self, item: Incoming) -> Routed:
        try:
            device_id, kind = parse_mqtt_uplink(item.topic)
        except ConfigError as exc:
            self.metrics.uplink_in.labels("unknown").inc()
            return await self._dead(item, UPLINK_DLQ, "bad_topic", str(exc), None)
        self._received[kind].inc()
        topic = UPLINK_TOPIC[kind]
        subject = subject_for(topic)
        try:
            try:
                schema, headers = self._validate(item, device_id, kind)
            except DecodeError as exc:
                if exc.reason != "unknown_fingerprint":
                    raise
                # Not a schema the bridge shipped with: a registered newer (or older)
                # version of the subject is accepted, decoded with its own schema.
                schema, headers, schema_id = await self._evolved(item, device_id, kind, exc)
            else:
                schema_id = await self._retry("registry", self.ids.id_for, subject, schema)
        except DecodeError as exc:
            return await self._dead(item, dlq_topic(topic), exc.reason, str(exc), device_id)
        except UnregisteredSchemaError as exc:
            return await self._dead(
                item, dlq_topic(topic), "unregistered_schema", str(exc), device_id
            )
        except RegistryError as exc:  # a permanent refusal; retriable ones were retried
            return await self._dead(
                item, dlq_topic(topic), "registry_rejected", str(exc), device_id
            )
        return Routed(
            item,
            topic,
            device_id.encode(),
            single_to_confluent(item.payload, schema_id),
            headers,
            kind.value,
            device_id,
        )

    async def _evolved(
        self, item: Incoming, device_id: str, kind: UplinkKind, unknown: DecodeError
    ) -> tuple[EventSchema, list[tuple[str, bytes]], int]:
        """Validate a message whose fingerprint is not a shipped schema's.

        The header (size, magic) was already checked. Only versions registered under the
        topic's subject are candidates, so the registry's compatibility level (fleet
        subjects: FULL_TRANSITIVE) decides what devices may evolve to.

        Returns:
            The writer's schema, the headers, and that version's Confluent id.

        Raises:
            DecodeError: `unknown_fingerprint` when no version of the subject has it,
                or the strict decoder's reason for the body.
            RegistryError: the registry refused (permanent; transient ones are retried).
        """
        subject = subject_for(UPLINK_TOPIC[kind])
        found = await self._retry(
            "registry", self.resolver.resolve, subject, item.payload[2:SINGLE_OBJECT_HEADER]
        )
        if found is None:
            raise DecodeError(f"{unknown} (not registered under {subject})", reason=unknown.reason)
        schema, headers = self._validate(item, device_id, kind, writer=found.schema)
        return schema, headers, found.schema_id

    def _validate(
        self,
        item: Incoming,
        device_id: str,
        kind: UplinkKind,
        *,
        writer: EventSchema | None = None,
    ) -> tuple[EventSchema, list[tuple[str, bytes]]]:
        """Header checks always; a full bounded decode unless validation is `header`.

        Decoding checks the header itself, so the full path reads the header once.
        `writer` is a registered version resolved by fingerprint (the header is checked)."""
        full = self.settings.validation == "full"
        if writer is not None:
            schema = writer
            if full:
                # The same strict reader and limits as for shipped schemas (memoized).
                record = cached_reader(writer.text, self.codec.limits)(
                    item.payload, SINGLE_OBJECT_HEADER
                )
        elif full:
            schema, record = self.codec.decode(item.payload)
        else:
            schema = self.codec.peek(item.payload)
        expected = EXPECTED_SCHEMA[kind]
        if schema.name != expected.name:
            raise DecodeError(
                f"{kind.value} topic carries {schema.name}, expected {expected.name}",
                reason="wrong_schema",
                schema=schema.name,
            )
        headers = [("mqtt_topic", item.topic.encode()), ("bridge", self._bridge_id)]
        if full:
            if record["device_id"] != device_id:
                raise DecodeError(
                    f"event says device_id={record['device_id']!r} but was published "
                    f"under {device_id!r}",
                    reason="device_mismatch",
                    schema=schema.name,
                    path=f"{schema.short_name}.device_id",
                )
            headers.append(("event_id", str(record["event_id"]).encode()))
        return schema, headers

    async def _dead(
        self,
        item: Incoming,
        topic: str,
        reason: str,
        detail: str,
        device_id: str | None,
        *,
        payload_bytes: int | None = None,
    ) -> Routed:
        self.metrics.dlq.labels(reason).inc()
        log.info(
            "dead-lettered", extra={"reason": reason, "topic": item.topic, "detail": detail[:200]}
        )
        value = await self.dead_letters.encode(
            topic,
            reason=reason,
            detail=detail,
            source=f"mqtt:{item.topic}",
            device_id=device_id,
            payload=item.payload,
            retry=self._retry,
            payload_bytes=payload_bytes,
        )
        key = device_id.encode() if device_id else None
        headers = [("reason", reason.encode())]
        if payload_bytes == 0:
            headers.append(_STRIPPED)
        return Routed(item, topic, key, value, headers, "dlq", device_id)

    async def _retry(self, what: str, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Call `fn` until it succeeds while the failure is retriable (service down).

        Raises:
            The first failure the shared policy (`core/retry.py`) calls permanent.
        """

        def on_retry(exc: BaseException, _attempt: int, delay: float) -> None:
            self.metrics.retries.labels(what).inc()
            log.warning(
                f"{what} unavailable; retrying",
                extra={"error": repr(exc), "delay_s": round(delay, 3)},
            )

        return await retry(lambda: fn(*args), self._backoff, on_retry=on_retry)
