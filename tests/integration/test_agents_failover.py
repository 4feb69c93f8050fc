"""Two workers split the partitions; one is SIGKILLed mid-stream: the other takes over its
partitions and its table state (from the changelogs), and no verdict, hard example or
enriched event is lost. Duplicates may appear (at-least-once) and carry the same ids.

In the rebalance after the kill faust-streaming can skip a run of a partition's records
(docs/architecture.md, "Skipped runs: the offset ledger"); the workers' logs then say
`source offsets skipped by Faust; reading them directly`. On a failure the message says
where the unanswered requests sit: their partition and offsets, the group's commit and
the partition's end."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from edgeloop.infra.testing import InfraEndpoints
from edgeloop.tasks.digits import load_raw
from tests.integration.agents_support import (
    AgentsProcess,
    produce_raw,
    read_topic,
    start_at_end,
    where_lost,
    workers,
)
from tests.integration.bridge_support import prepare
from tests.integration.test_agents_worker import framer, worker_env
from tests.integration.test_edge_daemon import EdgeModels, edge_models
from tests.unit.agents_support import inference, offload

pytestmark = pytest.mark.integration
__all__ = ["edge_models", "workers"]

DEVICES, PER_DEVICE, CHUNKS = 12, 40, 8


async def settled(*workers: AgentsProcess, quiet_s: float = 12.0, timeout_s: float = 90.0) -> None:
    """Wait until the workers' group stopped rebalancing: no new partition assignment in
    any worker's log for `quiet_s` (Faust logs one per generation)."""

    def assignments() -> int:
        return sum(
            w.log.read_text(errors="replace").count("Executing _on_partitions_assigned")
            for w in workers
        )

    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        seen, since = assignments(), loop.time()
        while loop.time() - since < quiet_s:
            await asyncio.sleep(1.0)
            if (now := assignments()) != seen:
                seen, since = now, loop.time()


