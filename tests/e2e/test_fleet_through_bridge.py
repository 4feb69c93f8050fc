"""A simulated fleet (real ONNX model, mTLS, outboxes) through the real bridge into
Kafka: what the devices emit is what the cloud receives, nothing rejected, nothing lost."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest

from edgeloop.bench.fleet_load import collect
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.settings import EdgeSettings
from edgeloop.edge.simulator import DriftSchedule, FleetPlan, FleetSimulator
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.tasks.digits import DigitsTask, load_raw
from tests.integration.bridge_support import BridgeProcess, prepare
from tests.integration.test_edge_daemon import EdgeModels, edge_models

pytestmark = pytest.mark.integration
__all__ = ["edge_models"]


async def test_fleet_events_reach_kafka_through_the_bridge(
    infra_stack: InfraEndpoints,
    edge_models: EdgeModels,
    bridges: list[BridgeProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    prefix = f"e2e{infra_stack.kafka.flavor[:1]}"
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()

    devices, per_device = 6, 100
    plan = FleetPlan(
        devices=devices, prefix=prefix, cohorts=("canary", "control"), rate_hz=50.0,
        # Heavy drift on the canary cohort: its devices become unsure and offload.
        schedule=DriftSchedule.parse(["canary:0.0=0.9"]), events_per_device=per_device,
    )  # fmt: skip
    base = EdgeSettings(
        device_id=f"{prefix}-base", state_dir=tmp_path / "fleet",
        initial_model=edge_models.student_v1, pubkey=edge_models.pubkey, reconnect_max_s=1.0,
    )  # fmt: skip
    images, labels = load_raw()
    mosquitto = infra_stack.mosquitto
    sim = FleetSimulator(
        plan, base, host=mosquitto.host, port=mosquitto.tls_port,
        tls_for=lambda d: mosquitto.device_credentials(d).ssl_context(),
        images=images, task=DigitsTask(), labels=labels, metrics=EdgeMetrics(),
    )  # fmt: skip
    async with asyncio.timeout(180):
        await sim.run()
    assert sim.totals()["outbox_depth"] == 0  # every device saw every PUBACK

    bootstrap = infra_stack.kafka.bootstrap
    inference = await collect(
        bootstrap, "edge.inference.v1", devices * per_device, key_prefix=f"{prefix}-", timeout_s=120
    )
    seqs: dict[str, set[int]] = defaultdict(set)
    for event_id, key in zip(inference.event_ids, inference.keys, strict=True):
        device, seq = event_id.rsplit(":", 1)
        assert device == key
        seqs[device].add(int(seq))
    assert sorted(seqs) == [f"{prefix}-{i:04d}" for i in range(devices)]
    assert all(len(s) == per_device for s in seqs.values())

    offloads = await collect(
        bootstrap, "edge.offload.v1", 1, key_prefix=f"{prefix}-", timeout_s=30, idle_s=10
    )
    assert offloads.event_ids, "the drifting cohort offloaded nothing"
    assert all(e.split(":")[0] == k for e, k in zip(offloads.event_ids, offloads.keys, strict=True))
    rejected = await collect(
        bootstrap, "edge.inference.dlq.v1", 1, key_prefix=f"{prefix}-", timeout_s=5, idle_s=5
    )
    assert rejected.event_ids == [], "the bridge rejected device events"
