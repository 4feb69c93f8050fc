"""A device deletes an event only when the broker took it for a subscriber.

Real Mosquitto (a fresh one, so no earlier test's bridge session subscribes), real Kafka
and registry, the device and the bridge as processes. Mosquitto answers a publish that
no subscription matches with PUBACK 0x10 and throws the message away: the device must
keep those events until a bridge is there, and report drained only when they are in
Kafka's hands.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from edgeloop.bench.fleet_load import collect
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.testing import InfraEndpoints
from tests.integration.bridge_support import BridgeProcess, prepare
from tests.integration.test_edge_daemon import (
    REPO,
    EdgeModels,
    bootstrap_models,
    daemon_cmd,
    daemon_env,
    until,
)

pytestmark = pytest.mark.integration

EVENTS = 50


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> EdgeModels:
    # The same root as test_edge_daemon's fixture: the bootstrap runs once per session.
    return bootstrap_models(tmp_path_factory.getbasetemp() / "edge-models")


def stored_inference_rows(state_dir: Path) -> int:
    db = state_dir / "outbox.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(
            con.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'inference'").fetchone()[0]
        )
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


async def test_events_wait_for_a_subscriber_and_drained_means_delivered(
    mosquitto_factory: Callable[[], Awaitable[Mosquitto]],
    infra_stack: InfraEndpoints,
    models: EdgeModels,
    bridges: list[BridgeProcess],
    tmp_path: Path,
) -> None:
    broker = await mosquitto_factory()
    # Kafka and the registry are the session's; Mosquitto is this test's own.
    kafka_broker = infra_stack.kafka
    stack = InfraEndpoints.write(tmp_path / "home", broker, kafka_broker, infra_stack.registry)
    await prepare(stack)
    prefix = uuid.uuid4().hex[:6]
    device = f"nosub-{prefix}"
    state_dir = tmp_path / "state"
    device_log = tmp_path / "device.log"
    cmd = daemon_cmd(
        broker, models, device, state_dir,
        "--rate", "100", "--max-events", str(EVENTS), "--exit-when-drained",
    )  # fmt: skip
    with device_log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=daemon_env(broker, stack.home), stdout=out, stderr=out, cwd=REPO
        )
    try:
        # No bridge: every publish is answered 0x10 and dropped by the broker. The device
        # keeps all 50 events, sends them again after each backoff, and does not exit.
        await until(lambda: stored_inference_rows(state_dir) == EVENTS, 60, "50 events stored")
        await until(
            lambda: device_log.read_text().count("broker did not deliver") >= 3, 60,
            "three rounds of 'no matching subscribers'",
        )  # fmt: skip
        assert proc.returncode is None, device_log.read_text()[-3000:]
        assert stored_inference_rows(state_dir) == EVENTS
        assert "No matching subscribers" in device_log.read_text()

        bridge = BridgeProcess(
            stack.home, f"bridge-{prefix}", tmp_path / "bridge.log",
            EDGELOOP_BRIDGE_SHARE_GROUP=f"g{prefix}",
        )  # fmt: skip
        bridges.append(bridge)
        bridge.start()
        await bridge.subscribed()
        async with asyncio.timeout(120):
            rc = await proc.wait()
        assert rc == 0, device_log.read_text()[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "all events delivered" in device_log.read_text()
    assert stored_inference_rows(state_dir) == 0
    got = await collect(
        kafka_broker.bootstrap, "edge.inference.v1", EVENTS, key_prefix=device,
        timeout_s=120, idle_s=30,
    )  # fmt: skip
    distinct = {e for e, k in zip(got.event_ids, got.keys, strict=True) if k == device}
    assert len(distinct) == EVENTS


async def test_an_event_over_the_brokers_size_limit_is_quarantined_and_the_rest_flow(
    tmp_path: Path,
) -> None:
    """Mosquitto answers a PUBLISH over `message_size_limit` with PUBACK 0x95 (paho 2.2
    used to call that a malformed packet and drop the link, so the device resent the
    row forever). A Mosquitto of this test's own, since it needs the limit."""
    import shutil

    import aiomqtt

    from edgeloop.edge.metrics import EdgeMetrics
    from edgeloop.edge.outbox import Outbox
    from edgeloop.edge.uplink import LinkConfig, MqttUplink
    from edgeloop.infra.ports import free_ports

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    (port,) = free_ports(1)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmessage_size_limit 2048\n")
    broker = await asyncio.create_subprocess_exec(
        binary, "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    got: list[bytes] = []
    box = Outbox(tmp_path / "o.db", capacity=100)
    for payload in (b"small-1", b"x" * 4096, b"small-2"):
        box.append("inference", lambda _s, p=payload: p, created_us=0)

    async def ignore(*_: object) -> None:
        return None

    uplink = MqttUplink(
        LinkConfig("big-dev", "127.0.0.1", port, None, reconnect_min_s=0.05,
                   reconnect_max_s=0.2),
        box, on_downlink=ignore, will=lambda: b"", metrics=EdgeMetrics(),
    )  # fmt: skip
    try:
        await asyncio.sleep(0.3)  # the broker binds its port
        async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
            await sub.subscribe("edgeloop/big-dev/up/#", qos=1)

            async def receive() -> None:
                async for message in sub.messages:
                    got.append(bytes(message.payload))  # type: ignore[arg-type]

            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(uplink.run()), tg.create_task(receive())]
                try:
                    await until(
                        lambda: box.depth == 0 and len(got) == 2, 30, "the outbox to settle"
                    )
                finally:
                    for task in tasks:
                        task.cancel()
    finally:
        broker.terminate()
        await broker.wait()
    assert got == [b"small-1", b"small-2"]
    ((row, code, reason),) = box.quarantine()
    assert (row.seq, code, len(row.payload)) == (2, 0x95, 4096)
    assert box.quarantined == 1
    assert uplink.metrics.outbox_quarantined.labels("big-dev", reason)._value.get() == 1
