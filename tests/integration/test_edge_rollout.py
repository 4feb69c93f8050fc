"""A staged rollout through the real path: Kafka -> bridge -> Mosquitto (mTLS) -> daemons.

A CANARY of share 0.5 reaches every device of the cohort and only the members (by the
shared `membership_score`) install it; the others keep v1 and say so. A signed ROLLBACK
to v1 then brings the members back, and every device reports v1 in DeviceStatus, with
the uplink's measured bytes/s and RTT filled in.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from edgeloop.artifacts.rollout import in_rollout
from edgeloop.artifacts.store import DirectoryStore, serve_directory
from edgeloop.edge.daemon import EdgeDaemon, Endpoint
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.settings import EdgeSettings
from edgeloop.edge.source import ArraySource
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.tasks.digits import DigitsTask, load_raw
from tests.integration.bridge_support import BridgeProcess, prepare
from tests.integration.test_bridge_downlink import device_record, produce
from tests.integration.test_edge_daemon import Collector, EdgeModels, edge_models, until
from tests.integration.test_edge_downlink import resign

pytestmark = pytest.mark.integration
__all__ = ["edge_models"]  # the session fixture, shared with test_edge_daemon

MODEL = "digits-student"


def pick_devices(tag: str, members: int, others: int) -> tuple[list[str], list[str]]:
    """Device ids on both sides of the share-0.5 line for v2 (the rule is deterministic)."""
    inside: list[str] = []
    outside: list[str] = []
    i = 0
    while len(inside) < members or len(outside) < others:
        device = f"r{tag}-{i}"
        side = inside if in_rollout(MODEL, 2, device, 0.5) else outside
        wanted = members if side is inside else others
        if len(side) < wanted:
            side.append(device)
        i += 1
    return inside, outside


def make_daemon(stack: InfraEndpoints, models: EdgeModels, device: str, cohort: str,
                state: Path) -> EdgeDaemon:  # fmt: skip
    images, labels = load_raw()
    settings = EdgeSettings(
        device_id=device, cohort=cohort, state_dir=state, initial_model=models.student_v1,
        pubkey=models.pubkey, tau=0.5, publish_window=16, reconnect_max_s=1.0,
        status_interval_s=0.5,
    )  # fmt: skip
    creds = stack.mosquitto.device_credentials(device)
    return EdgeDaemon(
        settings,
        Endpoint(stack.mosquitto.host, stack.mosquitto.tls_port, creds.ssl_context()),
        ArraySource(images, labels=labels, rate_hz=20), DigitsTask(), metrics=EdgeMetrics(),
    )  # fmt: skip


def release(  # noqa: PLR0917 - one positional per ModelRelease field the test varies
    cohort: str, stage: str, version: int, parent: int, url: str, sha: str, share: float
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()), "ts": time.time_ns() // 1000, "model_name": MODEL,
        "model_version": version, "cohort": cohort, "stage": stage, "wave": 0,
        "artifact_url": url, "manifest_sha256": sha, "target": "pi5-cpu",
        "parent_version": parent, "reason": "test", "share": share,
    }  # fmt: skip


def outcome(daemon: EdgeDaemon, label: str) -> float:
    counter = daemon.metrics.updates.labels(daemon.settings.device_id, "model", label)
    return float(counter._value.get())


def withdrew(daemon: EdgeDaemon) -> bool:
    """The device saw the ROLLBACK (a non-member on v1 has nothing to install)."""
    return daemon.state is not None and 2 in daemon.state.current.withdrawn


async def test_canary_share_then_rollback_through_the_bridge(
    infra_stack: InfraEndpoints,
    bridges: list[BridgeProcess],
    edge_models: EdgeModels,
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    tag = uuid.uuid4().hex[:6]
    cohort = f"roll-{tag}"
    members, others = pick_devices(tag, 2, 2)
    devices = members + others
    await produce(
        infra_stack,
        [("fleet.devices.v1", d, "DeviceRecord", device_record(d, cohort)) for d in devices],
    )
    bridge = BridgeProcess(
        infra_stack.home, f"bridge-{tag}", tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_DOWNLINK_GROUP=f"downlink-{tag}", EDGELOOP_BRIDGE_SHARE_GROUP=tag,
    )  # fmt: skip
    bridge.downlink = True
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()

    store = DirectoryStore(tmp_path / "store")
    store.put(edge_models.student_v1)
    store.put(resign(edge_models, 2, tmp_path))
    server = serve_directory(store.root)
    base = f"http://127.0.0.1:{server.server_address[1]}/{MODEL}"

    def sha(version: int) -> str:
        data = (store.root / MODEL / str(version) / "manifest.json").read_bytes()
        return hashlib.sha256(data).hexdigest()

    daemons = {d: make_daemon(infra_stack, edge_models, d, cohort, tmp_path / d) for d in devices}
    collector = Collector(infra_stack.mosquitto, "+")

    def reported(device: str) -> dict[str, Any] | None:
        mine = [r for r in collector.of("DeviceStatus") if r["device_id"] == device]
        return mine[-1] if mine else None

    def all_report(versions: dict[str, int]) -> bool:
        return all((reported(d) or {}).get("model_version") == v for d, v in versions.items())

    try:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(collector.run())
            await until(collector.connected.is_set, 30, "the collector to connect")
            runs = [tg.create_task(daemon.run()) for daemon in daemons.values()]
            await until(lambda: all_report(dict.fromkeys(devices, 1)), 60, "v1 everywhere")

            await produce(infra_stack, [("ml.model-releases.v1", cohort, "ModelRelease",
                                         release(cohort, "CANARY", 2, 1, f"{base}/2", sha(2),
                                                 0.5))])  # fmt: skip
            await until(
                lambda: all(outcome(daemons[d], "not_member") >= 1 for d in others)
                and all_report({**dict.fromkeys(members, 2), **dict.fromkeys(others, 1)}),
                120, "members on v2, the others on v1",
            )  # fmt: skip
            at_canary = {d: reported(d) for d in devices}

            await produce(infra_stack, [("ml.model-releases.v1", cohort, "ModelRelease",
                                         release(cohort, "ROLLBACK", 1, 2, f"{base}/1", sha(1),
                                                 1.0))])  # fmt: skip
            await until(
                lambda: all(withdrew(daemons[d]) for d in others)
                and all_report(dict.fromkeys(devices, 1)),
                120, "every device back on v1",
            )  # fmt: skip
            final = {d: reported(d) for d in devices}
            for run in runs:
                run.cancel()
            watcher.cancel()
    finally:
        await asyncio.to_thread(server.shutdown)

    assert not [t for t, _ in collector.undecodable if any(f"/{d}/" in t for d in devices)]
    for d in members:
        assert outcome(daemons[d], "applied") == 2  # the canary, then the rollback
        assert outcome(daemons[d], "not_member") == 0
    for d in others:
        assert outcome(daemons[d], "applied") == 0  # never left v1
    for d, daemon in daemons.items():
        assert daemon.state is not None
        assert daemon.state.current.model_version == 1
        assert 2 in daemon.state.current.withdrawn  # a redelivered canary cannot return
        status = final[d]
        assert status is not None
        assert status["last_error"] is None, status["last_error"]
        # The uplink's own figures: bytes the broker acknowledged, and a measured RTT.
        assert status["rtt_ms"] is not None
        assert status["rtt_ms"] > 0
        # The rate is per status interval: the one right after a model swap can be 0
        # (inference paused while the model loads), so look at the whole run.
        rates = [r["uplink_bytes_per_s"] for r in collector.of("DeviceStatus")
                 if r["device_id"] == d]  # fmt: skip
        assert rates and all(rate is not None for rate in rates)
        assert max(rates) > 0
    assert {d: (s or {}).get("model_version") for d, s in at_canary.items()} == {
        **dict.fromkeys(members, 2),
        **dict.fromkeys(others, 1),
    }
