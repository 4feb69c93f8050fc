"""Downlink: Kafka control topics → per-device MQTT topics, single-object framed.

- `control.thresholds.v1` → `edgeloop/<d>/down/threshold` (retained, QoS 1); a COHORT
  threshold goes to every member.
- `ml.model-releases.v1` (key = cohort) → `edgeloop/<d>/down/model` for every member.
- `cloud.verdicts.v1` → `edgeloop/<d>/down/verdict` (QoS 1, not retained).

One consumer group drives the publishes and commits a batch's offsets only after every
MQTT publish of it was acknowledged, so a restart neither skips nor repeats more than one
batch. A lost MQTT connection restarts that cycle in-process (`run`), not the bridge. A
record that can never be delivered (undecodable, an unknown schema id, a writer's schema
that does not resolve to the shipped one, the wrong event for its topic, a device
or cohort id that is not a valid MQTT topic level) is
dead-lettered to `<topic>.dlq.v1` with its reason and counts as handled; a registry that
is unreachable or answers 5xx is waited out with the shared retry policy
(`core/retry.py`), holding the batch uncommitted: a record is never skipped.

Cohort membership comes from `fleet.devices.v1`, and the latest threshold and
release per cohort from their compacted topics: both are read whole at start (state, not
work), so a device that joins a cohort later still gets its cohort's current model and
threshold, without republishing everything on every restart.

Devices decode only the schemas they shipped with, so every record is published in the
bridge's shipped schema for its event (`schemas/resolution.py`; the shipped `.avsc` of a
downlink event is the fleet's floor, see docs/architecture.md, "Schema evolution").
"""

from __future__ import annotations

import asyncio
import ssl
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiomqtt
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from edgeloop.core.errors import DecodeError, EdgeloopError
from edgeloop.core.logs import get_logger
from edgeloop.core.retry import Backoff, retry
from edgeloop.core.settings import KafkaSettings, MqttSettings
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.resolution import to_shipped
from edgeloop.schemas.topics import DownlinkKind, dlq_topic, level_problem, mqtt_downlink
from edgeloop.streams.dead_letters import DeadLetters
from edgeloop.streams.metrics import BridgeMetrics
from edgeloop.streams.settings import BridgeSettings

log = get_logger(__name__)

THRESHOLDS = "control.thresholds.v1"
RELEASES = "ml.model-releases.v1"
VERDICTS = "cloud.verdicts.v1"
FLEET = "fleet.devices.v1"
KIND = {
    THRESHOLDS: DownlinkKind.THRESHOLD,
    RELEASES: DownlinkKind.MODEL,
    VERDICTS: DownlinkKind.VERDICT,
}

# What the downlink reads (the fleet state and what it publishes to devices) and writes
# (the dead letters of what it publishes): `edgeloop bridge` checks they exist.
READS = frozenset([FLEET, *KIND])
WRITES = frozenset(dlq_topic(t) for t in KIND)

EXPECTED_EVENT = {
    THRESHOLDS: "ThresholdUpdate",
    RELEASES: "ModelRelease",
    VERDICTS: "CloudVerdict",
    FLEET: "DeviceRecord",
}
T = TypeVar("T")

Record = dict[str, Any]


class BadTargetError(EdgeloopError):
    """A record names a device or cohort that cannot be a topic level (dead-lettered)."""

    reason = "bad_target"


