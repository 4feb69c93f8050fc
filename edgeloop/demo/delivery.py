"""Did every event each device produced reach Kafka? Counted by event id.

A device's InferenceEvents are `<device>:<seq>`; the simulator's summary says how many
each device produced in its lifetime and how many were still in its outbox at exit. This
reads `edge.inference.v1` from the start to its end
(`edgeloop.schemas.topic_reader.read_topic`) and counts, per device, the
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
# The longest the whole read may take (a ceiling: a read that reaches the end returns).
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
         "totals": {"produced", "in_kafka", "duplicates", "missing", "outbox_left",
                    "undecodable_skipped", "read_complete"}}; `read_complete` is False
        when the topic was not read to its end within READ_DEADLINE_S (then `missing`
        may count events that are in Kafka).

    Raises:
        RegistryUnavailableError / retriable RegistryError: the registry cannot be reached.
        KafkaError: the broker is unreachable.
    """
    from edgeloop.agents.codec import SchemaBook
    from edgeloop.core.settings import KafkaSettings, RegistrySettings
    from edgeloop.schemas.bounded import DecodeLimits
    from edgeloop.schemas.registry.client import RegistryClient
    from edgeloop.schemas.topic_reader import read_topic

    kafka = KafkaSettings.load(home)
    registry = RegistrySettings.load(home)
    async with RegistryClient(registry.url) as client:
        book = SchemaBook(client, DecodeLimits())

        async def event_id(value: bytes) -> str:
            return str((await book.read(value))["event_id"])

        # Records that do not decode (bad framing, unknown schema) are nobody's delivery:
        # the agents dead-letter them; the reader skips and counts them.
        got = await read_topic(kafka.bootstrap, topic, event_id, timeout_s=READ_DEADLINE_S)
    seen: dict[str, set[int]] = defaultdict(set)
    duplicates: dict[str, int] = defaultdict(int)
    for eid in got.records:
        device, _, seq = eid.rpartition(":")
        if device not in summary:
            continue
        if int(seq) in seen[device]:
            duplicates[device] += 1
        seen[device].add(int(seq))
    counted = _tally(summary, seen, duplicates, got.undecodable)
    counted["totals"]["read_complete"] = got.complete
    return counted


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
