"""Bridge throughput and added latency, next to the limits measured in the same run.

On one embedded stack (Mosquitto, Tansu, the registry) this measures:
- Mosquitto's C clients at QoS 1 (mosquitto_pub → mosquitto_sub): the MQTT ceiling here;
- a bare aiokafka producer (acks=all) on the same broker: the Kafka ceiling here;
- the bridge, 1 and 2 processes: sustained events/s from the first publish to the last
  record in Kafka (every event counted by id), 200-byte events at QoS 1;
- the bridge's added latency (MQTT receive → Kafka ack) at half its sustained rate (the
  lower of the backlog and live figures), from its own histogram
  (`edgeloop_bridge_uplink_added_latency_seconds`) between a scrape after a 2 s warm-up
  and one at the end; p50 and p99 interpolated within buckets as Prometheus'
  histogram_quantile does.

Targets (issue: bridge): one process ≥ 10,000 events/s, ≥ 60% of the C clients' QoS 1
rate, added p99 ≤ 10 ms at half the sustained rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from edgeloop.bench.fleet_load import collect
from edgeloop.core.settings import MqttSettings
from edgeloop.infra.ports import free_port
from edgeloop.infra.stack import Stack, StackOptions
from edgeloop.schemas import catalog
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import TOPICS, subject_for
from edgeloop.streams.topic_admin import ensure_topics

SIZE = 200
TARGET_RATE = 10_000
TARGET_SHARE_OF_C = 0.6
TARGET_P99_MS = 10.0
WARM_UP_S = 2.0


def _edgeloop(home: Path, *args: str, log: Path, **env_extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EDGELOOP_HOME": str(home), **env_extra}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgeloop", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _count(log: Path, text: str) -> int:
    return log.read_text().count(text) if log.exists() else 0


async def _wait_for(log: Path, text: str, times: int = 1, timeout_s: float = 60) -> None:
    """Poll a child's log for a line: the child is another process, no event can tell us."""
    async with asyncio.timeout(timeout_s):
        while await asyncio.to_thread(_count, log, text) < times:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


def _publisher(
    home: Path, prefix: str, devices: int, per_device: int, rate: float | None
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "edgeloop.bench.fleet_load",
        "--home",
        str(home),
        "--devices",
        str(devices),
        "--per-device",
        str(per_device),
        "--size",
        str(SIZE),
        "--prefix",
        prefix,
    ]
    if rate:
        argv += ["--rate", str(rate)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


async def c_clients_qos1(mqtt: MqttSettings, n: int) -> float:
    """mosquitto_pub → mosquitto_sub at QoS 1: messages/s of the C clients on this host."""
    auth = [
        "-h",
        mqtt.host,
        "-p",
        str(mqtt.port),
        "-u",
        mqtt.username or "",
        "-P",
        mqtt.password.get_secret_value() if mqtt.password else "",
    ]
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *auth,
        "-q",
        "1",
        "-t",
        "edgeloop/cbench/up/x",
        "-C",
        str(n),
        "-V",
        "mqttv5",
        stdout=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)
    start = time.perf_counter()
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        *auth,
        "-q",
        "1",
        "-t",
        "edgeloop/cbench/up/x",
        "-m",
        "x" * SIZE,
        "--repeat",
        str(n),
        "-V",
        "mqttv5",
        stdout=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(300):
        await pub.wait()
        await sub.wait()
    return n / (time.perf_counter() - start)


async def bare_kafka(bootstrap: str, n: int) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        payload = b"x" * SIZE
        start = time.perf_counter()
        futures = [
            await producer.send("edge.inference.v1", payload, key=b"kbench-%d" % (i % 50))
            for i in range(n)
        ]
        await asyncio.gather(*futures)
        return n / (time.perf_counter() - start)
    finally:
        await producer.stop()


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """histogram_quantile over cumulative (upper bound, count) pairs, in seconds."""
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            span = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / span if span else 0)
        prev_bound, prev_count = bound, count
    return prev_bound


