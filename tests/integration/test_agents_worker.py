"""The agents worker against a real broker and registry, fed straight into Kafka: every
event enriched exactly once (Kafka-level duplicates included), every request answered
once, hard examples in the trainer's form, each malformed class dead-lettered."""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edgeloop.agents.fleet import FleetClient, new_record
from edgeloop.core.settings import KafkaSettings
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import subject_for
from edgeloop.tasks.digits import load_raw
from edgeloop.trainer.hard_example_source import to_example_set
from tests.integration.agents_support import (
    AgentsProcess,
    listen_addresses,
    produce_raw,
    read_topic,
    start_at_end,
    workers,
)
from tests.integration.bridge_support import prepare
from tests.integration.test_edge_daemon import EdgeModels, edge_models
from tests.unit.agents_support import inference, offload

pytestmark = pytest.mark.integration
__all__ = ["edge_models", "workers"]


async def framer(stack: InfraEndpoints) -> Any:
    """name, record -> Confluent bytes under the topic's registered schema id."""
    assert stack.registry is not None
    codec = ConfluentCodec()
    ids = {}
    async with RegistryClient(stack.registry.url) as registry:
        for name, topic in (
            ("InferenceEvent", "edge.inference.v1"),
            ("OffloadRequest", "edge.offload.v1"),
            ("DeviceStatus", "edge.status.v1"),
        ):
            ids[name] = await registry.register(subject_for(topic), catalog.get(name).text)

    def frame(name: str, record: dict[str, Any]) -> bytes:
        return codec.encode(ids[name], catalog.get(name), record)

    return frame


def worker_env(models: EdgeModels, **extra: str) -> dict[str, str]:
    return {
        "EDGELOOP_AGENTS_STORE": str(models.store),
        "EDGELOOP_AGENTS_PUBLIC_KEY": str(models.pubkey),
        "EDGELOOP_AGENTS_NEAR_DUPLICATES": "false",
        **extra,
    }


