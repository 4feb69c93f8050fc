"""The control plane in `edgeloop agents` with a simulated fleet (real model, mTLS, the
bridge both ways): the worker's threshold updates reach every device of their cohort over
MQTT, and the devices report applying them (DeviceStatus `threshold_version`)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

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

# Short windows keep the test short: 2 s windows, 1 s lateness, ticks every 0.5 s.
CONTROL_ENV = {
    "EDGELOOP_CONTROL_SIGNALS__WINDOW_S": "2",
    "EDGELOOP_CONTROL_SIGNALS__ALLOWED_LATENESS_S": "1",
    "EDGELOOP_CONTROL_WIRING__TICK_S": "0.5",
    # Far below what the fleet offloads at the factory tau: the budget forces tau down.
    "EDGELOOP_CONTROL_THRESHOLD__CLOUD_CAPACITY_PER_S": "2",
}


def control_env(**extra: str) -> dict[str, str]:
    return {**CONTROL_ENV, **extra}


async def test_threshold_updates_reach_every_device_of_their_cohort(
    infra_stack: InfraEndpoints,
    edge_models: EdgeModels,
    bridges: list[BridgeProcess],
    workers: list[AgentsProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    assert infra_stack.registry is not None
    bootstrap, reg = infra_stack.kafka.bootstrap, infra_stack.registry.url
    prefix = f"ct{infra_stack.kafka.flavor[:1]}"
    devices = 4
    cohorts = (f"{prefix}-north", f"{prefix}-south")
    names = [f"{prefix}-{i:04d}" for i in range(devices)]
    cohort_of = {d: cohorts[i % len(cohorts)] for i, d in enumerate(names)}
    async with RegistryClient(reg) as registry:
        fleet = FleetClient(KafkaSettings(bootstrap=bootstrap), registry)
        for device, cohort in cohort_of.items():
            await fleet.write(new_record(device, cohort=cohort))

    worker = AgentsProcess(infra_stack.home, f"agents-{prefix}", tmp_path / "agents.log",
                           **worker_env(edge_models, **control_env()))  # fmt: skip
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
        devices=devices, prefix=prefix, cohorts=cohorts, rate_hz=20.0,
        schedule=DriftSchedule.parse([]), events_per_device=100_000,
    )  # fmt: skip
    base = EdgeSettings(
        device_id=f"{prefix}-base", state_dir=tmp_path / "fleet", audit_rate=0.1,
        initial_model=edge_models.student_v1, pubkey=edge_models.pubkey, reconnect_max_s=1.0,
        status_interval_s=0.5,
    )  # fmt: skip
    images, labels = load_raw()
    mosquitto = infra_stack.mosquitto
    sim = FleetSimulator(
        plan, base, host=mosquitto.host, port=mosquitto.tls_port,
        tls_for=lambda d: mosquitto.device_credentials(d).ssl_context(),
        images=images, task=DigitsTask(), labels=labels, metrics=EdgeMetrics(),
    )  # fmt: skip
    for daemon in sim.daemons:
        daemon.settings = replace_settings(daemon.settings, exit_when_drained=False)
    running = asyncio.create_task(sim.run())
    try:
        # A window holding only the devices' first statuses decides tau on no traffic
        # (it stays at the factory 0.8); once events flow the budget forces it down.
        def forced(r: Any) -> bool:
            down = {u["scope_id"] for u in r.records if u["tau"] < 0.8}
            return down >= set(cohorts)

        updates = await read_topic(
            bootstrap, reg, "control.thresholds.v1", key_prefix=prefix, done=forced,
            timeout_s=120,
        )  # fmt: skip
        assert forced(updates), [u["reason"] for u in updates.records]
        forced_at = {
            c: min(u["threshold_version"] for u in updates.records
                   if u["scope_id"] == c and u["tau"] < 0.8)
            for c in cohorts
        }  # fmt: skip

        def applied(r: Any) -> bool:
            return all(_applied(r, cohort_of, forced_at).values())

        statuses = await read_topic(
            bootstrap, reg, "edge.status.v1", key_prefix=prefix, done=applied, timeout_s=60
        )
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    seen = _applied(statuses, cohort_of, forced_at)
    assert all(seen.values()), f"devices that never applied their cohort's forced tau: {seen}"
    # Every version a device reports was sent to its cohort (or to it alone).
    all_updates = await read_topic(
        bootstrap, reg, "control.thresholds.v1", key_prefix=prefix, done=lambda r: False,
        timeout_s=5,
    )  # fmt: skip
    sent = {(u["scope_id"], u["threshold_version"]) for u in all_updates.records}
    for st in statuses.records:
        v = st["threshold_version"]
        if v:
            assert (cohort_of[st["device_id"]], v) in sent or (st["device_id"], v) in sent


def _applied(read: Any, cohort_of: dict[str, str], forced_at: dict[str, int]) -> dict[str, bool]:
    """device -> whether it reported a threshold version at or after its cohort's forced one
    (a device applies only newer versions, so a later one includes the forced change)."""
    seen = dict.fromkeys(cohort_of, False)
    for st in read.records:
        device = st["device_id"]
        if device in seen and st["threshold_version"] >= forced_at[cohort_of[device]]:
            seen[device] = True
    return seen
