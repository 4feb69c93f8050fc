"""Each release's lineage, read back from Kafka: trigger -> offset ranges -> training run
-> artifact -> the cohorts and waves it went to.

Sources: `ml.model-releases.v1` (every step: the trainer's CANARY or REFUSED, the judge's
WAVE / FULL / ROLLBACK, an operator's FULL) and `ml.training-triggers.v1` (why a retrain
ran and on which hard examples). Both are read from their beginning to the end offsets
taken at the start, with a group-less consumer (nothing is committed), and decoded from
the Confluent wire format with the schemas the registry names.

A step belongs to the version it is about: a ROLLBACK names the version it reinstalls in
`model_version` and the rolled-back candidate in `parent_version`, so it is filed under
the candidate. A REFUSED record names the serving version (the compacted topic's newest
record per cohort must stay a valid instruction); it is filed as its own entry, under the
trigger that was refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from edgeloop.agents.codec import SchemaBook
from edgeloop.core.errors import DecodeError
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.registry.client import RegistryClient

RELEASES, TRIGGERS = "ml.model-releases.v1", "ml.training-triggers.v1"


@dataclass(frozen=True)
class ReleaseLineage:
    """One model version's story (or one refused trigger's)."""

    model: str
    version: int
    parent_version: int
    trigger_id: str | None
    trigger_reason: str | None  # COUNT, DRIFT, SCHEDULE, MANUAL (the trigger's reason)
    offset_ranges: dict[str, list[int]]  # "topic/partition" -> [first, last] offsets
    training_run: str | None  # the trainer's run dir, when the release's reason says
    manifest_sha256: str
    artifact_url: str
    steps: list[dict[str, Any]] = field(default_factory=list)  # every ModelRelease of it


def _reason(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # an operator's free text


async def read_topic(
    bootstrap: str, book: SchemaBook, topic: str, *, timeout_s: float
) -> list[dict[str, Any]]:
    """Every record of `topic` up to the end offsets taken now, decoded, in offset order
    per partition.

    Args:
        bootstrap: the Kafka bootstrap servers.
        book: decodes Confluent-framed records (learns schema ids from the registry).
        topic: the topic to read.
        timeout_s: the longest the read of the topic takes; partitions not read to their
            end by then are left with their tail missing (not waited for forever).

    Returns:
        The decoded records.

    Records that do not decode (foreign bytes on the topic) are skipped.

    Raises:
        KafkaError: the broker is unreachable.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()  # aiokafka: no public refresh
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return out
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        # Done with a partition once its position reaches the end offset: compaction and
        # transaction markers leave gaps, so the last record's offset may be below it.
        remaining = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        # One deadline for the topic, short polls: a first fetch from freshly assigned
        # partitions can come back empty (measured on Tansu, loaded: nothing within 5 s,
        # everything within 15 s), so an empty poll is no reason to stop. Past the
        # reported end offsets the read goes on until two fetches in a row are empty:
        # Tansu 0.6 reports an end below offsets it serves (multi-record batches).
        deadline = time.monotonic() + timeout_s
        empty = 0
        while (remaining or empty < 2) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            empty = 0 if any(batches.values()) else empty + 1
            for tp, records in batches.items():
                for rec in records:
                    if rec.value:
                        try:
                            await book.learn(rec.value)
                            out.append(book.decode(rec.value)[1])
                        except DecodeError:
                            continue  # foreign bytes on the topic: not a release of ours
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return out


