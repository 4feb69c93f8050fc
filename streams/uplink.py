"""Uplink: MQTT (single-object Avro) → validated, re-framed → Kafka (Confluent framing).

At-least-once: a message's PUBACK goes to the broker only after Kafka acknowledged its
record (acks=all) or its dead-letter record. Until then the broker holds it; a crash of
the bridge means redelivery to the same persistent session, never loss. The in-flight
window is the MQTT Receive Maximum.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from edgeloop.core.errors import ConfigError, DecodeError, EdgeloopError, RegistryError
from edgeloop.core.logs import get_logger
from edgeloop.core.settings import KafkaSettings, MqttSettings
from edgeloop.schemas import catalog
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec, single_to_confluent
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import (
    TOPICS,
    UPLINK_DLQ,
    UPLINK_TOPIC,
    UplinkKind,
    dlq_topic,
    parse_mqtt_uplink,
    subject_for,
)
from edgeloop.streams.intake import Incoming, MqttIntake
from edgeloop.streams.metrics import BridgeMetrics
from edgeloop.streams.native_intake import NativeIntake
from edgeloop.streams.schema_ids import SchemaIds, UnregisteredSchemaError
from edgeloop.streams.settings import BridgeSettings

log = get_logger(__name__)


EXPECTED_SCHEMA = {kind: catalog.get(TOPICS[topic].event) for kind, topic in UPLINK_TOPIC.items()}
T = TypeVar("T")
ROUTE_SLICE = 128


@dataclass(slots=True)
class Routed:
    item: Incoming
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    label: str  # uplink kind, or "dlq"


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
        self.registry = registry
        self.codec = SingleObjectCodec(
            catalog.catalog().values(),
            DecodeLimits(
                max_message_bytes=settings.max_message_bytes,
                min_timestamp_us=settings.min_timestamp_us,
                max_timestamp_us=settings.max_timestamp_us,
            ),
        )
        self.dlq_codec = ConfluentCodec()
        self.dead_letter = catalog.get("DeadLetter")
        self._dlq_ids: dict[str, int] = {}
        self._bridge_id = settings.client_id.encode()
        self._received = {kind: metrics.uplink_in.labels(kind.value) for kind in UplinkKind}

    async def run(self) -> None:
        s = self.settings
        intake_type = NativeIntake if s.intake == "native" else MqttIntake
        intake = intake_type(
            self.mqtt,
            client_id=s.client_id,
            topic_filter=f"$share/{s.share_group}/edgeloop/+/up/#",
            receive_maximum=s.receive_maximum,
            session_expiry_s=s.session_expiry_s,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap,
            acks="all",
            enable_idempotence=self.kafka.idempotence,
            linger_ms=s.linger_ms,
            max_batch_size=s.max_batch_bytes,
            request_timeout_ms=15_000,
            client_id=f"{s.client_id}-uplink",
        )
        await self._retry("kafka", producer.start)
        await self._warm_up(producer)
        # Batches travel from the router to the acknowledger; two in flight keeps both busy.
        handoff: asyncio.Queue[tuple[list[Routed], list[asyncio.Future[object]]]] = asyncio.Queue(
            maxsize=2
        )
        try:
            await intake.start()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._route_loop(intake, producer, handoff))
                tg.create_task(self._ack_loop(intake, producer, handoff))
        finally:
            intake.stop()  # unacknowledged messages stay with the broker's session
            await producer.stop()

    async def _warm_up(self, producer: AIOKafkaProducer) -> None:
        """Fetch topic metadata and schema ids before the first message, not during it:
        otherwise the first few hundred events carry tens of ms of lookups. Best effort,
        bounded: whatever is missing is looked up (and retried) when it is needed."""
        try:
            async with asyncio.timeout(5):
                for kind, topic in UPLINK_TOPIC.items():
                    await producer.partitions_for(topic)
                    await self.ids.id_for(subject_for(topic), EXPECTED_SCHEMA[kind])
        except (TimeoutError, KafkaError, EdgeloopError, OSError) as exc:
            log.info("warm-up incomplete; continuing", extra={"error": repr(exc)})

    async def _route_loop(
        self,
        intake: MqttIntake | NativeIntake,
        producer: AIOKafkaProducer,
        handoff: asyncio.Queue[tuple[list[Routed], list[asyncio.Future[object]]]],
    ) -> None:
        while True:
            # Small slices keep the loop responsive: while a slice is routed, Kafka's acks
            # (and so the PUBACKs of earlier slices) wait. 1000 at once cost 10+ ms of p99.
            batch = await intake.batch(ROUTE_SLICE)
            self.metrics.in_flight.set(len(batch) + intake.depth)
            routed = [await self._route(item) for item in batch]
            futures = await self._send(producer, routed)
            await handoff.put((routed, futures))

    async def _ack_loop(
        self,
        intake: MqttIntake | NativeIntake,
        producer: AIOKafkaProducer,
        handoff: asyncio.Queue[tuple[list[Routed], list[asyncio.Future[object]]]],
    ) -> None:
        while True:
            routed, futures = await handoff.get()
            await self._settle(producer, routed, futures)
            now = time.monotonic_ns()
            produced: Counter[str] = Counter()
            observe = self.metrics.added_latency.observe
            for r in routed:
                intake.ack(r.item)
                produced[r.label] += 1
                observe((now - r.item.received_ns) / 1e9)
            # One labelled increment per kind and batch: label lookups cost per call.
            for label, count in produced.items():
                self.metrics.uplink_out.labels(label).inc(count)

    async def _send(
        self, producer: AIOKafkaProducer, routed: Sequence[Routed]
    ) -> list[asyncio.Future[object]]:
        futures: list[asyncio.Future[object]] = []
        for r in routed:
            try:
                fut = await producer.send(r.topic, r.value, key=r.key, headers=r.headers)
            except KafkaError as exc:
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(exc)
            futures.append(fut)
        return futures

    async def _settle(
        self,
        producer: AIOKafkaProducer,
        routed: list[Routed],
        futures: list[asyncio.Future[object]],
    ) -> None:
        """Wait until Kafka has every record; re-send from the first failure, in order."""
        delay = 0.1
        while True:
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed = next((i for i, r in enumerate(results) if isinstance(r, BaseException)), None)
            if failed is None:
                return
            self.metrics.retries.labels("kafka").inc()
            log.warning(
                "kafka produce failed; holding MQTT acks and retrying",
                extra={"error": repr(results[failed]), "pending": len(routed) - failed},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.retry_backoff_max_s)
            routed = routed[failed:]
            futures = await self._send(producer, routed)

    async def _route(self, item: Incoming) -> Routed:
        try:
            device_id, kind = parse_mqtt_uplink(item.topic)
        except ConfigError as exc:
            self.metrics.uplink_in.labels("unknown").inc()
            return await self._dead(item, UPLINK_DLQ, "bad_topic", str(exc), None)
        self._received[kind].inc()
        topic = UPLINK_TOPIC[kind]
        try:
            schema, headers = self._validate(item, device_id, kind)
            schema_id = await self._retry("registry", self.ids.id_for, subject_for(topic), schema)
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
        )

    def _validate(
        self, item: Incoming, device_id: str, kind: UplinkKind
    ) -> tuple[EventSchema, list[tuple[str, bytes]]]:
        """Header checks always; a full bounded decode unless validation is `header`.

        Decoding checks the header itself, so the full path reads the header once."""
        full = self.settings.validation == "full"
        if full:
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
        self, item: Incoming, topic: str, reason: str, detail: str, device_id: str | None
    ) -> Routed:
        self.metrics.dlq.labels(reason).inc()
        log.info(
            "dead-lettered", extra={"reason": reason, "topic": item.topic, "detail": detail[:200]}
        )
        cap = self.settings.dlq_payload_bytes
        record = {
            "event_id": str(uuid.uuid4()),
            "ts": time.time_ns() // 1000,
            "stage": "bridge-uplink",
            "reason": reason,
            "detail": detail,
            "source": f"mqtt:{item.topic}",
            "client_id": None,
            "device_id": device_id,
            "payload": item.payload[:cap],
            "payload_size": len(item.payload),
            "truncated": len(item.payload) > cap,
        }
        schema_id = self._dlq_ids.get(topic)
        if schema_id is None:
            # The bridge owns its dead-letter topics, so it registers their schema itself.
            schema_id = await self._retry(
                "registry", self.registry.register, subject_for(topic), self.dead_letter.text
            )
            self._dlq_ids[topic] = schema_id
        value = self.dlq_codec.encode(schema_id, self.dead_letter, record)
        key = device_id.encode() if device_id else None
        return Routed(item, topic, key, value, [("reason", reason.encode())], "dlq")

    async def _retry(self, what: str, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Call `fn` until it succeeds while the failure is retriable (service down)."""
        delay = 0.2
        while True:
            try:
                return await fn(*args)
            except (KafkaError, OSError, EdgeloopError) as exc:
                if isinstance(exc, EdgeloopError) and not exc.retriable:
                    raise
                self.metrics.retries.labels(what).inc()
                log.warning(
                    f"{what} unavailable; retrying", extra={"error": repr(exc), "delay_s": delay}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_backoff_max_s)
