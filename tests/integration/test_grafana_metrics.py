"""Every metric the Grafana dashboard (deploy/grafana/edgeloop.json) queries is exported by
a running service: the bridge, one agents worker (data and control plane), `train serve`
and a simulated fleet, each started as an operator starts it (`edgeloop ...
--metrics-port`), with events flowing through all of them.

A labelled Prometheus metric has no series until its first observation, so the test
waits for the fleet's traffic to reach every stage and provokes what a healthy run does
not do by itself but an operator's panel must show when it happens: one malformed MQTT
message (the bridge's dead letters), one malformed Kafka record (the agents'), one
trigger for a model the trainer does not train (the trainer's rejected triggers), and
the FULL release of the running model that an operator publishes for the bootstrap model
(the release panel). What still has no sample is reported with the panel that asks for it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from edgeloop.agents.fleet import FleetClient, new_record
from edgeloop.core.settings import KafkaSettings
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import dlq_topic
from tests.e2e.test_control_through_fleet import control_env
from tests.grafana import exposition_samples, load_dashboard, unknown_metrics
from tests.integration.agents_support import (
    AgentsProcess,
    free_port,
    produce_raw,
    start_at_end,
    workers,
)
from tests.integration.bridge_support import BridgeProcess, prepare
from tests.integration.test_agents_worker import worker_env
from tests.integration.test_bridge_downlink import produce
from tests.integration.test_edge_daemon import EdgeModels, edge_models

pytestmark = pytest.mark.integration
__all__ = ["edge_models", "workers"]

# Deadlines, generous for 2 busy cores, never timing assertions: until every service
# answers and the fleet's events reach the broker (each process imports, connects and
# loads models first), then for every series to appear.
START_S = 180.0
WAIT_S = 90.0


class Command:
    """One `edgeloop` command as a child process with its own log and /metrics port."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.args = [*args, "--metrics-port", str(self.port)]
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeloop", *self.args],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> None:
        assert self.proc is not None
        assert self.proc.poll() is None, f"{self.name} exited: {self.log.read_text()[-3000:]}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def scrape(port: int) -> set[str] | None:
    """Sample names of the /metrics on `port` (None while it does not answer)."""
    try:
        resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.HTTPError:
        return None
    return exposition_samples(resp.text) if resp.status_code == 200 else None