def build_lineage(
    releases: list[dict[str, Any]], triggers: list[dict[str, Any]], *, model: str
) -> list[ReleaseLineage]:
    """Group `model`'s release steps by version and join each to its trigger.

    Args:
        releases: decoded ModelRelease records, in topic order.
        triggers: decoded TrainingTrigger records.
        model: the model name.

    Returns:
        One entry per version (and per refused trigger), oldest version first.
    """
    by_trigger = {t["trigger_id"]: t for t in triggers if t["model_name"] == model}
    groups: dict[tuple[str, int | str], list[dict[str, Any]]] = {}
    for rel in releases:
        if rel["model_name"] != model:
            continue
        reason = _reason(rel["reason"])
        step = {
            "stage": rel["stage"],
            "wave": rel["wave"],
            "cohort": rel["cohort"],
            "share": rel.get("share"),
            "ts": rel["ts"],
            "model_version": rel["model_version"],
            "parent_version": rel["parent_version"],
            "artifact_url": rel["artifact_url"],
            "manifest_sha256": rel["manifest_sha256"],
            "reason": reason,
        }
        if rel["stage"] == "REFUSED":
            tid = reason.get("trigger_id", "") if isinstance(reason, dict) else ""
            key: tuple[str, int | str] = ("refused", str(tid) or str(rel["event_id"]))
        elif rel["stage"] == "ROLLBACK" and rel["parent_version"] is not None:
            key = ("version", int(rel["parent_version"]))
        else:
            key = ("version", int(rel["model_version"]))
        groups.setdefault(key, []).append(step)
    return sorted(
        (_entry(model, steps, by_trigger) for steps in groups.values()),
        key=lambda e: (e.version, e.steps[0]["stage"] == "REFUSED", e.steps[0]["ts"]),
    )


def _entry(
    model: str, steps: list[dict[str, Any]], by_trigger: dict[str, dict[str, Any]]
) -> ReleaseLineage:
    # The version's own record (not a rollback, which carries the parent's artifact).
    own = next((s for s in steps if s["stage"] != "ROLLBACK"), steps[0])
    reason = next((s["reason"] for s in steps if isinstance(s["reason"], dict)
                   and "trigger_id" in s["reason"]), {})  # fmt: skip
    trigger_id = reason.get("trigger_id")
    trigger = by_trigger.get(trigger_id) if trigger_id else None
    ranges: dict[str, list[int]] = dict(reason.get("offset_ranges") or {})
    if not ranges and trigger is not None:
        ranges = {f"{r['topic']}/{r['partition']}": [r["start_offset"], r["end_offset"] - 1]
                  for r in trigger["ranges"]}  # fmt: skip
    if own["stage"] == "ROLLBACK":
        version, parent = int(own["parent_version"]), int(own["model_version"])
    else:
        version, parent = int(own["model_version"]), int(own["parent_version"] or 0)
    return ReleaseLineage(
        model=model,
        version=version,
        parent_version=parent,
        trigger_id=trigger_id,
        trigger_reason=trigger["reason"] if trigger is not None else None,
        offset_ranges=ranges,
        training_run=reason.get("training_run"),
        manifest_sha256=own["manifest_sha256"],
        artifact_url=own["artifact_url"],
        steps=steps,
    )


async def read_lineage(
    bootstrap: str,
    registry_url: str,
    *,
    model: str,
    timeout_s: float = 15.0,
    releases_topic: str = RELEASES,
    triggers_topic: str = TRIGGERS,
) -> list[ReleaseLineage]:
    """Read both topics and build every release's lineage for `model`.

    Args:
        bootstrap: the Kafka bootstrap servers.
        registry_url: the schema registry.
        model: the model name (e.g. `digits-student`).
        timeout_s: the longest wait for one fetch of a topic.
        releases_topic: where the ModelReleases are (default `ml.model-releases.v1`).
        triggers_topic: where the TrainingTriggers are (default `ml.training-triggers.v1`).

    Returns:
        One entry per version (and per refused trigger), oldest first.

    Records that do not decode (foreign bytes on the topic) are skipped.

    Raises:
        KafkaError: the broker is unreachable.
    """
    async with RegistryClient(registry_url) as registry:
        book = SchemaBook(registry, DecodeLimits())
        releases = await read_topic(bootstrap, book, releases_topic, timeout_s=timeout_s)
        triggers = await read_topic(bootstrap, book, triggers_topic, timeout_s=timeout_s)
    return build_lineage(releases, triggers, model=model)