async def test_a_killed_worker_loses_nothing(
    infra_stack: InfraEndpoints,
    edge_models: EdgeModels,
    workers: list[AgentsProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    assert infra_stack.registry is not None
    bootstrap, reg = infra_stack.kafka.bootstrap, infra_stack.registry.url
    prefix = f"af{infra_stack.kafka.flavor[:1]}"
    frame = await framer(infra_stack)
    env = worker_env(edge_models)
    first = AgentsProcess(infra_stack.home, f"agents-{prefix}", tmp_path / "a.log", **env)
    second = AgentsProcess(infra_stack.home, f"agents-{prefix}", tmp_path / "b.log", **env)
    workers.extend([first, second])
    await start_at_end(infra_stack.kafka.bootstrap, f"agents-{prefix}")
    first.start()
    second.start()
    await asyncio.gather(first.ready(), second.ready())
    # Two workers started together join in two generations: kill mid-stream, not mid-
    # rebalance. A member SIGKILLed while the group was rebalancing stayed in Tansu's group
    # for minutes (a CI run: the survivor saw no rebalance for 3.5 min after the kill,
    # with a 10 s session timeout), a broker fault outside what this test checks.
    await settled(first, second)

    devices = [f"{prefix}-{i:02d}" for i in range(DEVICES)]
    images, _ = load_raw()
    requests = [
        offload(d, s, pixels=images[(i * PER_DEVICE + s) % len(images)])
        for i, d in enumerate(devices)
        for s in range(1, PER_DEVICE + 1)
    ]
    chunk = len(requests) // CHUNKS

    async def feed() -> None:
        for c in range(CHUNKS):
            part = requests[c * chunk : (c + 1) * chunk]
            await produce_raw(
                bootstrap, "edge.offload.v1",
                [(r["device_id"].encode(), frame("OffloadRequest", r)) for r in part],
            )  # fmt: skip
            await produce_raw(
                bootstrap, "edge.inference.v1",
                [(r["device_id"].encode(), frame("InferenceEvent", inference(r["device_id"],
                  r["seq"]))) for r in part],
            )  # fmt: skip
            await asyncio.sleep(0.5)

    feeding = asyncio.create_task(feed())
    # Kill one worker once it is mid-stream (some verdicts are out, more are coming).
    await read_topic(
        bootstrap, reg, "cloud.verdicts.v1", key_prefix=prefix,
        done=lambda r: len(r.records) >= len(requests) // 4, timeout_s=120,
    )  # fmt: skip
    first.kill()
    await feeding

    expected = {r["event_id"] for r in requests}
    verdicts = await read_topic(
        bootstrap, reg, "cloud.verdicts.v1", key_prefix=prefix,
        done=lambda r: {v["request_event_id"] for v in r.records} >= expected, timeout_s=240,
    )  # fmt: skip
    answered = {v["request_event_id"] for v in verdicts.records}
    dead = await read_topic(
        bootstrap, reg, "edge.offload.dlq.v1", key_prefix=prefix, done=lambda r: False,
        timeout_s=3,
    )  # fmt: skip
    diag: dict[str, object] = {"dead": Counter(d["reason"] for d in dead.records)}
    diag |= {
        m: second.metric(f"edgeloop_agents_{m}", stage="verdicts")
        for m in ("events_in_total", "dedupe_hits_total", "dlq_total", "events_out_total")
    }
    if answered != expected:
        offloads = await read_topic(
            bootstrap, reg, "edge.offload.v1", key_prefix=prefix, done=lambda r: False,
            timeout_s=5,
        )  # fmt: skip
        diag["where"] = await where_lost(
            bootstrap, f"agents-{prefix}", offloads, expected - answered, "edge.offload.v1"
        )
    assert answered == expected, (
        f"{len(expected - answered)} requests never answered, e.g. "
        f"{sorted(expected - answered)[:3]}; survivor: {diag}; logs in {tmp_path}"
    )
    # A duplicate is a redelivery: the same id, so downstream dedupe removes it.
    by_request = {v["request_event_id"]: v["event_id"] for v in verdicts.records}
    assert len(set(verdicts.ids())) == len(by_request)

    hard = await read_topic(
        bootstrap, reg, "ml.hard-examples.v1", key_prefix=prefix,
        done=lambda r: {h["source_event_id"] for h in r.records} >= expected, timeout_s=120,
    )  # fmt: skip
    assert {h["source_event_id"] for h in hard.records} == expected
    assert len(set(hard.ids())) == len(expected)

    enriched = await read_topic(
        bootstrap, reg, "edge.inference.enriched.v1", key_prefix=prefix,
        done=lambda r: set(r.ids()) >= expected, timeout_s=120, settle_s=3,
    )  # fmt: skip
    assert set(enriched.ids()) == expected

    # The survivor now owns every partition, with the dead worker's dedupe state: the
    # first chunk again (processed and committed long ago) yields nothing new.
    before = Counter(enriched.ids())
    replay = requests[:chunk]
    await produce_raw(
        bootstrap, "edge.inference.v1",
        [(r["device_id"].encode(), frame("InferenceEvent", inference(r["device_id"], r["seq"])))
         for r in replay],
    )  # fmt: skip
    marker = inference(devices[0], PER_DEVICE + 1)
    await produce_raw(
        bootstrap, "edge.inference.v1", [(devices[0].encode(), frame("InferenceEvent", marker))]
    )
    after = await read_topic(
        bootstrap, reg, "edge.inference.enriched.v1", key_prefix=prefix,
        done=lambda r: marker["event_id"] in r.ids(), timeout_s=120, settle_s=3,
    )  # fmt: skip
    counts = Counter(after.ids())
    assert {e: counts[e] - before[e] for e in (r["event_id"] for r in replay)} == dict.fromkeys(
        (r["event_id"] for r in replay), 0
    ), "the survivor re-enriched events the dead worker had deduped"
    assert second.proc is not None and second.proc.poll() is None
