"""Agents throughput: enrich + dedupe per worker, next to a bare aiokafka loop, same run.

On one embedded stack (Tansu, the registry) this pre-fills `edge.inference.v1` with N
Confluent-framed InferenceEvents from 200 devices (a fifth of them in the fleet table,
and 1% of the records sent twice, which dedupe must drop), then drains that backlog:

- bare: one aiokafka consumer -> producer loop (acks=all, on uvloop) copying the bytes to
  `edge.inference.enriched.v1`, no decoding: the ceiling of any consume -> produce
  worker on this broker and machine;
- Faust floor, stock and lean (edgeloop/bench/faust_floor.py): a Faust app whose one
  agent copies the bytes in `take_events` batches, as the worker's enrich agent takes
  them, with no step in between: what Faust's per-event delivery alone allows, so the
  share of the bare loop a Faust worker built like ours can reach here;
- agents: one `edgeloop agents --no-verdicts` worker process (the Faust app: decode,
  dedupe table with changelog, fleet join, enriched framing, acks=all), timed from its
  first produced record to its last by its own /metrics (events out of the enrich stage).

Targets (issue 9): ≥ 10,000 events/s per worker and ≥ 50% of the bare loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from edgeloop.agents.fleet import FleetClient, new_record
from edgeloop.core.settings import KafkaSettings
from edgeloop.infra.ports import free_port
from edgeloop.infra.stack import Stack, StackOptions
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import TOPICS, subject_for
from edgeloop.streams.topic_admin import ensure_topics

TARGET_RATE = 10_000
TARGET_SHARE = 0.5
DEVICES = 200
SOURCE = "edge.inference.v1"
PARTITIONS = 6  # ensure_topics' default
SINK = "edge.inference.enriched.v1"


def _event(device: str, seq: int) -> dict[str, Any]:
    return {
        "event_id": f"{device}:{seq}", "device_id": device, "seq": seq,
        "ts": 1_700_000_000_000_000 + seq, "model_version": 1, "threshold_version": 3,
        "cohort": "canary", "prediction": 7, "confidence": 0.75, "confidence_kind": "MAX_PROB",
        "probs": [0.025] * 9 + [0.775], "threshold": 0.6, "decision": "LOCAL",
        "exit_index": 0, "latency": {"preprocess_us": 40, "inference_us": 900,
                                     "decision_us": 20}, "frame_ts": None,
    }  # fmt: skip


async def _prefill(bootstrap: str, registry: RegistryClient, n: int) -> int:
    """N events (plus 1% duplicates) on the source topic; returns the distinct count."""
    schema = catalog.get("InferenceEvent")
    schema_id = await registry.register(subject_for(SOURCE), schema.text)
    codec = ConfluentCodec()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024
    )
    await producer.start()
    rng = random.Random(0)  # noqa: S311 - benchmark data
    try:
        per_device = n // DEVICES
        for seq in range(1, per_device + 1):
            for d in range(DEVICES):
                device = f"bench-{d:04d}"
                value = codec.encode(schema_id, schema, _event(device, seq))
                await producer.send(SOURCE, value, key=device.encode())
                if rng.random() < 0.01:
                    await producer.send(SOURCE, value, key=device.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return per_device * DEVICES


async def bare_loop(bootstrap: str, n: int) -> dict[str, float]:
    """Events/s of a plain consume -> produce copy of the backlog (no decoding)."""
    consumer = AIOKafkaConsumer(
        SOURCE, bootstrap_servers=bootstrap, group_id="bench-bare", auto_offset_reset="earliest",
        enable_auto_commit=False, max_poll_records=1000,
    )  # fmt: skip
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await consumer.start()
    await producer.start()
    done = 0
    t0: float | None = None
    cpu0 = 0.0
    try:
        while done < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=1000)
            if t0 is None and batches:
                t0, cpu0 = time.perf_counter(), time.process_time()
            futures = [
                await producer.send("bench.bare.v1", m.value, key=m.key)
                for msgs in batches.values()
                for m in msgs
            ]
            await asyncio.gather(*futures)
            await consumer.commit()
            done += len(futures)
        wall = time.perf_counter() - (t0 or time.perf_counter())
        cpu = time.process_time() - cpu0
        return {"events_per_s": done / wall, "events_per_cpu_s": done / cpu if cpu else 0.0}
    finally:
        await consumer.stop()
        await producer.stop()


async def faust_floor(home: Path, bootstrap: str, n: int, *, lean: bool) -> dict[str, float]:
    """Events/s of the Faust floor process (edgeloop/bench/faust_floor.py) copying the
    backlog; the rates are its own, from its first batch's acknowledgement to its last."""
    variant = "lean" if lean else "stock"
    out = home / f"faust-floor-{variant}.json"
    log = home / f"faust-floor-{variant}.log"
    cmd = [sys.executable, "-m", "edgeloop.bench.faust_floor", "--bootstrap", bootstrap,
           "--source", SOURCE, "--partitions", str(PARTITIONS), "--n", str(n),
           "--out", str(out), "--data-dir", str(home / f"faust-floor-{variant}"),
           "--web-port", str(free_port()), *(["--lean"] if lean else [])]  # fmt: skip
    proc = _start(cmd, log)
    try:
        deadline = time.monotonic() + 600
        while (res := await asyncio.to_thread(_read_json, out)) is None:
            if proc.poll() is not None:
                raise RuntimeError(f"Faust floor ({variant}) exited; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Faust floor ({variant}) did not copy {n} records; see {log}")
            await asyncio.sleep(0.25)
        return {
            "events_per_s": res["records"] / res["seconds"],
            "events_per_cpu_s": res["records"] / res["cpu_s"] if res["cpu_s"] else 0.0,
        }
    finally:
        _stop(proc)


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child; killed when it has not exited 30 s later."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None while it is missing or not yet whole."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _metric(port: int, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{", 1)[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_worker(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "edgeloop", "--log-level", "warning", "agents",
           "--no-verdicts", "--workers-web-port", str(port)]  # fmt: skip
    return _start(cmd, log, env)


async def agents_worker(home: Path, n: int, timeout_s: float = 600) -> dict[str, Any]:
    """Drain the backlog with one worker; events/s from its first output to its last."""
    port = free_port()
    env = {
        **os.environ,
        "EDGELOOP_HOME": str(home),
        "EDGELOOP_AGENTS_APP_ID": "bench-agents",
        "EDGELOOP_AGENTS_DATA_DIR": str(home / "faust"),
    }
    log = home / "agents.log"
    proc = _start_worker(env, port, log)
    try:
        out_name, in_name = "edgeloop_agents_events_out_total", "edgeloop_agents_events_in_total"
        t_first: float | None = None
        deadline = time.monotonic() + timeout_s
        produced = 0.0
        while time.monotonic() < deadline:
            produced = await asyncio.to_thread(_metric, port, out_name, stage="enrich")
            if produced and t_first is None:
                t_first, cpu_first = time.perf_counter(), _cpu_s(proc.pid)
                first = produced
            if produced >= n:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"agents worker exited; see {log}")
            # Each poll renders the worker's /metrics page, CPU the worker would otherwise
            # spend on events (every 50 ms it cost ~4% of a drain); 0.25 s bounds the
            # timing error to under 2% of a 30 s drain.
            await asyncio.sleep(0.25)
        t_last, cpu_last = time.perf_counter(), _cpu_s(proc.pid)
        consumed = await asyncio.to_thread(_metric, port, in_name, stage="enrich")
        dupes = await asyncio.to_thread(_metric, port, "edgeloop_agents_dedupe_hits_total")
        rate = (produced - first) / (t_last - t_first) if t_first and t_last > t_first else 0.0
        cpu = cpu_last - cpu_first if t_first else 0.0
        return {
            "events_per_s": rate,
            "events_per_cpu_s": (produced - first) / cpu if cpu > 0 else 0.0,
            "produced": produced,
            "consumed": consumed,
            "duplicates_dropped": dupes,
        }
    finally:
        _stop(proc)


