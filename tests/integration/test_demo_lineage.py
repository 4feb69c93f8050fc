"""The demo report's lineage, read back from Kafka: a trigger and the steps of its release
(published as `train serve` and the judge publish them) become one entry per version."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from edgeloop.demo.lineage import read_lineage
from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.trainer.release_events import EventPublisher, ReleaseFacts, release_record

pytestmark = pytest.mark.integration

SHA_V2 = "ab" * 32


def step(model: str, version: int, parent: int, stage: str, **kw: Any) -> dict[str, Any]:
    """A judge's (or an operator's) step, shaped as the judge writes it."""
    rec: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "ts": 1_700_000_000_000_000 + version * 1000 + len(stage),
        "model_name": model,
        "model_version": version,
        "cohort": "drifted",
        "stage": stage,
        "wave": 0,
        "artifact_url": f"http://artifacts/{model}/{version}/",
        "manifest_sha256": f"{version:02d}" * 32,
        "target": "pi5-cpu",
        "parent_version": parent,
        "reason": json.dumps({"step": stage.lower(), "verdict": "PASS"}),
        "share": 1.0,
    }
    rec.update(kw)
    return rec


async def test_trigger_canary_wave_full_and_a_rollback_read_back_as_lineage(
    kafka_broker: KafkaBroker, registry: RegistryProcess
) -> None:
    uid = uuid.uuid4().hex[:10]
    releases, triggers = f"t{uid}.ml.model-releases.v1", f"t{uid}.ml.training-triggers.v1"
    model = f"digits-student-{uid}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(releases, 1, 1), NewTopic(triggers, 2, 1)])
    finally:
        await admin.close()
    trigger_id = f"trig-{uid}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    await producer.start()
    try:
        async with RegistryClient(registry.url) as client:
            pub = EventPublisher(producer, client)
            await pub.publish(triggers, "TrainingTrigger", model, {
                "event_id": str(uuid.uuid4()), "ts": 1_700_000_000_000_000,
                "trigger_id": trigger_id, "model_name": model, "base_model_version": 1,
                "reason": "DRIFT",
                "ranges": [{"topic": "ml.hard-examples.v1", "partition": 0,
                            "start_offset": 10, "end_offset": 60}],
                "hard_example_count": 50, "detail": "psi 0.4",
            })  # fmt: skip
            await pub.publish(releases, "ModelRelease", "drifted", step(model, 1, 0, "FULL"))
            facts = ReleaseFacts(
                trigger_id=trigger_id, model_name=model, model_version=2, parent_version=1,
                artifact_url=f"http://artifacts/{model}/2/", manifest_sha256=SHA_V2,
                target="pi5-cpu", hard_examples=50,
                offset_ranges={"ml.hard-examples.v1/0": [10, 59]},
                scores={"candidate": {"clean": 0.97, "drifted": 0.9}}, refused=(),
            )  # fmt: skip
            await pub.publish(releases, "ModelRelease", "drifted",
                              release_record(facts, "drifted", 0.05))  # fmt: skip
            await pub.publish(releases, "ModelRelease", "drifted",
                              step(model, 2, 1, "WAVE", wave=1, share=0.25,
                                   manifest_sha256=SHA_V2))  # fmt: skip
            await pub.publish(releases, "ModelRelease", "drifted",
                              step(model, 2, 1, "FULL", manifest_sha256=SHA_V2))  # fmt: skip
            # A bad v3 (an operator's release) rolled back to v2 by the judge.
            await pub.publish(releases, "ModelRelease", "drifted",
                              step(model, 3, 2, "CANARY", share=0.05,
                                   reason="operator override: demo bad release"))  # fmt: skip
            await pub.publish(releases, "ModelRelease", "drifted",
                              step(model, 2, 3, "ROLLBACK"))  # fmt: skip
            # Another model's release on the same topic is not this model's lineage.
            await pub.publish(releases, "ModelRelease", "x", step("other", 9, 8, "FULL"))
    finally:
        await producer.stop()

    read = await read_lineage(
        kafka_broker.bootstrap, registry.url, model=model,
        releases_topic=releases, triggers_topic=triggers,
    )  # fmt: skip
    assert read.complete and read.undecodable == 0
    got = read.entries
    assert [(e.version, e.parent_version) for e in got] == [(1, 0), (2, 1), (3, 2)]
    v1, v2, v3 = got
    assert v1.trigger_id is None and [s["stage"] for s in v1.steps] == ["FULL"]
    assert v2.trigger_id == trigger_id
    assert v2.trigger_reason == "DRIFT"
    assert v2.offset_ranges == {"ml.hard-examples.v1/0": [10, 59]}
    assert v2.manifest_sha256 == SHA_V2
    assert v2.artifact_url == f"http://artifacts/{model}/2/"
    assert [(s["stage"], s["wave"], s["share"]) for s in v2.steps] == [
        ("CANARY", 0, 0.05),
        ("WAVE", 1, 0.25),
        ("FULL", 0, 1.0),
    ]
    assert v2.steps[0]["reason"]["hard_examples"] == 50  # the reason JSON, parsed
    # The rollback is filed under the candidate it rolled back, and the free-text reason
    # of the operator's release is kept as text.
    assert [s["stage"] for s in v3.steps] == ["CANARY", "ROLLBACK"]
    assert v3.steps[0]["reason"] == "operator override: demo bad release"
    assert v3.manifest_sha256 == "03" * 32  # its own artifact, not the parent's