async def test_every_metric_the_dashboard_queries_is_exported(
    infra_stack: InfraEndpoints,
    edge_models: EdgeModels,
    bridges: list[BridgeProcess],
    workers: list[AgentsProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    assert infra_stack.registry is not None
    bootstrap, reg = infra_stack.kafka.bootstrap, infra_stack.registry.url
    home = infra_stack.home
    prefix = f"gm{infra_stack.kafka.flavor[:1]}"
    cohorts = (f"{prefix}-north", f"{prefix}-south")
    devices = [f"{prefix}-{i:04d}" for i in range(4)]  # `edge simulate`'s ids
    async with RegistryClient(reg) as registry:
        fleet = FleetClient(KafkaSettings(bootstrap=bootstrap), registry)
        for i, device in enumerate(devices):
            await fleet.write(new_record(device, cohort=cohorts[i % 2]))
    # What an operator publishes for the bootstrap model: the cohorts run v1 in full.
    await produce(infra_stack, [
        ("ml.model-releases.v1", cohort, "ModelRelease", {
            "event_id": str(uuid.uuid4()), "ts": time.time_ns() // 1000,
            "model_name": "digits-student", "model_version": 1, "cohort": cohort,
            "stage": "FULL", "wave": 0, "artifact_url": f"{edge_models.student_v1.as_uri()}/",
            "manifest_sha256": "0" * 64, "target": "pi5-cpu", "parent_version": None,
            "reason": "bootstrap", "share": 1.0,
        }) for cohort in cohorts
    ])  # fmt: skip
    # `train serve` reads its own trigger topic: the shared one holds other tests'
    # triggers, which it would train on.
    uid = uuid.uuid4().hex[:8]
    triggers = f"g{uid}.ml.training-triggers.v1"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 1, 1) for t in (triggers, dlq_topic(triggers))])
    finally:
        await admin.close()

    app_id = f"agents-{prefix}"
    # PSI needs a reference histogram: a model version's first `reference_min_events`
    # events (500 by default: minutes of this small fleet).
    env = control_env(EDGELOOP_CONTROL_SIGNALS__REFERENCE_MIN_EVENTS="20")
    worker = AgentsProcess(home, app_id, tmp_path / "agents.log", **worker_env(edge_models, **env))
    workers.append(worker)
    await start_at_end(bootstrap, app_id)
    worker.start()
    bridge_port = free_port()
    bridge = BridgeProcess(
        home, f"bridge-{prefix}", tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix, EDGELOOP_BRIDGE_DOWNLINK_GROUP=f"{prefix}-down",
        EDGELOOP_BRIDGE_METRICS_PORT=str(bridge_port),
    )  # fmt: skip
    bridge.downlink = True
    bridges.append(bridge)
    bridge.start()
    trainer_home = tmp_path / "trainer"
    trainer = Command(
        "train serve", ["train", "serve", "--out", str(trainer_home), "--epochs", "1"],
        tmp_path / "trainer.log",
        {"EDGELOOP_HOME": str(home), "EDGELOOP_TRAINER_KEYS_DIR": str(edge_models.keys),
         "EDGELOOP_TRAINER_TRIGGERS_TOPIC": triggers, "EDGELOOP_TRAINER_GROUP_ID": f"t-{uid}",
         "EDGELOOP_TRAINER_CLIENT_ID": f"t-{uid}"},
    )  # fmt: skip
    sim = Command(
        "edge simulate",
        ["edge", "simulate", "--devices", str(len(devices)), "--prefix", prefix,
         "--cohorts", ",".join(cohorts), "--model", str(edge_models.student_v1),
         "--pubkey", str(edge_models.pubkey), "--state-dir", str(tmp_path / "fleet"),
         "--rate", "10", "--audit-rate", "0.1"],
        tmp_path / "fleet.log",
        {"EDGELOOP_HOME": str(home), "EDGELOOP_EDGE_STATUS_INTERVAL_S": "1",
         "EDGELOOP_EDGE_RECONNECT_MAX_S": "1"},
    )  # fmt: skip
    commands = [trainer, sim]
    ports = {"bridge": bridge_port, "agents": worker.port, "train serve": trainer.port,
             "edge simulate": sim.port}  # fmt: skip
    exported: dict[str, set[str]] = {}
    missing: list[tuple[str, str]] = []
    try:
        shutil.copytree(edge_models.store.parent, trainer_home)
        trainer.start()
        sim.start()  # its devices keep what they publish before the bridge subscribes
        await asyncio.gather(worker.ready(), bridge.subscribed())
        await _provoke_dead_letters(infra_stack, prefix, triggers)
        dashboard = load_dashboard()
        deadline = time.monotonic() + START_S
        flowing = False
        while time.monotonic() < deadline:
            for cmd in commands:
                cmd.alive()
            for name, port in ports.items():
                got = await asyncio.to_thread(scrape, port)
                if got is not None:
                    exported[name] = got
            if not flowing and "edgeloop_edge_published_total" in exported.get("edge simulate", ()):
                flowing = True
                deadline = time.monotonic() + WAIT_S
            missing = unknown_metrics(dashboard, set().union(*exported.values()))
            if not missing and len(exported) == len(ports):
                break
            await asyncio.sleep(2)
    finally:
        for cmd in commands:
            cmd.stop()
    assert set(exported) == set(ports), f"no /metrics from {set(ports) - set(exported)}"
    assert "edgeloop_edge_published_total" in exported["edge simulate"], "the fleet never published"
    assert not missing, "series the dashboard queries that no running service exports:\n" + (
        "\n".join(f"  panel {panel!r}: {metric}" for panel, metric in missing)
    )


async def _provoke_dead_letters(stack: InfraEndpoints, prefix: str, triggers: str) -> None:
    """One bad input per stage that dead-letters: the bridge, the agents, the trainer."""
    device = f"{prefix}-bad"
    creds = stack.mosquitto.device_credentials(device)
    async with aiomqtt.Client(
        stack.mosquitto.host, stack.mosquitto.tls_port, identifier=device,
        tls_context=creds.ssl_context(), protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:  # fmt: skip
        await client.publish(f"edgeloop/{device}/up/inference", b"not avro", qos=1)
    await produce_raw(stack.kafka.bootstrap, "edge.inference.v1",
                      [(device.encode(), b"\x00\x00\x00\x00\x01 not avro either")])  # fmt: skip
    trigger: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "ts": time.time_ns() // 1000, "trigger_id": f"T{prefix}",
        "model_name": "no-such-model", "base_model_version": 1, "reason": "MANUAL",
        "ranges": [{"topic": "ml.hard-examples.v1", "partition": 0, "start_offset": 0,
                    "end_offset": 1}],
        "hard_example_count": 1, "detail": "a model this trainer does not train",
    }  # fmt: skip
    await produce(stack, [(triggers, "no-such-model", "TrainingTrigger", trigger)])