async def _run(quick: bool) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    home = Path(tempfile.mkdtemp(prefix="edgeloop-bench-agents-"))
    async with Stack(home, StackOptions(kafka="tansu")) as stack:
        stack.write_endpoints()
        bootstrap = stack.kafka.bootstrap
        await ensure_topics(bootstrap)
        assert stack.registry is not None
        async with RegistryClient(stack.registry.url) as registry:
            for spec in TOPICS.values():
                await registry.register(subject_for(spec.name), catalog.get(spec.event).text)
            fleet = FleetClient(KafkaSettings(bootstrap=bootstrap), registry)
            for d in range(0, DEVICES, 5):
                await fleet.write(new_record(f"bench-{d:04d}", cohort="canary"))
            distinct = await _prefill(bootstrap, registry, n)
        bare = await bare_loop(bootstrap, distinct)
        floors = {
            variant: await faust_floor(home, bootstrap, distinct, lean=variant == "lean")
            for variant in ("stock", "lean")
        }
        agents = await agents_worker(home, distinct)
    ok = agents["produced"] >= distinct
    if ok:
        shutil.rmtree(home, ignore_errors=True)
    share = agents["events_per_s"] / bare["events_per_s"] if bare["events_per_s"] else 0.0
    cpu_share = (
        agents["events_per_cpu_s"] / bare["events_per_cpu_s"] if bare["events_per_cpu_s"] else 0.0
    )

    def vs_bare(r: dict[str, float]) -> dict[str, float]:
        rate, cpu = bare["events_per_s"], bare["events_per_cpu_s"]
        return {
            "vs_bare": r["events_per_s"] / rate if rate else 0.0,
            "cpu_vs_bare": r["events_per_cpu_s"] / cpu if cpu else 0.0,
        }

    rows = [
        {"what": "bare aiokafka consume -> produce", **bare, "vs_bare": 1.0, "cpu_vs_bare": 1.0},
        {"what": "Faust floor, stock: take_events -> produce", **floors["stock"],
         **vs_bare(floors["stock"])},
        {"what": "Faust floor, lean (the worker's Faust changes)", **floors["lean"],
         **vs_bare(floors["lean"])},
        {"what": "agents worker: enrich + dedupe", "events_per_s": agents["events_per_s"],
         "events_per_cpu_s": agents["events_per_cpu_s"], "vs_bare": share,
         "cpu_vs_bare": cpu_share},
    ]  # fmt: skip
    return {
        "name": "agents",
        "work_dir": None if ok else str(home),
        "rows": rows,
        # Wall-clock rates move with whatever else the machine runs; events per CPU-second
        # of the process (all its threads) do not, so both are reported.
        "columns": ["what", "events_per_s", "vs_bare", "events_per_cpu_s", "cpu_vs_bare"],
        "runs": {
            "bare_events_per_s": bare,
            "faust_floor": floors,
            "agents": agents,
            "events": distinct,
        },
        "summary": {
            "agents_events_per_s": agents["events_per_s"],
            "share_of_bare": share,
            "lean_faust_floor_share_of_bare": vs_bare(floors["lean"])["vs_bare"],
            "share_of_lean_faust_floor": (
                agents["events_per_s"] / floors["lean"]["events_per_s"]
                if floors["lean"]["events_per_s"]
                else 0.0
            ),
            "agents_events_per_cpu_s": agents["events_per_cpu_s"],
            "cpu_share_of_bare": cpu_share,
            "target_events_per_s": TARGET_RATE,
            "target_share_of_bare": TARGET_SHARE,
            "rate_met": agents["events_per_s"] >= TARGET_RATE,
            "share_met": share >= TARGET_SHARE,
            "all_enriched": ok,
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    # On uvloop, as the worker runs (edgeloop/cli/agents_cmd.py): the bare loop is the
    # ceiling of a consume -> produce worker, so it gets the faster event loop too.
    import uvloop

    return uvloop.run(_run(quick))
