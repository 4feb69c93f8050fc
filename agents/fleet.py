"""The fleet table's source of truth: DeviceRecords on the compacted `fleet.devices.v1`.

`edgeloop fleet register|list|set-cohort|decommission` read and write it; the agents keep
it in their `fleet` table and the bridge's downlink reads cohort membership from it.
Key = device id, so compaction keeps each device's latest record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from edgeloop.agents.codec import SchemaBook
from edgeloop.core.errors import ConfigError, DecodeError
from edgeloop.core.logs import get_logger
from edgeloop.core.settings import KafkaSettings
from edgeloop.schemas import catalog
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.events import DeviceRecord
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import level_problem

log = get_logger(__name__)

FLEET_TOPIC = "fleet.devices.v1"
DEVICE_RECORD = catalog.get("DeviceRecord")


def new_record(
    device_id: str,
    *,
    cohort: str,
    hardware: str = "",
    target: str = "",
    site: str = "",
    labels: Mapping[str, str] | None = None,
    registered_at: int | None = None,
    decommissioned: bool = False,
) -> DeviceRecord:
    """A DeviceRecord (a fresh event id: each write is a new event about the device).

    Raises:
        ConfigError: `device_id` or `cohort` is empty, over 128 characters, or holds a
            character an MQTT topic level cannot (schemas.topics.level_problem).
    """
    # Both name MQTT topic levels downstream: the bridge publishes to a device's topics
    # and fans a cohort's releases and thresholds out to its members; a record the
    # downlink cannot deliver is dead-lettered there, so refuse it here, where it is typed.
    for name, value in (("device_id", device_id), ("cohort", cohort)):
        problem = level_problem(value)
        if problem is not None:
            raise ConfigError(f"{name} {value!r} {problem}: it cannot be an MQTT topic level")
    now = time.time_ns() // 1000
    return {
        "event_id": str(uuid.uuid4()),
        "ts": now,
        "device_id": device_id,
        "cohort": cohort,
        "hardware": hardware,
        "target": target,
        "site": site,
        "labels": dict(labels or {}),
        "registered_at": registered_at if registered_at is not None else now,
        "decommissioned": decommissioned,
    }


async def _stop(consumer: AIOKafkaConsumer) -> None:
    """Stop a group-less consumer. aiokafka 0.14 can raise CancelledError from `stop()`
    by awaiting its own cancelled committed-offsets task (seen on Apache Kafka); that is
    not a cancellation of ours, so it is swallowed unless this task is being cancelled."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def _fleet_topic_missing() -> ConfigError:
    return ConfigError(
        f"topic {FLEET_TOPIC} does not exist: create the topics first with "
        f"`edgeloop topics create --partitions N` (N = EDGELOOP_AGENTS_PARTITIONS)"
    )


class FleetClient:
    """Reads the whole fleet topic, writes one record at a time (acks=all)."""

    def __init__(self, kafka: KafkaSettings, registry: RegistryClient) -> None:
        self.kafka = kafka
        self.book = SchemaBook(registry, DecodeLimits())

    async def write(self, record: DeviceRecord) -> None:
        """Write `record` (keyed by its device id); returns once Kafka acknowledged it."""
        await self.book.register_output(FLEET_TOPIC, DEVICE_RECORD)
        value = self.book.encode(FLEET_TOPIC, record)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap,
            acks="all",
            enable_idempotence=self.kafka.idempotence,
            client_id="edgeloop-fleet",
        )
        try:
            # Inside the try: a start that fails (broker down) must still close the client,
            # or aiokafka warns "Unclosed AIOKafkaProducer" at exit.
            await producer.start()
            # A send to a missing topic has the broker auto-create it with its defaults:
            # one partition or a few, and `delete`, where the fleet topic is compacted and
            # co-partitioned with the agents' inputs. Metadata of all topics creates none.
            cluster = await producer.client.fetch_all_metadata()
            if FLEET_TOPIC not in cluster.topics():
                raise _fleet_topic_missing()
            await producer.send_and_wait(FLEET_TOPIC, value, key=record["device_id"].encode())
        finally:
            await producer.stop()

    async def read(self) -> dict[str, DeviceRecord]:
        """Every device's latest record (the topic read from its start to its end)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id="edgeloop-fleet",
        )
        fleet: dict[str, DeviceRecord] = {}
        try:
            await consumer.start()  # in the try: a failed start still closes the client
            # `partitions_for_topic` reads the client's metadata cache, which after start
            # holds what aiokafka's bootstrap asked for: metadata of an empty topic list.
            # Apache Kafka answers that with no topics (Tansu with all, which hid this),
            # and `topics()` fetches full metadata without keeping it. So read the
            # partitions from a full metadata answer (aiokafka has no public call for it).
            cluster = await consumer._client.fetch_all_metadata()
            parts = cluster.partitions_for_topic(FLEET_TOPIC) or set()
            tps = [TopicPartition(FLEET_TOPIC, p) for p in sorted(parts)]
            if FLEET_TOPIC not in cluster.topics():
                # Not an empty fleet: after `infra down` on Tansu every topic is gone, and
                # an empty listing would not say so.
                raise _fleet_topic_missing()
            if not tps:
                return fleet
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            # Done with a partition once the read position reaches the end offset fetched
            # above: offsets may have gaps (compaction, control records), so the last
            # record's offset + 1 need not equal it.
            remaining = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=1000)
                for msgs in batches.values():
                    for msg in msgs:
                        if msg.value is not None:
                            with contextlib.suppress(DecodeError):  # _apply says why
                                await self.book.learn(msg.value)
                        self._apply(fleet, msg.key, msg.value)
                remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
        finally:
            await _stop(consumer)
        return fleet

    def _apply(
        self, fleet: dict[str, DeviceRecord], key: bytes | None, value: bytes | None
    ) -> None:
        if value is None:
            if key:
                fleet.pop(key.decode("utf-8", "replace"), None)
            return
        try:
            schema, rec = self.book.decode(value)
        except DecodeError as exc:
            log.warning("unreadable fleet record skipped", extra={"reason": exc.reason})
            return
        if schema.name == DEVICE_RECORD.name:
            fleet[str(rec["device_id"])] = rec  # type: ignore[assignment]
