"""`edge simulate` stopped with SIGTERM while its devices cannot reach the broker: each
device stops taking frames, waits for the link, delivers its outbox, and the summary it
writes matches Kafka event for event (a planned stop leaves nothing behind)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeloop.demo.delivery import await_delivered
from edgeloop.infra.testing import InfraEndpoints
from tests.integration.bridge_support import BridgeProcess, prepare
from tests.integration.test_edge_daemon import EdgeModels, edge_models

pytestmark = pytest.mark.integration
__all__ = ["edge_models"]


async def test_sigterm_during_a_partition_delivers_every_outbox(
    infra_stack: InfraEndpoints,
    edge_models: EdgeModels,
    bridges: list[BridgeProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    prefix = f"ss{infra_stack.kafka.flavor[:1]}"
    bridge = BridgeProcess(
        infra_stack.home, f"bridge-{prefix}", tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
    )  # fmt: skip
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()
    summary = tmp_path / "summary.json"
    log = tmp_path / "fleet.log"
    with log.open("ab") as out:
        # Every connection drops 6 s after the devices start, for 10 s; the SIGTERM comes
        # about 8 s after they start, mid-partition, with frames taken and stored that no
        # broker has acknowledged.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeloop", "edge", "simulate", "--devices", "3",
             "--prefix", prefix, "--model", str(edge_models.student_v1),
             "--pubkey", str(edge_models.pubkey), "--state-dir", str(tmp_path / "fleet"),
             "--rate", "20", "--partition-at", "6", "--partition-for", "10",
             "--drain-timeout", "40", "--summary", str(summary),
            env={**os.environ, "EDGELOOP_HOME": str(infra_stack.home),
                 "EDGELOOP_EDGE_RECONNECT_MAX_S": "1"},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # Start-up (imports, certificates, the model) takes seconds on a loaded machine;
        # the partition is timed from when the devices start.
        async with asyncio.timeout(120):
            while log.read_text(errors="replace").count("edge daemon up") < 3:
                assert proc.returncode is None, log.read_text()[-3000:]
                await asyncio.sleep(0.2)
        await asyncio.sleep(8)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, log.read_text()[-3000:]
    facts = json.loads(summary.read_text())
    assert sorted(facts) == [f"{prefix}-{i:04d}" for i in range(3)]
    assert all(f["outbox_depth"] == 0 for f in facts.values()), facts
    # The bridge may still be moving the drained burst into Kafka: count until complete.
    delivered = await await_delivered(infra_stack.home, facts)
    totals = delivered["totals"]
    # 20 frames/s for ~6 s per device, all of them in Kafka, none lost to the stop.
    assert totals["produced"] >= 3 * 60, delivered
    assert totals["missing"] == 0, delivered
