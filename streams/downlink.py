"""Downlink: Kafka control topics → per-device MQTT topics, single-object framed.

- `control.thresholds.v1` → `edgeloop/<d>/down/threshold` (retained, QoS 1); a COHORT
  threshold goes to every member.
- `ml.model-releases.v1` (key = cohort) → `edgeloop/<d>/down/model` for every member.
- `cloud.verdicts.v1` → `edgeloop/<d>/down/verdict` (QoS 1, not retained).

One consumer group drives the publishes and commits a batch's offsets only after every
MQTT publish of it was acknowledged, so a restart neither skips nor repeats more than one
batch. Cohort membership comes from `fleet.devices.v1`, and the latest threshold and
release per cohort from their compacted topics: both are read whole at start (state, not
work), so a device that joins a cohort later still gets its cohort's current model and
threshold, without republishing everything on every restart.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import defaultdict
from typing import Any

import aiomqtt
from aiokafka import AIOKafkaConsumer, TopicPartition

from edgeloop.core.errors import DecodeError, RegistryError
from edgeloop.core.logs import get_logger
from edgeloop.core.settings import KafkaSettings, MqttSettings
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import DownlinkKind, mqtt_downlink
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

Record = dict[str, Any]


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
        if topic == VERDICTS:
            return [record["device_id"]]
        if topic == RELEASES:
            return sorted(self.members.get(record["cohort"], ()))
        if record["scope"] == "DEVICE":
            return [record["scope_id"]]
        if record["scope"] == "COHORT":
            return sorted(self.members.get(record["scope_id"], ()))
        return sorted(self.cohort_of)  # FLEET


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
        self.confluent = ConfluentCodec()
        self.single = SingleObjectCodec()
        self.ready = asyncio.Event()  # set once the fleet state is caught up

    async def run(self) -> None:
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
            tg.create_task(self._follow_state(client))
            await self.ready.wait()
            tg.create_task(self._drive(client))

    async def _decode(self, value: bytes) -> tuple[EventSchema, Record]:
        """Decode with the writer's schema (fetched by id once): devices know its fingerprint."""
        schema_id = self.confluent.schema_id(value)
        if not self.confluent.knows(schema_id):
            schema = EventSchema.from_text(await self.registry.schema(schema_id))
            self.confluent.add(schema_id, schema)
        _, schema, record = self.confluent.decode(value)
        return schema, record

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
        await consumer.start()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=500)
                for tp, records in batches.items():
                    for msg in records:
                        await self._handle(client, tp.topic, msg.value)
                if batches:
                    await consumer.commit()
        finally:
            await consumer.stop()

    async def _handle(self, client: aiomqtt.Client, topic: str, value: bytes | None) -> None:
        if value is None:  # a tombstone on a compacted topic: nothing to send
            return
        try:
            schema, record = await self._decode(value)
        except (DecodeError, RegistryError) as exc:
            self.metrics.dlq.labels(getattr(exc, "reason", "registry_rejected")).inc()
            log.warning("downlink record skipped", extra={"topic": topic, "error": str(exc)})
            return
        await self._publish(client, topic, schema, record, self.fleet.targets(topic, record))

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
        except (DecodeError, RegistryError) as exc:
            log.warning("fleet state record skipped", extra={"topic": topic, "error": str(exc)})
            return
        if topic == RELEASES:
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
