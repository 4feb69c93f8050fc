"""Shared by the bridge tests: the bridge as an operator runs it, and delivery checks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest

from edgeloop.bench.fleet_load import Collected
from edgeloop.core.settings import MqttSettings
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import TOPICS, subject_for
from edgeloop.streams.topic_admin import ensure_topics

RECEIVE_MAXIMUM = 500


class BridgeProcess:
    """A bridge process. Each test uses its own share group: a stopped bridge's persistent
    session stays in its group and keeps receiving its share until it expires."""

    def __init__(
        self,
        home: Path,
        client_id: str,
        log: Path,
        *,
        receive_maximum: int = RECEIVE_MAXIMUM,
        **env: str,
    ) -> None:
        self.home = home
        self.client_id = client_id
        self.log = log
        self.receive_maximum = receive_maximum
        self.env = env
        self.downlink = False
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
                    str(self.receive_maximum),
                    "--downlink" if self.downlink else "--no-downlink",
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

    def metric(self, name: str) -> float:
        """A sample of the bridge's /metrics (EDGELOOP_BRIDGE_METRICS_PORT must be set)."""
        port = self.env["EDGELOOP_BRIDGE_METRICS_PORT"]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in the bridge's metrics")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                pytest.fail(f"bridge did not stop on SIGTERM; log: {self.log}")


async def prepare(stack: InfraEndpoints) -> None:
    await ensure_topics(stack.kafka.bootstrap)
    assert stack.registry is not None
    async with RegistryClient(stack.registry.url) as registry:
        for spec in TOPICS.values():
            await registry.register(subject_for(spec.name), catalog.get(spec.event).text)


def mqtt_settings(stack: InfraEndpoints) -> MqttSettings:
    return MqttSettings.load(stack.home)


# Bridge log events that can each add duplicates (a redelivery of what was in flight), or
# explain them; counted into a delivery failure's message.
_REDELIVERY_EVENTS = (
    "mqtt connected",
    "mqtt disconnected",
    "mqtt connection failed",
    "mqtt protocol error",
    "broker sent DISCONNECT",
    "no PINGRESP",
    "kafka produce failed",
    "acknowledged on close",
)


def redelivery_events(*logs: Path) -> dict[str, int]:
    """How often each of `_REDELIVERY_EVENTS` appears in the bridges' logs."""
    text = "".join(log.read_text(errors="replace") for log in logs if log.exists())
    return {event: text.count(event) for event in _REDELIVERY_EVENTS if event in text}


def distinct_records(got: Collected) -> tuple[list[str], list[str]]:
    """`got`'s event ids and keys, each record once: a record read twice (at the same
    partition and offset) is the reader's repeat, not a duplicate in Kafka."""
    seen: set[tuple[int, int]] = set()
    ids: list[str] = []
    keys: list[str] = []
    for event_id, key, position in zip(got.event_ids, got.keys, got.positions, strict=True):
        if position not in seen:
            seen.add(position)
            ids.append(event_id)
            keys.append(key)
    return ids, keys


def duplicate_report(got: Collected) -> str:
    """Where the extra copies of `got`'s event ids come from: records at distinct offsets
    (written twice) or one record read twice, and which bridge wrote each extra copy."""
    first: dict[str, int] = {}
    written_twice, read_twice = 0, 0
    seen_positions: set[tuple[int, int]] = set()
    writers: Counter[str] = Counter()
    for i, event_id in enumerate(got.event_ids):
        position = got.positions[i] if i < len(got.positions) else (-1, i)
        if position in seen_positions:
            read_twice += 1
            continue
        seen_positions.add(position)
        if event_id in first:
            written_twice += 1
            writers[got.bridges[i]] += 1
        else:
            first[event_id] = i
    return (
        f"extra copies written at other offsets: {written_twice} (by {dict(writers)}); "
        f"records read twice: {read_twice}"
    )


def check_delivery(
    event_ids: list[str],
    keys: list[str],
    expected: set[str],
    window: int,
    *,
    ordered: bool = True,
    logs: tuple[Path, ...] = (),
    context: str = "",
) -> None:
    """Every expected event once after dedup, duplicates within the window, and each
    device's events in seq order (first occurrence wins, as a consumer dedups). A
    failure names what the bridges' `logs` say about reconnects and produce retries."""
    counts = Counter(event_ids)
    missing = expected - set(counts)
    assert not missing, (
        f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}; "
        f"bridge log: {redelivery_events(*logs)}"
    )
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= window, (
        f"{duplicates} duplicates exceed the in-flight window {window}; "
        f"bridge log: {redelivery_events(*logs)}; {context}"
    )
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
