"""Downlink over a real Mosquitto: a retained ThresholdUpdate and a signed ModelRelease
reach a running daemon under load; the swap loses no event and no event comes from a
half-loaded model; the applied versions survive a restart and are reported."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgeloop.artifacts.signing import load_private_key, sign_artifact
from edgeloop.artifacts.store import DirectoryStore, serve_directory
from edgeloop.edge.daemon import EdgeDaemon, Endpoint
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.settings import EdgeSettings
from edgeloop.edge.source import ArraySource
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import SingleObjectCodec
from edgeloop.tasks.digits import DigitsTask, load_raw
from tests.integration.test_edge_daemon import Collector, EdgeModels, edge_models, until

pytestmark = pytest.mark.integration
__all__ = ["edge_models"]  # the session fixture, shared with test_edge_daemon

CODEC = SingleObjectCodec()


def resign(models: EdgeModels, version: int, dest_root: Path) -> Path:
    """The v1 student re-signed as `version`: a new release with the same weights."""
    stage = dest_root / f"stage-{version}"
    stage.mkdir(parents=True)
    for name in ("model.onnx", "model-card.json"):
        shutil.copy2(models.student_v1 / name, stage / name)
    sign_artifact(stage, load_private_key(models.keys / "release.key"), model_name="digits-student",
                  version=version, files=["model.onnx", "model-card.json"])  # fmt: skip
    return stage


async def publish(broker: Mosquitto, topic: str, schema: str, record: dict[str, Any]) -> None:
    async with aiomqtt.Client(
        broker.host, broker.port, username=broker.username,
        password=broker.password.get_secret_value(), protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:  # fmt: skip
        payload = CODEC.encode(catalog.get(schema), record)
        await client.publish(topic, payload, qos=1, retain=True)


def make_daemon(
    broker: Mosquitto, models: EdgeModels, device: str, state: Path, events: int
) -> EdgeDaemon:
    images, labels = load_raw()
    settings = EdgeSettings(
        device_id=device, state_dir=state, initial_model=models.student_v1, pubkey=models.pubkey,
        max_events=events, exit_when_drained=True, tau=0.5, publish_window=32,
        reconnect_max_s=1.0,
    )  # fmt: skip
    creds = broker.device_credentials(device)
    return EdgeDaemon(
        settings, Endpoint(broker.host, broker.tls_port, creds.ssl_context()),
        ArraySource(images, labels=labels, rate_hz=300), DigitsTask(), metrics=EdgeMetrics(),
    )  # fmt: skip


async def test_threshold_and_model_swap_under_load(
    mosquitto: Mosquitto, edge_models: EdgeModels, tmp_path: Path
) -> None:
    device = "swap-dev-1"
    total = 900
    store = DirectoryStore(tmp_path / "store")
    store.put(resign(edge_models, 2, tmp_path))
    server = serve_directory(store.root)
    url = f"http://127.0.0.1:{server.server_address[1]}/digits-student/2"
    manifest_sha = hashlib.sha256((store.root / "digits-student/2/manifest.json").read_bytes())
    collector = Collector(mosquitto, device)
    daemon = make_daemon(mosquitto, edge_models, device, tmp_path / "state", total)
    try:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(collector.run())
            await until(collector.connected.is_set, 30, "the collector to connect")
            run = tg.create_task(daemon.run())
            await until(lambda: len(collector.of("InferenceEvent")) >= 150, 60, "150 events")
            await publish(mosquitto, f"edgeloop/{device}/down/threshold", "ThresholdUpdate", {
                "event_id": "t-5", "ts": time.time_ns() // 1000, "scope": "DEVICE",
                "scope_id": device, "threshold_version": 5, "tau": 0.97,
                "confidence_kind": "MAX_PROB", "audit_rate": 0.0, "reason": "test",
                "signals": {"psi": 0.1},
            })  # fmt: skip
            await publish(mosquitto, f"edgeloop/{device}/down/model", "ModelRelease", {
                "event_id": "r-2", "ts": time.time_ns() // 1000, "model_name": "digits-student",
                "model_version": 2, "cohort": "default", "stage": "CANARY", "wave": 0,
                "artifact_url": url, "manifest_sha256": manifest_sha.hexdigest(),
                "target": "pi5-cpu", "parent_version": 1, "reason": "test",
            })  # fmt: skip
            async with asyncio.timeout(120):
                await run
            await until(
                lambda: len({r["seq"] for r in collector.of("InferenceEvent")}) >= total, 30,
                "every event",
            )  # fmt: skip
            watcher.cancel()
    finally:
        await asyncio.to_thread(server.shutdown)

    events = sorted(
        {r["seq"]: r for r in collector.of("InferenceEvent")}.values(), key=lambda r: r["seq"]
    )
    assert len(events) == total  # no event lost across the swap
    versions = [r["model_version"] for r in events]
    assert set(versions) == {1, 2}
    assert versions == sorted(versions)  # once swapped, never served by the old one again
    thresholds = [r["threshold_version"] for r in events]
    assert thresholds == sorted(thresholds)
    assert thresholds[-1] == 5
    for r in events:  # every answer is a whole model's answer
        assert len(r["probs"]) == 10
        assert abs(sum(r["probs"]) - 1.0) < 1e-3
        if r["threshold_version"] == 5:
            assert r["threshold"] == pytest.approx(0.97)
            # Audit rate 0 and a byte budget far above these tiny frames: tau decides.
            assert r["decision"] == ("LOCAL" if r["confidence"] >= 0.97 else "OFFLOAD")
    assert daemon.state is not None
    assert daemon.state.current.model_version == 2
    assert daemon.state.current.threshold.version == 5

    # A restart keeps what was applied and reports it; the retained messages that come
    # back on subscribe are stale now, and an older threshold changes nothing.
    again = make_daemon(mosquitto, edge_models, device, tmp_path / "state", total)
    collector2 = Collector(mosquitto, device)
    async with asyncio.TaskGroup() as tg:
        w2 = tg.create_task(collector2.run())
        await until(collector2.connected.is_set, 30, "the collector to connect")
        await publish(mosquitto, f"edgeloop/{device}/down/threshold", "ThresholdUpdate", {
            "event_id": "t-3", "ts": 0, "scope": "DEVICE", "scope_id": device,
            "threshold_version": 3, "tau": 0.1, "confidence_kind": "MAX_PROB",
            "audit_rate": 0.0, "reason": "stale copy", "signals": {},
        })  # fmt: skip
        async with asyncio.timeout(60):
            await again.run()
        await until(lambda: bool(collector2.of("DeviceStatus")), 30, "a DeviceStatus")
        w2.cancel()
    status = collector2.of("DeviceStatus")[-1]
    assert (status["model_version"], status["threshold_version"]) == (2, 5)
    assert again.state is not None
    assert again.state.current.threshold.tau == pytest.approx(0.97)