async def test_worker_enriches_dedupes_answers_and_dead_letters(
    infra_stack: InfraEndpoints,
    edge_models: EdgeModels,
    workers: list[AgentsProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    assert infra_stack.registry is not None
    bootstrap, reg = infra_stack.kafka.bootstrap, infra_stack.registry.url
    prefix = f"aw{infra_stack.kafka.flavor[:1]}"
    frame = await framer(infra_stack)
    registered, by_status, unknown = f"{prefix}-reg", f"{prefix}-stat", f"{prefix}-new"
    async with RegistryClient(reg) as registry:
        await FleetClient(KafkaSettings(bootstrap=bootstrap), registry).write(
            new_record(registered, cohort="canary", site="lab-1")
        )
    status = {
        "event_id": f"{by_status}:0", "device_id": by_status, "seq": 0, "ts": 1,
        "state": "ONLINE", "cohort": "control", "model_version": 1, "threshold_version": 0,
        "outbox_depth": 0, "outbox_capacity": 10, "outbox_policy": "DROP_OLDEST",
        "outbox_dropped": 0, "frames_dropped": 0, "uptime_s": 1.0, "rtt_ms": None,
        "uplink_bytes_per_s": None, "last_error": None,
    }  # fmt: skip
    await produce_raw(
        bootstrap, "edge.status.v1", [(by_status.encode(), frame("DeviceStatus", status))]
    )

    worker = AgentsProcess(infra_stack.home, f"agents-{prefix}", tmp_path / "w1.log",
                           **worker_env(edge_models))  # fmt: skip
    workers.append(worker)
    await start_at_end(infra_stack.kafka.bootstrap, f"agents-{prefix}")
    worker.start()
    await worker.ready()
    # Its web server (/metrics) on loopback only, as EDGELOOP_AGENTS_WEB_HOST says; Faust
    # listened on every interface (its `web_bind`), whatever the setting.
    assert listen_addresses(worker.port) == {"127.0.0.1"}

    # Inference events, each sent twice (a producer retry, a bridge redelivery).
    per_device = 50
    events = [
        (d.encode(), frame("InferenceEvent", inference(d, s)))
        for d in (registered, by_status, unknown)
        for s in range(1, per_device + 1)
    ]
    images, _ = load_raw()
    requests = [
        offload(registered, s, pixels=images[s], reason="AUDIT" if s % 5 == 0 else "OFFLOAD")
        for s in range(1, 21)
    ]
    offloads = [(r["device_id"].encode(), frame("OffloadRequest", r)) for r in requests]
    good = frame("InferenceEvent", inference(unknown, 999))
    bomb = offload(registered, 100, data=zlib.compress(bytes(8 << 20)))
    malformed_inference = [
        (b"x", b"\x01" + good[1:]),  # bad_magic
        (b"x", b"\x00\x00\x00\x7f\xff" + good[5:]),  # unknown_schema_id
        (unknown.encode(), good[:-4]),  # truncated
        (b"someone-else", good),  # key_mismatch
        (unknown.encode(), frame("DeviceStatus", status)),  # wrong_schema
    ]
    unknown_encoding = offload(registered, 101, encoding="UNKNOWN")
    malformed_offload = [
        (registered.encode(), frame("OffloadRequest", bomb)),  # input_too_large
        (registered.encode(), frame("OffloadRequest", unknown_encoding)),  # bad_input_encoding
    ]
    await produce_raw(bootstrap, "edge.inference.v1", events + malformed_inference + events[:40])
    await produce_raw(bootstrap, "edge.offload.v1", offloads + malformed_offload + offloads[:5])

    expected = {
        f"{d}:{s}" for d in (registered, by_status, unknown) for s in range(1, per_device + 1)
    }
    enriched = await read_topic(
        bootstrap, reg, "edge.inference.enriched.v1", key_prefix=prefix,
        done=lambda r: set(r.ids()) >= expected, settle_s=3,
    )  # fmt: skip
    counts = Counter(enriched.ids())
    assert set(counts) == expected, f"missing {sorted(expected - set(counts))[:5]}"
    assert max(counts.values()) == 1, "a duplicate input was enriched twice"
    source = {r["device_id"]: r["enrichment"] for r in enriched.records}
    assert source == {registered: "FLEET", by_status: "STATUS", unknown: "NONE"}
    assert {r["site"] for r in enriched.records if r["device_id"] == registered} == {"lab-1"}

    verdicts = await read_topic(
        bootstrap, reg, "cloud.verdicts.v1", key_prefix=prefix,
        done=lambda r: len(set(r.ids())) >= len(requests), settle_s=3,
    )  # fmt: skip
    answered = Counter(v["request_event_id"] for v in verdicts.records)
    assert answered == Counter(r["event_id"] for r in requests)

    hard = await read_topic(
        bootstrap, reg, "ml.hard-examples.v1", key_prefix=prefix,
        done=lambda r: len(r.records) >= len(requests), timeout_s=30, settle_s=2,
    )  # fmt: skip
    # Every offload is below the router's confidence threshold: all are hard, once each.
    assert sorted(h["source_event_id"] for h in hard.records) == sorted(
        r["event_id"] for r in requests
    )
    audits = {r["event_id"] for r in requests if r["reason"] == "AUDIT"}
    assert {h["source_event_id"] for h in hard.records if "AUDIT" in h["reasons"]} == audits
    examples = to_example_set(hard.records, (1, 8, 8), num_classes=10)
    assert len(examples) == len(requests)

    dead = await read_topic(
        bootstrap, reg, "edge.inference.dlq.v1", key_prefix="",
        done=lambda r: sum(1 for d in r.records if d["stage"] == "agents-enrich"
                           and d["source"].startswith("kafka:")) >= 5, timeout_s=30,
    )  # fmt: skip
    ours = [d for d in dead.records if d["stage"] == "agents-enrich"]
    assert {d["reason"] for d in ours} >= {
        "bad_magic", "unknown_schema_id", "truncated", "key_mismatch", "wrong_schema"
    }  # fmt: skip
    dead_offload = await read_topic(
        bootstrap, reg, "edge.offload.dlq.v1", key_prefix=prefix,
        done=lambda r: len(r.records) >= 2, timeout_s=30,
    )  # fmt: skip
    assert sorted(d["reason"] for d in dead_offload.records) == [
        "bad_input_encoding", "input_too_large"
    ]  # fmt: skip
    # The worker counted what it did.
    assert worker.metric("edgeloop_agents_dedupe_hits_total", stage="enrich") >= 40
    assert worker.metric("edgeloop_agents_dlq_total", stage="enrich") >= 5
    assert worker.metric("edgeloop_agents_teacher_batch_size_count") >= 1
    assert worker.proc is not None and worker.proc.poll() is None
    # The log is plain text: Faust's start-up spinner wrote "\b\x1b[?25h" into a file.
    assert not set(worker.log.read_text()) & {"\x1b", "\b"}
