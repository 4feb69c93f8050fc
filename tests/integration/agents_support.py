"""Shared by the agents tests: the worker as an operator runs it, and topic readers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from edgeloop.agents.codec import SchemaBook
from edgeloop.infra.ports import free_port
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.registry.client import RegistryClient


class AgentsProcess:
    """One `edgeloop agents` worker process."""

    def __init__(self, home: Path, app_id: str, log: Path, **env: str) -> None:
        self.home = home
        self.app_id = app_id
        self.log = log
        self.port = free_port()
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "EDGELOOP_HOME": str(self.home),
            "EDGELOOP_AGENTS_APP_ID": self.app_id,
            "EDGELOOP_AGENTS_DATA_DIR": str(self.log.parent / f"faust-{self.port}"),
            **self.env,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeloop", "agents", "--workers-web-port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def ready(self, timeout_s: float = 90) -> None:
        """Wait until the worker's stages are up and it holds partitions."""
        async with asyncio.timeout(timeout_s):
            while True:
                text = self.log.read_text(errors="replace")
                assert self.proc is not None and self.proc.poll() is None, text[-5000:]
                # Faust logs "Worker ready" once its partitions are assigned and recovered.
                if "agents ready" in text and "Worker ready" in text:
                    return
                await asyncio.sleep(0.2)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{", 1)[0] != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Read:
    """Decoded records of a topic (duplicates kept), in the order read per partition."""

    records: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    positions: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)

    def ids(self) -> list[str]:
        return [str(r["event_id"]) for r in self.records]


async def read_topic(
    bootstrap: str,
    registry_url: str,
    topic: str,
    *,
    key_prefix: str,
    done: Callable[[Read], bool],
    timeout_s: float = 120,
    settle_s: float = 0.0,
) -> Read:
    """Read `topic` from its start until `done(read)` holds (then `settle_s` more, to see
    any late duplicate) or `timeout_s` passed; records keyed `key_prefix...` only."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out = Read()
    async with RegistryClient(registry_url) as registry:
        book = SchemaBook(registry, DecodeLimits())
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None
        try:
            while time.monotonic() < deadline:
                if settle_until is None and done(out):
                    settle_until = time.monotonic() + settle_s
                if settle_until is not None and time.monotonic() >= settle_until:
                    break
                batches = await consumer.getmany(timeout_ms=300, max_records=5000)
                for records in batches.values():
                    for rec in records:
                        if not (rec.key or b"").startswith(key_prefix.encode()):
                            continue
                        await book.learn(rec.value)
                        out.records.append(book.decode(rec.value)[1])
                        out.keys.append((rec.key or b"").decode())
                        out.positions.append((rec.partition, rec.offset))
        finally:
            await consumer.stop()
    return out


async def produce_raw(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    """Write (key, value) records as they are: duplicates and garbage included."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in items:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def topic_size(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()  # aiokafka: no public refresh
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()


async def where_lost(
    bootstrap: str, group_id: str, source: Read, lost: set[str], topic: str
) -> str:
    """Where the `lost` input ids sit in `topic` (read into `source`), next to `group_id`'s
    committed offset and the end of each partition: tells "never fetched" (lost offsets at
    or past the commit) from "committed past" (lost offsets below it)."""
    by_partition: dict[int, list[int]] = {}
    for record, (partition, offset) in zip(source.records, source.positions, strict=True):
        if str(record["event_id"]) in lost:
            by_partition.setdefault(partition, []).append(offset)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(by_partition)]
        ends = await consumer.end_offsets(tps) if tps else {}
        parts = []
        for tp in tps:
            offsets = sorted(by_partition[tp.partition])
            committed = await consumer.committed(tp)
            parts.append(
                f"p{tp.partition}: lost {len(offsets)} at {offsets[0]}..{offsets[-1]}, "
                f"committed {committed}, end {ends[tp]}"
            )
        return "; ".join(parts)
    finally:
        await consumer.stop()


# The topics every test writes to in volume. The brokers live for the whole test session,
# so a new app id reading them from the start first works through every earlier test's
# records: minutes of them, and its hard-example budget (per minute of processing time)
# spent on them before this test's own arrive.
BUSY_TOPICS = ("edge.inference.v1", "edge.offload.v1", "cloud.verdicts.v1", "ml.hard-examples.v1")


async def start_at_end(
    bootstrap: str, group_id: str, topics: tuple[str, ...] = BUSY_TOPICS
) -> None:
    """Commit `group_id`'s offsets at the current end of `topics`, as an operator does for a
    new app on topics with history (`kafka-consumer-groups --reset-offsets --to-latest`):
    the workers then read only what the test writes after this. Call before they start."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # aiokafka: no public refresh
        tps = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or set()
        ]
        if not tps:
            return
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.commit(dict(ends))
    finally:
        await consumer.stop()


@pytest.fixture
def workers() -> Any:
    """Agents processes a test starts; each is stopped (SIGTERM) after the test."""
    started: list[AgentsProcess] = []
    yield started
    for w in started:
        w.stop()


def listen_addresses(port: int) -> set[str]:
    """The local addresses (IPv4 dotted, IPv6 hex) where a socket listens on `port`, from
    /proc/net/tcp and tcp6 (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                local, state = line.split()[1], line.split()[3]
                addr, _, hex_port = local.partition(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                if len(addr) == 8:  # IPv4, little-endian
                    found.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.add(addr)
    return found
