"""The bridge against real Mosquitto, a real Kafka broker and the real registry.

Every test counts what a user would count: events in Kafka by event id, duplicates,
per-device order, dead letters by reason. The bridge runs as its own process (the way
operators run it), so SIGKILL is real.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeloop.bench.fleet_load import collect, encoded_events, publish_events
from edgeloop.core.settings import MqttSettings
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import TOPICS, subject_for
from edgeloop.streams.topic_admin import ensure_topics

pytestmark = pytest.mark.integration

RECEIVE_MAXIMUM = 500


class BridgeProcess:
    """A bridge process. Each test uses its own share group: a stopped bridge's persistent
    session stays in its group and keeps receiving its share until it expires."""

    def __init__(self, home: Path, client_id: str, log: Path, **env: str) -> None:
        self.home = home
        self.client_id = client_id
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "EDGELOOP_HOME": str(self.home), **self.env}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgeloop",
                    "bridge",
                    "--client-id",
                    self.client_id,
                    "--receive-maximum",
                    str(RECEIVE_MAXIMUM),
                    "--no-downlink",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def subscribed(self, times: int = 1, timeout_s: float = 60) -> None:
        """Wait until the bridge's MQTT session holds its subscription (`times` connects).

        The broker keeps messages for a subscription that exists; what is published before
        the first subscription ever was has nowhere to go.
        """
        async with asyncio.timeout(timeout_s):
            while self.log.read_text().count("mqtt connected") < times:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                pytest.fail(f"bridge did not stop on SIGTERM; log: {self.log}")


@pytest.fixture
def bridges(infra_stack: InfraEndpoints, tmp_path: Path) -> Iterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        bridge.stop()


async def prepare(stack: InfraEndpoints) -> None:
    await ensure_topics(stack.kafka.bootstrap)
    assert stack.registry is not None
    async with RegistryClient(stack.registry.url) as registry:
        for spec in TOPICS.values():
            await registry.register(subject_for(spec.name), catalog.get(spec.event).text)


def mqtt_settings(stack: InfraEndpoints) -> MqttSettings:
    return MqttSettings.load(stack.home)


def check_delivery(
    event_ids: list[str], keys: list[str], expected: set[str], window: int, *, ordered: bool = True
) -> None:
    """Every expected event once after dedup, duplicates within the window, and each
    device's events in seq order (first occurrence wins, as a consumer dedups)."""
    counts = Counter(event_ids)
    missing = expected - set(counts)
    assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}"
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= window, f"{duplicates} duplicates exceed the in-flight window {window}"
    seen: set[str] = set()
    last_seq: dict[str, int] = defaultdict(lambda: -1)
    for event_id, key in zip(event_ids, keys, strict=True):
        if event_id in seen:
            continue
        seen.add(event_id)
        device, seq = event_id.rsplit(":", 1)
        assert key == device
        if not ordered:
            continue
        assert int(seq) > last_seq[device], f"{device}: seq {seq} after {last_seq[device]}"
        last_seq[device] = int(seq)


async def test_no_event_is_lost_when_the_bridge_is_killed_twice(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    prefix = f"k{uuid.uuid4().hex[:6]}"
    messages = encoded_events(devices=50, per_device=1000, prefix=prefix)  # 50,000 events
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{prefix}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
    )
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()
    mqtt = mqtt_settings(infra_stack)
    publishing = asyncio.create_task(
        asyncio.to_thread(publish_events, mqtt, messages, client_id=f"load-{prefix}", rate=8000)
    )
    bootstrap = infra_stack.kafka.bootstrap
    for kills, fraction in enumerate((0.3, 0.6), start=1):
        # Kill once the bridge has moved a share of the events into Kafka.
        await collect(
            bootstrap,
            "edge.inference.v1",
            int(len(messages) * fraction),
            key_prefix=prefix,
            timeout_s=120,
            idle_s=60,
        )
        bridge.kill()
        await asyncio.sleep(0.5)
        bridge.start()
        await bridge.subscribed(times=kills + 1)
    await publishing
    got = await collect(
        bootstrap, "edge.inference.v1", len(messages), key_prefix=prefix, timeout_s=240, idle_s=30
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(50) for s in range(1000)}
    check_delivery(got.event_ids, got.keys, expected, window=2 * RECEIVE_MAXIMUM)


async def test_two_bridges_share_the_load_and_deliver_everything(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    prefix = f"s{uuid.uuid4().hex[:6]}"
    messages = encoded_events(devices=20, per_device=500, prefix=prefix)
    for i in range(2):
        bridge = BridgeProcess(
            infra_stack.home,
            f"bridge-{prefix}-{i}",
            tmp_path / f"bridge-{i}.log",
            EDGELOOP_BRIDGE_SHARE_GROUP=prefix,
        )
        bridges.append(bridge)
        bridge.start()
    for bridge in bridges:
        await bridge.subscribed()
    await asyncio.to_thread(
        publish_events, mqtt_settings(infra_stack), messages, client_id=f"load-{prefix}"
    )
    got = await collect(
        infra_stack.kafka.bootstrap,
        "edge.inference.v1",
        len(messages),
        key_prefix=prefix,
        timeout_s=120,
        idle_s=15,
    )
    expected = {f"{prefix}-{d}:{s}" for d in range(20) for s in range(500)}
    # A shared subscription deals one device's messages to both bridges, so Kafka order
    # across them is not per-device order: consumers order by seq (docs/architecture.md).
    check_delivery(got.event_ids, got.keys, expected, window=0, ordered=False)
    shares = Counter(got.bridges)
    assert set(shares) == {f"bridge-{prefix}-0", f"bridge-{prefix}-1"}, shares
    assert min(shares.values()) > len(messages) * 0.1, f"one bridge idled: {shares}"
