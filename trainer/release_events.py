"""The trainer's outgoing events: `ModelRelease` and `DeadLetter`, Confluent-framed.

The trainer owns these producers, so it registers the value schema under the topic's
subject itself (`<topic>-value`, as Confluent serializers do with auto-registration): the
registry answers with the existing id when the schema is already there, and refuses an
incompatible one, which then stops the trainer with the registry's message.

Release event ids are derived from the trigger id (UUID5), so a release that is published
again after a crash carries the same `event_id` and is removed downstream as a duplicate.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from edgeloop.artifacts.manifest import MANIFEST_NAME, Manifest, sha256_file
from edgeloop.schemas import catalog
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import subject_for
from edgeloop.trainer.home import TrainerHome

_RELEASE_NS = uuid.UUID("6f1d7d0e-3f7a-4c35-9a55-6a0b5f3a9d01")
STAGE = "trainer-trigger-consumer"


def release_event_id(trigger_id: str) -> str:
    return str(uuid.uuid5(_RELEASE_NS, f"release:{trigger_id}"))


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class ReleaseFacts:
    """What the trainer knows about one retrain's outcome, ready to become an event."""

    trigger_id: str
    model_name: str
    model_version: int  # the new version, or the serving one when the gate refused
    parent_version: int
    artifact_url: str
    manifest_sha256: str
    target: str
    hard_examples: int
    offset_ranges: dict[str, list[int]]
    scores: dict[str, Any]
    refused: tuple[str, ...]
    training_run: str | None = None  # the retrain's run dir (where its report and log are)

    @property
    def released(self) -> bool:
        return not self.refused


def release_record(facts: ReleaseFacts, cohort: str, share: float) -> dict[str, Any]:
    """A canary `ModelRelease`, or a REFUSED one when the gate said no.

    The CANARY carries `share`, the rollout judge's canary share: only the devices whose
    `membership_score` is below it install the candidate, the others stay on the parent
    and are the judge's control arm. Without it (the schema's default 1.0) every device
    of the cohort would install the candidate at once: no control arm to judge it against,
    and a bad release would reach the whole cohort before any evidence.

    A refusal names the serving (parent) version and its artifact: the topic is compacted
    by cohort, so its latest record per cohort must stay a valid "run this" instruction; a
    device never applies a version that is not newer than its own, so it changes nothing.
    `reason` is JSON: a person reads it and a tool parses it (trigger id, sample count,
    the ranges trained on, holdout scores, the gate's reasons).

    Args:
        facts: the retrain's outcome.
        cohort: the cohort the release goes to first (the record's key).
        share: the canary share (`TrainerServeSettings.canary_share`, the judge's).

    Returns:
        The ModelRelease record, Avro-shaped.
    """
    reason = {
        "trigger_id": facts.trigger_id,
        "gate": "refused" if facts.refused else "passed",
        "hard_examples": facts.hard_examples,
        "offset_ranges": facts.offset_ranges,
        "scores": facts.scores,
        "refused": list(facts.refused),
    }
    if facts.training_run is not None:
        reason["training_run"] = facts.training_run
    return {
        "event_id": release_event_id(facts.trigger_id),
        "ts": now_us(),
        "model_name": facts.model_name,
        "model_version": facts.model_version,
        "cohort": cohort,
        "stage": "REFUSED" if facts.refused else "CANARY",
        "wave": 0,
        "artifact_url": facts.artifact_url,
        "manifest_sha256": facts.manifest_sha256,
        "target": facts.target,
        "parent_version": facts.parent_version,
        "reason": json.dumps(reason, sort_keys=True, separators=(",", ":")),
        # A REFUSED record installs nothing; 1.0 is the schema's "every device" default.
        "share": 1.0 if facts.refused else share,
    }


def artifact_location(
    home: TrainerHome, model: str, version: int, base_url: str | None
) -> tuple[str, str, str]:
    """Where devices download a stored version, and what its release record names.

    Args:
        home: the trainer home; the version lives in `<home>/store/<model>/<version>/`.
        model: the model name.
        version: the stored version.
        base_url: where the store is served (`artifact_base_url`); None gives the folder's
            file:// URL (one host, tests).

    Returns:
        (artifact_url ending in "/", sha256 of the manifest file, the manifest's target).

    Raises:
        OSError: the version's manifest is not in the store.
        VerificationError: the manifest is not a valid edgeloop manifest.
    """
    folder = home.root / "store" / model / str(version)
    manifest_path = folder / MANIFEST_NAME
    manifest = Manifest.from_bytes(manifest_path.read_bytes())
    url = (
        f"{base_url.rstrip('/')}/{model}/{version}/"
        if base_url
        else folder.resolve().as_uri() + "/"
    )
    return url, sha256_file(manifest_path), manifest.target


def dead_letter_record(
    *, reason: str, detail: str, source: str, payload: bytes, cap: int, client_id: str
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "ts": now_us(),
        "stage": STAGE,
        "reason": reason,
        "detail": detail,
        "source": source,
        "client_id": client_id,
        "device_id": None,
        "payload": payload[:cap],
        "payload_size": len(payload),
        "truncated": len(payload) > cap,
    }


class EventPublisher:
    """Encodes with the registry's schema id and waits for Kafka's acknowledgement."""

    def __init__(self, producer: AIOKafkaProducer, registry: RegistryClient) -> None:
        self._producer = producer
        self._registry = registry
        self._codec = ConfluentCodec()
        self._ids: dict[str, int] = {}

    async def _schema_id(self, topic: str, schema: EventSchema) -> int:
        schema_id = self._ids.get(topic)
        if schema_id is None:
            schema_id = await self._registry.register(subject_for(topic), schema.text)
            self._ids[topic] = schema_id
        return schema_id

    async def publish(
        self,
        topic: str,
        event: str,
        key: str | None,
        record: dict[str, Any],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> RecordMetadata:
        """Returns once Kafka acknowledged the record (acks=all on the producer).

        Returns:
            Kafka's acknowledgement: the record's topic, partition and offset.
        """
        schema = catalog.get(event)
        value = self._codec.encode(await self._schema_id(topic, schema), schema, record)
        fut = await self._producer.send(
            topic, value, key=key.encode() if key is not None else None, headers=headers or []
        )
        metadata: RecordMetadata = await fut
        return metadata
