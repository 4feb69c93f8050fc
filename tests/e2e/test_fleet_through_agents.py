"""A simulated fleet (real model, mTLS, outboxes) through the bridge into the agents and
back: every InferenceEvent enriched exactly once, every OffloadRequest answered by exactly
one CloudVerdict that reaches its device over MQTT (the daemons count matched verdicts)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import pytest

from edgeloop.agents.fleet import FleetClient, new_record
from edgeloop.core.settings import KafkaSettings
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.settings import EdgeSettings
from edgeloop.edge.simulator import DriftSchedule, FleetPlan, FleetSimulator, replace_settings
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.tasks.digits import DigitsTask, load_raw
from tests.integration.agents_support import AgentsProcess, read_topic, start_at_end, workers
from tests.integration.bridge_support import BridgeProcess, prepare
from tests.integration.test_agents_worker import worker_env
from tests.integration.test_edge_daemon import EdgeModels, edge_models

pytestmark = pytest.mark.integration
__all__ = ["edge_models", "workers"]


async def test_fleet_offloads_get_exactly_one_verdict_over_mqtt(
    infra_stack: InfraEndpoints,
    edge_models: EdgeModels,
    bridges: list[BridgeProcess],
    workers: list[AgentsProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    assert infra_stack.registry is not None
    bootstrap, reg = infra_stack.kafka.bootstrap, infra_stack.registry.url
    prefix = f"ea{infra_stack.kafka.flavor[:1]}"
    devices, per_device = 4, 60
    names = [f"{prefix}-{i:04d}" for i in range(devices)]
    registered = set(names[:2])
    async with RegistryClient(reg) as registry:
        fleet = FleetClient(KafkaSettings(bootstrap=bootstrap), registry)
        for device in sorted(registered):
            await fleet.write(new_record(device, cohort="canary"))

    worker = AgentsProcess(infra_stack.home, f"agents-{prefix}", tmp_path / "agents.log",
                           **worker_env(edge_models))  # fmt: skip
    workers.append(worker)
    await start_at_end(infra_stack.kafka.bootstrap, f"agents-{prefix}")
    worker.start()
    bridge = BridgeProcess(
        infra_stack.home, f"bridge-{prefix}", tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix, EDGELOOP_BRIDGE_DOWNLINK_GROUP=f"{prefix}-down",
    )  # fmt: skip
    bridge.downlink = True
    bridges.append(bridge)
    bridge.start()
    await asyncio.gather(worker.ready(), bridge.subscribed())

    plan = FleetPlan(
        devices=devices, prefix=prefix, cohorts=("canary", "control"), rate_hz=20.0,
        schedule=DriftSchedule.parse(["canary:0.0=0.9"]), events_per_device=per_device,
    )  # fmt: skip
    base = EdgeSettings(
        device_id=f"{prefix}-base", state_dir=tmp_path / "fleet", audit_rate=0.1,
        initial_model=edge_models.student_v1, pubkey=edge_models.pubkey, reconnect_max_s=1.0,
        status_interval_s=1.0,
    )  # fmt: skip
    images, labels = load_raw()
    mosquitto = infra_stack.mosquitto
    sim = FleetSimulator(
        plan, base, host=mosquitto.host, port=mosquitto.tls_port,
        tls_for=lambda d: mosquitto.device_credentials(d).ssl_context(),
        images=images, task=DigitsTask(), labels=labels, metrics=EdgeMetrics(),
    )  # fmt: skip
    for daemon in sim.daemons:  # stay connected after the last event: verdicts are coming
        daemon.settings = replace_settings(daemon.settings, exit_when_drained=False)
    running = asyncio.create_task(sim.run())
    try:
        async with asyncio.timeout(180):
            while not (  # noqa: ASYNC110 - the simulator's counters have no event
                sim.totals()["frames"] == devices * per_device and sim.totals()["outbox_depth"] == 0
            ):
                await asyncio.sleep(0.2)
        offloads = await read_topic(
            bootstrap, reg, "edge.offload.v1", key_prefix=prefix, done=lambda r: False,
            timeout_s=5,
        )  # fmt: skip
        requests = set(offloads.ids())
        assert requests, "the drifting cohort offloaded nothing"

        def matched() -> int:
            return sum(d.verdicts.agree + d.verdicts.disagree for d in sim.daemons if d.verdicts)

        async with asyncio.timeout(120):
            while matched() < len(requests):  # noqa: ASYNC110 - the daemons' counters
                await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # a late duplicate verdict would show as unmatched
        assert matched() == len(requests)
        assert sum(d.verdicts.unmatched for d in sim.daemons if d.verdicts) == 0
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    verdicts = await read_topic(
        bootstrap, reg, "cloud.verdicts.v1", key_prefix=prefix,
        done=lambda r: len(r.records) >= len(requests), timeout_s=30, settle_s=2,
    )  # fmt: skip
    assert Counter(v["request_event_id"] for v in verdicts.records) == Counter(requests)

    # What the devices emitted (device seqs are shared with offloads and statuses).
    emitted = await read_topic(
        bootstrap, reg, "edge.inference.v1", key_prefix=prefix, done=lambda r: False,
        timeout_s=5,
    )  # fmt: skip
    expected = set(emitted.ids())
    assert len(expected) == devices * per_device
    enriched = await read_topic(
        bootstrap, reg, "edge.inference.enriched.v1", key_prefix=prefix,
        done=lambda r: set(r.ids()) >= expected, timeout_s=60, settle_s=2,
    )  # fmt: skip
    counts = Counter(enriched.ids())
    assert set(counts) == expected
    assert max(counts.values()) == 1, "an event was enriched twice"
    for rec in enriched.records:
        if rec["device_id"] in registered:
            assert rec["enrichment"] == "FLEET"
        else:  # unregistered: enriched from its status (or nothing yet), flagged
            assert rec["enrichment"] in ("STATUS", "NONE")