class Fleet:
    """Cohort membership and the latest control state per cohort, from compacted topics."""

    def __init__(self) -> None:
        self.cohort_of: dict[str, str] = {}
        self.members: dict[str, set[str]] = defaultdict(set)
        # cohort -> (writer schema, record) of the newest release / cohort threshold
        self.latest_release: dict[str, tuple[EventSchema, Record]] = {}
        self.latest_threshold: dict[str, tuple[EventSchema, Record]] = {}

    def apply_device(self, record: Record) -> str | None:
        """Returns the device id when it newly joined a cohort (it needs that cohort's state)."""
        device, cohort = record["device_id"], record["cohort"]
        problem = level_problem(device)
        if problem is not None:
            # Such a device can never be published to; keeping it out of the membership
            # keeps every cohort release and threshold deliverable to the others.
            log.warning("fleet record ignored", extra={"device_id": repr(device), "why": problem})
            return None
        old = self.cohort_of.get(device)
        if old is not None:
            self.members[old].discard(device)
        if record["decommissioned"]:
            self.cohort_of.pop(device, None)
            return None
        self.cohort_of[device] = cohort
        self.members[cohort].add(device)
        return device if old != cohort else None

    def targets(self, topic: str, record: Record) -> list[str]:
        """The devices `record` goes to.

        Raises:
            BadTargetError: the device or cohort it names is not a valid topic level.
        """
        if topic == VERDICTS:
            return [_checked("device_id", record["device_id"])]
        if topic == RELEASES:
            return sorted(self.members.get(_checked("cohort", record["cohort"]), ()))
        if record["scope"] == "DEVICE":
            return [_checked("scope_id", record["scope_id"])]
        if record["scope"] == "COHORT":
            return sorted(self.members.get(_checked("scope_id", record["scope_id"]), ()))
        return sorted(self.cohort_of)  # FLEET


def _expect(topic: str, schema: EventSchema) -> None:
    if schema.short_name != EXPECTED_EVENT[topic]:
        raise DecodeError(
            f"{topic} carries {schema.short_name}, expected {EXPECTED_EVENT[topic]}",
            reason="wrong_schema",
            schema=schema.name,
        )


def _checked(field: str, value: str) -> str:
    problem = level_problem(value)
    if problem is not None:
        raise BadTargetError(f"{field} {value!r} {problem}: it cannot be an MQTT topic level")
    return value


