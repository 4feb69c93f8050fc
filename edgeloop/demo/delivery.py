"""Did every event each device produced reach Kafka? Counted by event id.

A device's InferenceEvents are `<device>:<seq>`; the simulator's summary says how many
each device produced in its lifetime and how many were still in its outbox at exit. This
reads `edge.inference.v1` from the start to its end offsets and counts, per device, the
distinct event ids (duplicates, which at-least-once delivery allows and the agents'
dedupe removes downstream, are counted separately).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

INFERENCE_TOPIC = "edge.inference.v1"
# Empty fetches (0.5 s each) in a row that end the read once the reported end is reached,
# and the longest the whole read may take.
EMPTY_POLLS = 4
READ_DEADLINE_S = 120.0


async def count_delivered(
    home: Path, summary: dict[str, dict[str, Any]], *, topic: str = INFERENCE_TOPIC
) -> dict[str, Any]:
    """Compare the fleet's summary with what Kafka holds.

    Args:
        home: the EDGELOOP_HOME whose endpoints file names Kafka and the registry.
        summary: `edge simulate --summary` output: device -> {"inference_events": n, ...}.
        topic: the InferenceEvent topic.

    Returns:
        {"devices": {device: {"produced", "in_kafka", "duplicates", "missing"}},
         "totals": {"produced", "in_kafka", "duplicates", "missing", "outbox_left"}}.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from edgeloop.agents.codec import SchemaBook
    from edgeloop.core.errors import DecodeError
    from edgeloop.core.settings import KafkaSettings, RegistrySettings
    from edgeloop.schemas.bounded import DecodeLimits
    from edgeloop.schemas.registry.client import RegistryClient

    kafka = KafkaSettings.load(home)
    registry = RegistrySettings.load(home)
    seen: dict[str, set[int]] = defaultdict(set)
    duplicates: dict[str, int] = defaultdict(int)
    undecodable = 0
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, enable_auto_commit=False, group_id=None,
        auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()  # aiokafka: no public refresh
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        async with RegistryClient(registry.url) as client:
            book = SchemaBook(client, DecodeLimits())
            # Read past the reported end offsets until the fetches run dry: Tansu 0.6
            # reports an end below offsets it serves once a partition holds multi-record
            # batches, and stopping there missed the newest events (seen in a test run).
            empty = 0
            deadline = time.monotonic() + READ_DEADLINE_S
            while time.monotonic() < deadline and (
                empty < EMPTY_POLLS or not await _caught_up(consumer, ends)
            ):
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                empty = 0 if any(batches.values()) else empty + 1
                for records in batches.values():
                    for rec in records:
                        if rec.value is None:
                            continue
                        try:
                            await book.learn(rec.value)
                            event = book.decode(rec.value)[1]
                        except DecodeError:
                            # Not an event anyone produced (bad framing, unknown schema):
                            # the agents dead-letter such records; they are nobody's
                            # delivery, so they are counted apart and skipped.
                            undecodable += 1
                            continue
                        device, _, seq = str(event["event_id"]).rpartition(":")
                        if device not in summary:
                            continue
                        if int(seq) in seen[device]:
                            duplicates[device] += 1
                        seen[device].add(int(seq))
    finally:
        await consumer.stop()
    return _tally(summary, seen, duplicates, undecodable)


def _tally(
    summary: dict[str, dict[str, Any]],
    seen: dict[str, set[int]],
    duplicates: dict[str, int],
    undecodable: int,
) -> dict[str, Any]:
    devices: dict[str, dict[str, int]] = {}
    for device, facts in sorted(summary.items()):
        produced = int(facts.get("inference_events") or 0)
        in_kafka = len(seen[device])
        devices[device] = {
            "produced": produced,
            "in_kafka": in_kafka,
            "duplicates": duplicates[device],
            "missing": max(0, produced - in_kafka),
        }
    totals = {
        k: sum(d[k] for d in devices.values())
        for k in ("produced", "in_kafka", "duplicates", "missing")
    }
    totals["outbox_left"] = sum(int(f.get("outbox_depth") or 0) for f in summary.values())
    totals["undecodable_skipped"] = undecodable
    return {"devices": devices, "totals": totals}


async def _caught_up(consumer: Any, ends: dict[Any, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


async def await_delivered(
    home: Path, summary: dict[str, dict[str, Any]], *, within_s: float = 60.0
) -> dict[str, Any]:
    """`count_delivered` again until nothing is missing or `within_s` passed.

    The devices' outboxes are empty once Mosquitto acknowledged their events; the bridge
    may still be moving the last of them into Kafka (a drained partition's burst), so a
    count taken at once can miss events that arrive a second later.

    Returns:
        The last count (its `missing` is what never arrived).
    """
    deadline = time.monotonic() + within_s
    while True:
        counted = await count_delivered(home, summary)
        if counted["totals"]["missing"] == 0 or time.monotonic() >= deadline:
            return counted
        await asyncio.sleep(2.0)
