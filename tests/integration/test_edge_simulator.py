"""`edge simulate` machinery: N devices in one process, each with its own certificate,
client, outbox and seq; a partition of every connection mid-run loses nothing."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest

from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.settings import EdgeSettings
from edgeloop.edge.simulator import DriftSchedule, FleetPlan, FleetSimulator
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.tasks.digits import DigitsTask, load_raw
from tests.integration.test_edge_daemon import Collector, EdgeModels, edge_models, until

pytestmark = pytest.mark.integration
__all__ = ["edge_models"]


async def test_fleet_with_partition_and_drift_delivers_every_event(
    mosquitto: Mosquitto, edge_models: EdgeModels, tmp_path: Path
) -> None:
    devices, per_device = 6, 90
    plan = FleetPlan(
        devices=devices,
        prefix="simtest",
        cohorts=("canary", "control"),
        rate_hz=30.0,
        schedule=DriftSchedule.parse(["canary:0.5=0.8"]),
        partition_at_s=1.5,
        partition_for_s=1.5,
        events_per_device=per_device,
    )
    base = EdgeSettings(
        device_id="simtest-base", state_dir=tmp_path / "fleet",
        initial_model=edge_models.student_v1, pubkey=edge_models.pubkey, reconnect_max_s=1.0,
    )  # fmt: skip
    images, labels = load_raw()
    sim = FleetSimulator(
        plan, base, host=mosquitto.host, port=mosquitto.tls_port,
        tls_for=lambda d: mosquitto.device_credentials(d).ssl_context(),
        images=images, task=DigitsTask(), labels=labels, metrics=EdgeMetrics(),
    )  # fmt: skip
    collector = Collector(mosquitto, "+")
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(collector.run())
        await until(collector.connected.is_set, 30, "the collector to connect")
        async with asyncio.timeout(120):
            await sim.run()
        await until(
            lambda: len({r["event_id"] for r in collector.of("InferenceEvent")
                         if r["device_id"].startswith("simtest-")}) >= devices * per_device,
            30, "every device's events",
        )  # fmt: skip
        watcher.cancel()

    seqs: dict[str, set[int]] = defaultdict(set)
    cohorts: dict[str, set[str]] = defaultdict(set)
    for r in collector.of("InferenceEvent"):
        if r["device_id"].startswith("simtest-"):
            seqs[r["device_id"]].add(r["seq"])
            cohorts[r["cohort"]].add(r["device_id"])
    # Every message of these devices was an edgeloop event.
    assert not [t for t, _ in collector.undecodable if "/simtest-" in t]
    assert sorted(seqs) == [f"simtest-{i:04d}" for i in range(devices)]
    assert all(len(s) == per_device for s in seqs.values())  # own seq per device
    assert {c: len(d) for c, d in cohorts.items()} == {"canary": 3, "control": 3}
    # The partition really cut live connections, and nothing was lost to it.
    assert sum(imp.cuts for imp in sim.impairments) >= 1
    assert sim.totals()["outbox_depth"] == 0
    # Ground truth, counted on the simulator's side: every frame against its label, per
    # cohort; the drifted cohort (canary, severity 0.8) is the less accurate one.
    reg = sim.metrics.registry

    def predictions(cohort: str, correct: str) -> float:
        labels = {"cohort": cohort, "model_version": "1", "correct": correct}
        return reg.get_sample_value("edgeloop_edge_predictions_total", labels) or 0.0

    accuracy = {}
    for cohort in ("canary", "control"):
        right, wrong = predictions(cohort, "true"), predictions(cohort, "false")
        assert right + wrong == 3 * per_device
        accuracy[cohort] = right / (right + wrong)
    assert accuracy["canary"] < accuracy["control"]


def test_simulate_cli_runs_a_small_fleet_to_completion(
    mosquitto: Mosquitto, edge_models: EdgeModels, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "EDGELOOP_HOME": str(tmp_path / "home"),
        "EDGELOOP_MQTT_HOST": mosquitto.host,
        "EDGELOOP_MQTT_TLS_PORT": str(mosquitto.tls_port),
        "EDGELOOP_MQTT_CA_FILE": str(mosquitto.ca_file),
        "EDGELOOP_PKI_DIR": str(mosquitto.pki.root),
    }
    out = subprocess.run(
        [sys.executable, "-m", "edgeloop", "edge", "simulate", "--devices", "3",
         "--prefix", "clisim", "--cohorts", "a,b", "--rate", "50", "--max-events", "25",
         "--drift-schedule", "a:0=0.5", "--model", str(edge_models.student_v1),
         "--pubkey", str(edge_models.pubkey), "--state-dir", str(tmp_path / "fleet")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "simulated 3 devices" in out.stdout
    assert "'outbox_depth': 0" in out.stdout
