"""Each release's lineage, read back from Kafka: trigger -> offset ranges -> training run
-> artifact -> the cohorts and waves it went to.

Sources: `ml.model-releases.v1` (every step: the trainer's CANARY or REFUSED, the judge's
WAVE / FULL / ROLLBACK, an operator's FULL) and `ml.training-triggers.v1` (why a retrain
ran and on which hard examples). Both are read from their beginning to their end
(`edgeloop.schemas.topic_reader.read_topic`: a group-less consumer, nothing committed),
and decoded from the Confluent wire format with the schemas the registry names. Records
that do not decode are skipped and counted; a topic not read to its end in time makes the
lineage `complete=False`, which the report shows rather than a silently partial story.

A step belongs to the version it is about: a ROLLBACK names the version it reinstalls in
`model_version` and the rolled-back candidate in `parent_version`, so it is filed under
the candidate. A REFUSED record names the serving version (the compacted topic's newest
record per cohort must stay a valid instruction); it is filed as its own entry, under the
trigger that was refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgeloop.agents.codec import SchemaBook
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topic_reader import read_topic

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


@dataclass(frozen=True)
class Lineage:
    """Every release's lineage, and how the read went."""

    entries: list[ReleaseLineage]
    complete: bool  # both topics read to their end before the deadline
    undecodable: int  # records skipped on both topics: they do not decode

    def summary(self) -> dict[str, Any]:
        """How the read went, for the report: `complete` and `undecodable_skipped`."""
        return {"complete": self.complete, "undecodable_skipped": self.undecodable}


def _reason(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # an operator's free text


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
    timeout_s: float = 60.0,
    releases_topic: str = RELEASES,
    triggers_topic: str = TRIGGERS,
) -> Lineage:
    """Read both topics and build every release's lineage for `model`.

    Args:
        bootstrap: the Kafka bootstrap servers.
        registry_url: the schema registry.
        model: the model name (e.g. `digits-student`).
        timeout_s: the longest the read of one topic may take (a ceiling: a read that
            reaches the end returns at once).
        releases_topic: where the ModelReleases are (default `ml.model-releases.v1`).
        triggers_topic: where the TrainingTriggers are (default `ml.training-triggers.v1`).

    Returns:
        One entry per version (and per refused trigger), oldest first; `complete` is
        False when a topic was not read to its end in time (the entries are then built
        from what was read).

    Records that do not decode (foreign bytes on the topic) are skipped and counted.

    Raises:
        RegistryUnavailableError / retriable RegistryError: the registry cannot be reached.
        KafkaError: the broker is unreachable.
    """
    async with RegistryClient(registry_url) as registry:
        book = SchemaBook(registry, DecodeLimits())
        releases = await read_topic(bootstrap, releases_topic, book.read, timeout_s=timeout_s)
        triggers = await read_topic(bootstrap, triggers_topic, book.read, timeout_s=timeout_s)
    return Lineage(
        entries=build_lineage(releases.records, triggers.records, model=model),
        complete=releases.complete and triggers.complete,
        undecodable=releases.undecodable + triggers.undecodable,
    )
