"""The edge daemon against a real Mosquitto over mTLS.

- 1,000 events with the broker stopped halfway and the daemon killed with SIGKILL once:
  all arrive, first deliveries in seq order, duplicates only within the in-flight window.
- A device cannot publish as another one (the broker's ACL, from the certificate CN).
- `edgeloop edge` imports no torch, Faust or aiokafka.

The model is the real int8 student from a short bootstrap, made once per session.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.core.errors import DecodeError
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import SingleObjectCodec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STUDENT = "digits-student"


@dataclass(frozen=True)
class EdgeModels:
    store: Path  # DirectoryStore root
    keys: Path  # release.key / release.pub
    student_v1: Path  # signed artifact dir

    @property
    def pubkey(self) -> Path:
        return self.keys / "release.pub"


def bootstrap_models(root: Path) -> EdgeModels:
    """A short bootstrap (few epochs: the gate still passes), shared by every module
    that asks for it in this session: a file lock and a marker make it run once."""
    root.mkdir(parents=True, exist_ok=True)
    done = root / "done"
    with (root / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            from edgeloop.artifacts.signing import generate_keypair, load_private_key
            from edgeloop.trainer.bootstrap import bootstrap
            from edgeloop.trainer.home import TrainerHome

            priv, _ = generate_keypair(root / "keys", overwrite=True)
            from edgeloop.trainer.budget import EdgeBudget
            from edgeloop.trainer.gate import GatePolicy

            # These tests need a released student, not a latency verdict: p99 measured on
            # a loaded shared machine refused it (16 ms > 5 ms) while other tests ran.
            # The latency gate has its own tests; only its wall-clock bound is lifted here.
            policy = GatePolicy(budget=EdgeBudget(max_p99_ms=10_000.0))
            report = bootstrap(
                TrainerHome(root / "trainer"), load_private_key(priv),
                teacher_epochs=1, student_epochs=3, policy=policy,
            )  # fmt: skip
            assert report["released"].get(STUDENT) == 1, report.get("refused")
            done.touch()
    store = root / "trainer" / "store"
    return EdgeModels(store=store, keys=root / "keys", student_v1=store / STUDENT / "1")


@pytest.fixture(scope="session")
def edge_models(tmp_path_factory: pytest.TempPathFactory) -> EdgeModels:
    return bootstrap_models(tmp_path_factory.getbasetemp() / "edge-models")


CODEC = SingleObjectCodec(catalog.catalog().values())


@dataclass
class Collector:
    """A cloud-side subscriber to one device's uplink that survives broker restarts
    (persistent session, reconnects): what the bridge would receive."""

    broker: Mosquitto
    device: str
    got: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # Default: the device's own uplink; "+" for every device.
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    # Messages that are no edgeloop event (topic, why): another test's crafted bytes on a
    # shared broker. Kept to be asserted on, never raised: a bridge does not stop on them.
    undecodable: list[tuple[str, str]] = field(default_factory=list)
    # One session per collector: a client id reused across tests resumed an earlier
    # test's session and received what it had queued (bytes crafted to be refused).
    client_id: str = field(default_factory=lambda: f"collector-{uuid.uuid4().hex[:12]}")

    async def run(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host, self.broker.port,
                    username=self.broker.username,
                    password=self.broker.password.get_secret_value(),
                    identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
                ) as client:  # fmt: skip
                    await client.subscribe(f"edgeloop/{self.device}/up/#", qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        try:
                            schema, record = CODEC.decode(bytes(message.payload))  # type: ignore[arg-type]
                        except DecodeError as exc:
                            self.undecodable.append((str(message.topic), str(exc)))
                            continue
                        self.got.append((schema.short_name, record))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.3)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for k, r in self.got if k == kind]


async def until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not pred():  # noqa: ASYNC110 - predicates over state owned elsewhere
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


def outbox_depth(state_dir: Path) -> int:
    db = state_dir / "outbox.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def daemon_cmd(
    broker: Mosquitto, models: EdgeModels, device: str, state_dir: Path, *extra: str
) -> list[str]:
    creds = broker.device_credentials(device)
    return [
        sys.executable, "-m", "edgeloop", "edge", "run", "--device-id", device,
        "--cert", str(creds.cert), "--key", str(creds.key), "--ca", str(creds.ca),
        "--model", str(models.student_v1), "--pubkey", str(models.pubkey),
        "--state-dir", str(state_dir), *extra,
    ]  # fmt: skip


def daemon_env(broker: Mosquitto, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "EDGELOOP_HOME": str(home),
        "EDGELOOP_MQTT_HOST": broker.host,
        "EDGELOOP_MQTT_TLS_PORT": str(broker.tls_port),
        # Quick reconnects keep the test short; the backoff logic is the same.
        "EDGELOOP_EDGE_RECONNECT_MAX_S": "1.0",
        "EDGELOOP_EDGE_RECONNECT_MIN_S": "0.1",
    }


def first_arrivals(records: list[dict[str, Any]]) -> tuple[list[int], int]:
    seen: set[int] = set()
    order: list[int] = []
    for rec in records:
        if rec["seq"] in seen:
            continue
        seen.add(rec["seq"])
        order.append(rec["seq"])
    return order, len(records) - len(order)


async def test_thousand_events_survive_broker_stop_and_sigkill(
    mosquitto_factory: Callable[[], Any], edge_models: EdgeModels, tmp_path: Path
) -> None:
    broker: Mosquitto = await mosquitto_factory()
    device = "kill-dev-1"
    total = 1000
    window = 64
    collector = Collector(broker, device)
    state_dir = tmp_path / "state"
    cmd = daemon_cmd(
        broker, edge_models, device, state_dir,
        "--rate", "150", "--max-events", str(total), "--exit-when-drained",
    )  # fmt: skip
    env = {**daemon_env(broker, tmp_path / "home"), "EDGELOOP_EDGE_PUBLISH_WINDOW": str(window)}
    log = (tmp_path / "daemon.log").open("ab")
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(collector.run())
        await until(collector.connected.is_set, 30, "the collector to connect")
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=log, stderr=log, cwd=REPO)
        try:
            await until(lambda: len(collector.of("InferenceEvent")) >= 250, 90, "250 events")
            await broker.stop()
            # Events keep coming into the outbox while the broker is down.
            await until(lambda: outbox_depth(state_dir) >= 200, 60, "the outbox to fill")
            proc.send_signal(signal.SIGKILL)
            async with asyncio.timeout(30):
                assert await proc.wait() == -signal.SIGKILL
            proc = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdout=log, stderr=log, cwd=REPO
            )
            await asyncio.sleep(1.0)  # the restarted daemon retries against a dead broker
            await broker.start()
            async with asyncio.timeout(120):
                rc = await proc.wait()
            assert rc == 0, (tmp_path / "daemon.log").read_text()[-3000:]
            await until(
                lambda: len({r["seq"] for r in collector.of("InferenceEvent")}) >= total,
                60, "every event at the collector",
            )  # fmt: skip
        finally:
            if proc.returncode is None:
                proc.kill()
            watcher.cancel()

    events = collector.of("InferenceEvent")
    distinct = {r["event_id"] for r in events}
    assert len(distinct) == total
    assert all(r["device_id"] == device for r in events)
    # Per-device order: the first delivery of each seq comes in seq order, over every
    # uplink kind (inference, offload, status share one sequence).
    # Except the last will (DeviceStatus OFFLINE): its seq was reserved when a connection
    # opened, and the broker publishes it whenever that connection is found dead.
    everything = [
        r for _, r in collector.got if r["device_id"] == device and r.get("state") != "OFFLINE"
    ]
    order, duplicates = first_arrivals(everything)
    assert order == sorted(order)
    # Duplicates only from the in-flight window, once per disruption (broker stop, kill).
    assert duplicates <= 2 * window
    print(f"delivered={len(everything)} duplicates={duplicates} "
          f"offloads={len(collector.of('OffloadRequest'))} "
          f"statuses={len(collector.of('DeviceStatus'))}")  # fmt: skip
    assert outbox_depth(state_dir) == 0


async def test_a_device_cannot_publish_as_another(mosquitto: Mosquitto) -> None:
    victim = Collector(mosquitto, "acl-victim")
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(victim.run())
        await until(victim.connected.is_set, 30, "the collector to connect")
        creds = mosquitto.device_credentials("acl-attacker")
        async with aiomqtt.Client(
            mosquitto.host, mosquitto.tls_port, identifier="acl-victim",
            protocol=aiomqtt.ProtocolVersion.V5, tls_context=creds.ssl_context(),
        ) as client:  # fmt: skip
            for i in range(5):
                await client.publish("edgeloop/acl-victim/up/inference", f"forged-{i}", qos=1)
            # The attacker's own subtree works: the connection itself is fine.
            await client.publish("edgeloop/acl-attacker/up/status", b"x", qos=1)
        await asyncio.sleep(1.0)
        task.cancel()
    assert victim.got == []


async def test_uplink_with_someone_elses_certificate_stops_with_a_clear_error(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    from edgeloop.edge.metrics import EdgeMetrics
    from edgeloop.edge.outbox import Outbox
    from edgeloop.edge.uplink import LinkConfig, MqttUplink, UplinkRejectedError

    creds = mosquitto.device_credentials("cert-owner")
    outbox = Outbox(tmp_path / "o.db", capacity=10)
    outbox.append("inference", lambda s: b"payload", created_us=0)

    async def ignore(*_: object) -> None:
        return None

    uplink = MqttUplink(
        LinkConfig("not-the-owner", mosquitto.host, mosquitto.tls_port, creds.ssl_context()),
        outbox, on_downlink=ignore, will=lambda: b"", metrics=EdgeMetrics(),
    )  # fmt: skip
    with pytest.raises(UplinkRejectedError, match="CN must be the device id"):
        async with asyncio.timeout(30):
            await uplink.run()
    assert outbox.depth == 1  # nothing counted as delivered


def test_edge_cli_imports_no_torch_faust_or_aiokafka() -> None:
    code = (
        "import sys\n"
        "import edgeloop.cli.edge_cmd, edgeloop.edge.daemon, edgeloop.edge.simulator\n"
        "import edgeloop.edge.updater, edgeloop.tasks.digits\n"
        "heavy = ('torch', 'faust', 'aiokafka', 'edgeloop.infra.kafka')\n"
        "bad = sorted(m for m in heavy if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == ""


async def test_verdicts_are_counted_and_a_graceful_stop_reports_offline(
    mosquitto: Mosquitto, edge_models: EdgeModels, tmp_path: Path
) -> None:
    from edgeloop.edge.daemon import EdgeDaemon, Endpoint
    from edgeloop.edge.settings import EdgeSettings
    from edgeloop.edge.source import ArraySource
    from edgeloop.tasks.digits import DigitsTask, load_raw

    device = "bye-dev-1"
    images, _ = load_raw()
    settings = EdgeSettings(
        device_id=device, state_dir=tmp_path / "s", initial_model=edge_models.student_v1,
        pubkey=edge_models.pubkey,
    )  # fmt: skip
    tls = mosquitto.device_credentials(device).ssl_context()
    daemon = EdgeDaemon(
        settings, Endpoint(mosquitto.host, mosquitto.tls_port, tls),
        ArraySource(images, rate_hz=100), DigitsTask(),
    )  # fmt: skip
    collector = Collector(mosquitto, device)
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(collector.run())
        await until(collector.connected.is_set, 30, "the collector to connect")
        run = tg.create_task(daemon.run())
        await until(lambda: len(collector.of("OffloadRequest")) >= 1, 60, "an offload")
        # A verdict for the offload is matched and counted; garbage on the downlink is
        # counted and does not stop the daemon.
        request = collector.of("OffloadRequest")[0]
        verdict = {
            "event_id": "v-1", "ts": 0, "request_event_id": request["event_id"],
            "device_id": device, "teacher_model": "digits-teacher", "teacher_version": 1,
            "label": request["edge_prediction"], "confidence": 0.99,
            "edge_prediction": request["edge_prediction"], "agree": True, "model_version": 1,
            "latency_ms": 3.0,
        }  # fmt: skip
        async with aiomqtt.Client(
            mosquitto.host, mosquitto.port, username=mosquitto.username,
            password=mosquitto.password.get_secret_value(), protocol=aiomqtt.ProtocolVersion.V5,
        ) as cloud:  # fmt: skip
            topic = f"edgeloop/{device}/down/verdict"
            await cloud.publish(topic, b"\xc3\x01garbage", qos=1)
            await cloud.publish(topic, CODEC.encode(catalog.get("CloudVerdict"), verdict), qos=1)
        await until(lambda: daemon.verdicts is not None and daemon.verdicts.agree == 1, 30,
                    "the verdict to be matched")  # fmt: skip
        assert not run.done()
        undecodable = daemon.metrics.updates.labels(device, "verdict", "undecodable")
        assert undecodable._value.get() == 1
        run.cancel()  # what the runner does on SIGTERM
        await until(
            lambda: any(r["state"] == "OFFLINE" for r in collector.of("DeviceStatus")), 30,
            "an OFFLINE status",
        )  # fmt: skip
        watcher.cancel()
    offline = [r for r in collector.of("DeviceStatus") if r["state"] == "OFFLINE"]
    assert offline[-1]["model_version"] == 1
    assert offline[-1]["outbox_capacity"] == 100_000