async def _buckets(metrics_port: int) -> list[tuple[float, float]]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    buckets = []
    for line in text.splitlines():
        if line.startswith("edgeloop_bridge_uplink_added_latency_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
    return sorted(buckets)


def _latency(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> dict[str, float]:
    """Quantiles of what happened between two scrapes (the steady state, not the start)."""
    base = dict(before)
    delta = [(bound, count - base.get(bound, 0.0)) for bound, count in after]
    return {
        "p50_ms": _quantile(delta, 0.5) * 1000,
        "p99_ms": _quantile(delta, 0.99) * 1000,
        "samples": delta[-1][1] if delta else 0,
    }


def _spawn_bridges(
    stack_home: Path, work: Path, processes: int, tag: str, metrics_ports: list[int]
) -> list[subprocess.Popen[bytes]]:
    return [
        _edgeloop(
            stack_home,
            "bridge",
            "--no-downlink",
            "--client-id",
            f"bench-{tag}-{i}",
            "--metrics-port",
            str(metrics_ports[i]),
            log=work / f"bridge-{tag}-{i}.log",
            # A run's own share group: the sessions of earlier runs' bridges stay in
            # theirs and would otherwise receive a share of this run's events.
            EDGELOOP_BRIDGE_SHARE_GROUP=f"bench-{tag}",
        )
        for i in range(processes)
    ]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(30)


async def bridge_run(
    *,
    stack_home: Path,
    bootstrap: str,
    work: Path,
    processes: int,
    n: int,
    tag: str,
    rate: float | None = None,
    backlog: bool = False,
) -> dict[str, Any]:
    """Move n events through `processes` bridges and time it until the last one is in
    Kafka. Live: from the publisher's start. With `backlog`, the events are queued in the
    broker while the bridges are down, and the clock starts when the restarted bridges
    are subscribed: the bridges' own capacity, free of the load generator's limits."""
    ports = [free_port() for _ in range(processes)]
    devices = 50
    bridges = _spawn_bridges(stack_home, work, processes, tag, ports)
    try:
        for i in range(processes):
            await _wait_for(work / f"bridge-{tag}-{i}.log", "mqtt connected")
        if backlog:
            _stop(bridges)  # their sessions, with the subscription, stay in the broker
            pub = _publisher(stack_home, tag, devices, n // devices, rate)
            out, _ = await asyncio.to_thread(pub.communicate, timeout=300)
            bridges = _spawn_bridges(stack_home, work, processes, tag, ports)
            for i in range(processes):
                await _wait_for(work / f"bridge-{tag}-{i}.log", "mqtt connected", times=2)
            start = time.perf_counter()
        else:
            start = time.perf_counter()
            pub = _publisher(stack_home, tag, devices, n // devices, rate)
            if rate:
                # Latency of the steady state: the first seconds (connections, caches,
                # the publisher finding its pace) are left out by a scrape after them.
                # Nothing else of ours (our Kafka reader) takes CPU while it runs.
                await asyncio.sleep(WARM_UP_S)
                before = [await _buckets(p) for p in ports]
                out, _ = await asyncio.to_thread(pub.communicate, timeout=300)
        got = await collect(
            bootstrap, "edge.inference.v1", n, key_prefix=f"{tag}-", timeout_s=600, idle_s=30
        )
        if not backlog and not rate:
            out, _ = await asyncio.to_thread(pub.communicate, timeout=60)
        published = json.loads(out.decode().strip().splitlines()[-1])
        delivered = len(set(got.event_ids))
        elapsed = time.perf_counter() - start
        result: dict[str, Any] = {
            "processes": processes,
            "mode": "backlog" if backlog else "live",
            "events": n,
            "delivered": delivered,
            "events_per_s": delivered / elapsed,
            "publish_events_per_s": published["sent"] / published["seconds"],
        }
        if rate:
            lat = [_latency(b, await _buckets(p)) for b, p in zip(before, ports, strict=True)]
            result |= (
                {"offered_rate": rate, **lat[0]}
                if processes == 1
                else {"offered_rate": rate, "latency_per_process": lat}
            )
        return result
    finally:
        _stop(bridges)


async def _run(quick: bool) -> dict[str, Any]:
    n = 10_000 if quick else 40_000
    home = Path(tempfile.mkdtemp(prefix="edgeloop-bench-bridge-"))
    if True:
        async with Stack(home, StackOptions(kafka="tansu")) as stack:
            stack.write_endpoints()
            bootstrap = stack.kafka.bootstrap
            await ensure_topics(bootstrap)
            assert stack.registry is not None
            async with RegistryClient(stack.registry.url) as registry:
                for spec in TOPICS.values():
                    await registry.register(subject_for(spec.name), catalog.get(spec.event).text)
            mqtt = MqttSettings.load(home)
            c_rate = await c_clients_qos1(mqtt, n)
            kafka_rate = await bare_kafka(bootstrap, n)
            bridges = partial(bridge_run, stack_home=home, bootstrap=bootstrap, work=home)
            one = await bridges(processes=1, n=n, tag="b1", backlog=True)
            live = await bridges(processes=1, n=n, tag="b1l")
            sustained = min(one["events_per_s"], live["events_per_s"])
            half = await bridges(processes=1, n=n, tag="b1h", rate=sustained / 2)
            two = await bridges(processes=2, n=n, tag="b2", backlog=True)
    rows = [
        {"what": "mosquitto C clients, QoS 1", "events_per_s": c_rate},
        {"what": "bare aiokafka producer, acks=all", "events_per_s": kafka_rate},
        {"what": "bridge x1, draining a backlog", "events_per_s": one["events_per_s"]},
        {"what": "bridge x1, live publisher", "events_per_s": live["events_per_s"]},
        {"what": "bridge x2, draining a backlog", "events_per_s": two["events_per_s"]},
    ]
    for row in rows:
        row["vs_c_clients"] = row["events_per_s"] / c_rate
    delivered = all(r["delivered"] == r["events"] for r in (one, live, half, two))
    if delivered:
        shutil.rmtree(home, ignore_errors=True)
    return {
        "name": "bridge",
        # Kept when something was not delivered: the bridges' logs are there.
        "work_dir": None if delivered else str(home),
        "rows": rows,
        "columns": ["what", "events_per_s", "vs_c_clients"],
        "runs": {"one": one, "live": live, "half_rate": half, "two": two},
        "summary": {
            "bridge_x1_events_per_s": one["events_per_s"],
            "bridge_x1_share_of_c_clients": one["events_per_s"] / c_rate,
            "added_p50_ms_at_half_rate": half.get("p50_ms"),
            "added_p99_ms_at_half_rate": half.get("p99_ms"),
            "target_events_per_s": TARGET_RATE,
            "target_share_of_c_clients": TARGET_SHARE_OF_C,
            "target_p99_ms": TARGET_P99_MS,
            "rate_met": one["events_per_s"] >= TARGET_RATE,
            "share_met": one["events_per_s"] / c_rate >= TARGET_SHARE_OF_C,
            "p99_met": (half.get("p99_ms") or 1e9) <= TARGET_P99_MS,
            "all_delivered": delivered,
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(quick))