def _only_mqtt(exc: BaseException) -> aiomqtt.MqttError | None:
    """The MQTT error `exc` is, or the first of its group when the group holds nothing
    else (the TaskGroup's tasks failed only on the connection); otherwise None."""
    if isinstance(exc, aiomqtt.MqttError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(aiomqtt.MqttError)
        if match is not None and rest is None:
            leaves = _leaves(match)
            return leaves[0] if leaves else None
    return None


def _leaves(group: BaseExceptionGroup[Any]) -> list[aiomqtt.MqttError]:
    out: list[aiomqtt.MqttError] = []
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            out.extend(_leaves(e))
        elif isinstance(e, aiomqtt.MqttError):
            out.append(e)
    return out


class Downlink:
    name = "bridge-downlink"

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
        self.registry = registry
        self.metrics = metrics
        self.fleet = Fleet()
        # Records on the downlink topics are as untrusted as device bytes: same caps.
        self.confluent = ConfluentCodec(limits=settings.decode_limits())
        self.single = SingleObjectCodec(limits=settings.decode_limits())
        self.ready = asyncio.Event()  # set once the fleet state is caught up
        self.dead_letters = DeadLetters(registry, "bridge-downlink", settings.dlq_payload_bytes)
        self._backoff = Backoff(initial_s=0.2, max_s=settings.retry_backoff_max_s)
        self._connected_once = False  # a connection lost after this is waited out

    async def run(self) -> None:
        """Run until cancelled. A broker that refuses the very first connection fails the
        service (a wrong address should be said, not retried in silence). After that, a lost
        MQTT connection (a broker restart, a network cut) ends the cycle, not the bridge:
        reconnect with backoff, re-read the fleet state and go on from the group's committed
        offsets. The batch in hand when the connection dropped was never committed, so its
        records are published again (a threshold or release is idempotent on a device by
        its version), never skipped.
        """
        attempt = 0
        while True:
            try:
                await self._cycle()
            except (aiomqtt.MqttError, ExceptionGroup) as exc:
                lost = _only_mqtt(exc)
                if lost is None:
                    raise  # something besides the connection failed: not ours to retry
                if not self._connected_once:
                    # Never connected: a wrong address or no broker at all. Failing at
                    # start lets `edgeloop bridge` name the address and the fix.
                    raise lost from None
            if self.ready.is_set():
                attempt = 0  # the last cycle got going: start the backoff again
            self.ready.clear()
            self.fleet = Fleet()
            delay = self._backoff.delay(attempt)
            attempt += 1
            self.metrics.retries.labels("mqtt").inc()
            log.warning(
                "mqtt connection lost; reconnecting (downlink)",
                extra={"error": repr(lost), "delay_s": round(delay, 3)},
            )
            await asyncio.sleep(delay)

    async def _cycle(self) -> None:
        """One connection's life: follow the fleet state, then drive the publishes."""
        tls = None
        if self.mqtt.ca_file and self.mqtt.port == self.mqtt.tls_port:
            tls = ssl.create_default_context(cafile=str(self.mqtt.ca_file))
        password = self.mqtt.password.get_secret_value() if self.mqtt.password else None
        async with (
            aiomqtt.Client(
                self.mqtt.host,
                self.mqtt.port,
                username=self.mqtt.username,
                password=password,
                identifier=f"{self.settings.client_id}-downlink",
                tls_context=tls,
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as client,
            asyncio.TaskGroup() as tg,
        ):
            self._connected_once = True
            tg.create_task(self._follow_state(client))
            await self.ready.wait()
            tg.create_task(self._drive(client))

    async def _decode(self, value: bytes) -> tuple[EventSchema, Record]:
        """Decode with the writer's schema (fetched by id once), strictly, then resolve it
        to the schema this bridge shipped with (`to_shipped`): the one devices read.

        Waits out a registry that is unreachable or answers 5xx (never skips the record).

        Raises:
            DecodeError: bad bytes, a schema id the registry does not know, or a writer
                schema that does not resolve to the shipped one (`unresolvable_schema`).
        """
        schema_id = self.confluent.schema_id(value)
        if not self.confluent.knows(schema_id):
            try:
                text = await self._retry("registry", lambda: self.registry.schema(schema_id))
            except EdgeloopError as exc:  # permanent: retriable ones were retried
                raise DecodeError(
                    f"schema id {schema_id} unknown to the registry: {exc}",
                    reason="unknown_schema_id",
                ) from exc
            self.confluent.add(schema_id, EventSchema.from_text(text))
        _, schema, record = self.confluent.decode(value)
        return to_shipped(schema, record, value)

    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Await `fn()` until it succeeds while failures are retriable (core/retry.py)."""

        def on_retry(exc: BaseException, _attempt: int, delay: float) -> None:
            self.metrics.retries.labels(what).inc()
            log.warning(
                f"{what} unavailable; retrying (downlink)",
                extra={"error": repr(exc), "delay_s": round(delay, 3)},
            )

        return await retry(fn, self._backoff, on_retry=on_retry)

    async def _publish(
        self,
        client: aiomqtt.Client,
        topic: str,
        schema: EventSchema,
        record: Record,
        devices: list[str],
    ) -> None:
        payload = self.single.encode(schema, record)
        kind = KIND[topic]
        retain = kind is not DownlinkKind.VERDICT
        for device in devices:
            # aiomqtt's publish returns once the broker's PUBACK arrived (QoS 1).
            await client.publish(mqtt_downlink(device, kind), payload, qos=1, retain=retain)
            self.metrics.downlink_out.labels(kind.value).inc()

    async def _drive(self, client: aiomqtt.Client) -> None:
        consumer = AIOKafkaConsumer(
            THRESHOLDS,
            RELEASES,
            VERDICTS,
            bootstrap_servers=self.kafka.bootstrap,
            group_id=self.settings.downlink_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"{self.settings.client_id}-downlink",
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap,
            acks="all",
            client_id=f"{self.settings.client_id}-downlink-dlq",
        )
        await self._retry("kafka", producer.start)
        try:
            await consumer.start()
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=500)
                for tp, records in batches.items():
                    for msg in records:
                        where = f"kafka:{tp.topic}/{tp.partition}@{msg.offset}"
                        await self._handle(client, producer, tp.topic, msg.value, where)
                if batches:
                    await consumer.commit()
        finally:
            await consumer.stop()
            await producer.stop()

    async def _handle(
        self,
        client: aiomqtt.Client,
        producer: AIOKafkaProducer,
        topic: str,
        value: bytes | None,
        source: str,
    ) -> None:
        if value is None:  # a tombstone on a compacted topic: nothing to send
            return
        try:
            schema, record = await self._decode(value)
            _expect(topic, schema)
            targets = self.fleet.targets(topic, record)
        except (DecodeError, BadTargetError) as exc:
            await self._dead_letter(
                producer, topic, value, reason=exc.reason, detail=str(exc), source=source
            )
            return
        await self._publish(client, topic, schema, record, targets)

    async def _dead_letter(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        value: bytes,
        *,
        reason: str,
        detail: str,
        source: str,
    ) -> None:
        """Write a DeadLetter to `<topic>.dlq.v1` and wait for Kafka's acknowledgement."""
        self.metrics.dlq.labels(reason).inc()
        log.warning(
            "downlink record dead-lettered",
            extra={"topic": topic, "reason": reason, "detail": detail[:200], "source": source},
        )
        dlq = dlq_topic(topic)
        encoded = await self.dead_letters.encode(
            dlq,
            reason=reason,
            detail=detail,
            source=source,
            device_id=None,
            payload=value,
            retry=self._retry,
        )
        headers = [("reason", reason.encode())]
        await self._retry("kafka", lambda: producer.send_and_wait(dlq, encoded, headers=headers))

    async def _follow_state(self, client: aiomqtt.Client) -> None:
        """Tail the compacted topics from the beginning, without a group."""
        # Without a group, aiokafka assigns every partition of the named topics itself.
        consumer = AIOKafkaConsumer(
            FLEET,
            RELEASES,
            THRESHOLDS,
            bootstrap_servers=self.kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"{self.settings.client_id}-fleet",
        )
        await consumer.start()
        try:
            async with asyncio.timeout(60):
                # aiokafka exposes no event for "assignment known"; its metadata poll is brief.
                while not (partitions := sorted(consumer.assignment())):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            ends = await consumer.end_offsets(partitions)
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                for tp, records in batches.items():
                    for msg in records:
                        await self._apply_state(client, tp.topic, msg.value)
                if not self.ready.is_set() and all(
                    await asyncio.gather(
                        *(self._caught_up(consumer, tp, ends[tp]) for tp in partitions)
                    )
                ):
                    log.info("fleet state loaded", extra={"devices": len(self.fleet.cohort_of)})
                    self.ready.set()
        finally:
            await consumer.stop()

    @staticmethod
    async def _caught_up(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> bool:
        return bool(await consumer.position(tp) >= end)

    async def _apply_state(self, client: aiomqtt.Client, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        try:
            schema, record = await self._decode(value)
        except DecodeError as exc:
            # State is re-read whole at every start, so it is not dead-lettered here (that
            # would repeat on every restart); the group consumer dead-letters it once.
            log.warning("fleet state record skipped", extra={"topic": topic, "error": str(exc)})
            return
        if schema.short_name != EXPECTED_EVENT[topic]:
            log.warning("fleet state record skipped", extra={"topic": topic, "event": schema.name})
        elif topic == RELEASES:
            self.fleet.latest_release[record["cohort"]] = (schema, record)
        elif topic == THRESHOLDS and record["scope"] == "COHORT":
            self.fleet.latest_threshold[record["scope_id"]] = (schema, record)
        elif topic == FLEET:
            joined = self.fleet.apply_device(record)
            if joined and self.ready.is_set():
                await self._bring_up_to_date(client, joined)

    async def _bring_up_to_date(self, client: aiomqtt.Client, device: str) -> None:
        cohort = self.fleet.cohort_of[device]
        for topic, latest in (
            (RELEASES, self.fleet.latest_release),
            (THRESHOLDS, self.fleet.latest_threshold),
        ):
            if cohort in latest:
                schema, record = latest[cohort]
                await self._publish(client, topic, schema, record, [device])
