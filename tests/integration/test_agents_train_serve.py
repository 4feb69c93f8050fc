"""The hard examples the agents write are what `train serve` consumes: a TrainingTrigger
naming their offset ranges is trained on and released (a CANARY ModelRelease)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from edgeloop.core.settings import KafkaSettings
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import dlq_topic, subject_for
from edgeloop.tasks.digits import load_raw
from edgeloop.trainer.home import TrainerHome
from edgeloop.trainer.serve_settings import TrainerServeSettings
from edgeloop.trainer.trigger_consumer import TriggerConsumer
from tests.integration.agents_support import (
    AgentsProcess,
    produce_raw,
    read_topic,
    start_at_end,
    workers,
)
from tests.integration.bridge_support import prepare
from tests.integration.test_agents_worker import framer, worker_env
from tests.integration.test_edge_daemon import EdgeModels, edge_models
from tests.unit.agents_support import offload

pytestmark = pytest.mark.integration
__all__ = ["edge_models", "workers"]


async def test_train_serve_trains_on_the_agents_hard_examples(
    infra_stack: InfraEndpoints,
    edge_models: EdgeModels,
    workers: list[AgentsProcess],
    tmp_path: Path,
) -> None:
    # On Tansu 0.6 this is also the regression test for its end offsets: it reports a log
    # end offset (55 measured) below offsets it serves (0..79) once a partition holds
    # multi-record batches, which the agents' producer writes; `train serve` refused the
    # range as range_unavailable until the read, not the reported end, decided.
    await prepare(infra_stack)
    assert infra_stack.registry is not None
    bootstrap, reg = infra_stack.kafka.bootstrap, infra_stack.registry.url
    prefix = f"ats{infra_stack.kafka.flavor[:1]}"
    frame = await framer(infra_stack)
    worker = AgentsProcess(infra_stack.home, f"agents-{prefix}", tmp_path / "w.log",
                           **worker_env(edge_models))  # fmt: skip
    workers.append(worker)
    await start_at_end(infra_stack.kafka.bootstrap, f"agents-{prefix}")
    worker.start()
    await worker.ready()
    images, _ = load_raw()
    requests = [offload(f"{prefix}-{d}", s, pixels=images[d * 40 + s]) for d in range(3)
                for s in range(1, 41)]  # fmt: skip
    await produce_raw(
        bootstrap, "edge.offload.v1",
        [(r["device_id"].encode(), frame("OffloadRequest", r)) for r in requests],
    )  # fmt: skip
    hard = await read_topic(
        bootstrap, reg, "ml.hard-examples.v1", key_prefix=prefix,
        done=lambda r: len(r.records) >= len(requests), timeout_s=120,
    )  # fmt: skip
    assert len(hard.records) == len(requests)
    spans: dict[int, list[int]] = {}
    for partition, offset in hard.positions:
        lo, hi = spans.get(partition, [offset, offset])
        spans[partition] = [min(lo, offset), max(hi, offset)]
    ranges = [
        {"topic": "ml.hard-examples.v1", "partition": p, "start_offset": lo, "end_offset": hi + 1}
        for p, (lo, hi) in sorted(spans.items())
    ]

    uid = uuid.uuid4().hex[:8]
    triggers, releases = f"t{uid}.ml.training-triggers.v1", f"t{uid}.ml.model-releases.v1"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, 1, 1) for t in (triggers, dlq_topic(triggers), releases)]
        )
    finally:
        await admin.close()
    home = tmp_path / "trainer"
    shutil.copytree(edge_models.store.parent, home)
    codec = ConfluentCodec()
    async with RegistryClient(reg) as registry:
        schema = catalog.get("TrainingTrigger")
        trigger_id = await registry.register(subject_for(triggers), schema.text)
        trigger = {
            "event_id": str(uuid.uuid4()), "ts": 1_700_000_000_000_000, "trigger_id": f"T{uid}",
            "model_name": "digits-student", "base_model_version": 1, "reason": "COUNT",
            "ranges": ranges, "hard_example_count": sum(r["end_offset"] - r["start_offset"]
                                                         for r in ranges),
            "detail": "hard examples written by the agents",
        }  # fmt: skip
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            value = codec.encode(trigger_id, schema, trigger)
            await producer.send_and_wait(triggers, value, key=b"digits-student")
        finally:
            await producer.stop()
        settings = TrainerServeSettings(
            home=home, keys_dir=edge_models.keys, triggers_topic=triggers,
            releases_topic=releases, group_id=f"trainer-{uid}", client_id=f"trainer-{uid}",
            epochs=2, threads=1, gate_min_drift_gain=-1.0, gate_max_clean_drop=1.0,
            training_timeout_s=600,
        )  # fmt: skip
        consumer = TriggerConsumer(
            settings, KafkaSettings(bootstrap=bootstrap), registry, home=TrainerHome(home),
            keys_dir=edge_models.keys,
        )  # fmt: skip
        task = asyncio.create_task(consumer.run())
        try:
            release = await _first_outcome(
                bootstrap, [releases, dlq_topic(triggers)], registry, codec
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert release.get("stage") == "CANARY", (
        f"trigger dead-lettered: {release.get('reason')} {release.get('detail')}"
    )
    assert release["model_name"] == "digits-student"
    assert release["model_version"] == 2


async def _first_outcome(
    bootstrap: str, topics: list[str], registry: RegistryClient, codec: ConfluentCodec
) -> dict[str, Any]:
    """The first ModelRelease or trigger DeadLetter the consumer writes."""
    watcher = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await watcher.start()
    try:
        tps = [TopicPartition(topic, 0) for topic in topics]
        watcher.assign(tps)
        await watcher.seek_to_beginning(*tps)
        async with asyncio.timeout(600):
            while True:
                for msgs in (await watcher.getmany(timeout_ms=500)).values():
                    for msg in msgs:
                        assert msg.value is not None
                        schema_id = codec.schema_id(msg.value)
                        if not codec.knows(schema_id):
                            text = await registry.schema(schema_id)
                            codec.add(schema_id, EventSchema.from_text(text))
                        return codec.decode(msg.value)[2]
    finally:
        await watcher.stop()
