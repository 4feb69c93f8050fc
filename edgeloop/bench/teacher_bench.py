"""Teacher benchmark: cloud verdicts/s and per-request latency through `TeacherBatcher`,
micro-batched (several `max_batch` values) next to batch size 1, and next to a bare
`session.run` loop at batch 1, all in the same run on the same session.

Load: `clients` concurrent clients, each asking for one verdict at a time (closed loop):
256, as the worker has the records of a `take()` batch in flight, and 1, where batching
cannot help and only adds its wait (up to `max_wait_s`); and open-loop arrivals at a
fixed rate below batch-1 capacity (clients = 0), where the wait trades latency for CPU.
CPU per verdict is the process's CPU time (all threads) over the verdicts answered.
Latency is per request, from `infer` to its answer (queue wait + batch wait + the batch's
run). Each configuration runs `rounds` times, interleaved with the others so all see the
same machine state; the round with the best throughput is reported with its own latencies.

The teacher is the newest `digits-teacher` in $EDGELOOP_HOME/trainer/store (verified with
$EDGELOOP_HOME/keys/release.pub); without one, the shipped architecture (`TeacherCNN`,
untrained: the graph, not the weights, sets the cost) is exported and released into a
temp store, and verified and loaded the same way.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeloop.core.settings import edgeloop_home

if TYPE_CHECKING:
    from edgeloop.agents.teacher import TeacherModel

BATCH_SIZES = (8, 32, 64)
MAX_WAIT_S = 0.005  # the batcher's default
# Requests in flight: a loaded worker (a take() batch of records) and a single client,
# where micro-batching can only add its wait.
CONCURRENCY = 256
LIGHT = 1
# Open-loop arrivals (clients = 0 in the table): below batch-1 capacity, where the wait
# only trades latency for fewer, bigger batches (CPU per verdict).
OPEN_RATE = 1000.0
COLUMNS = [
    "config", "load", "max_batch", "max_wait_ms", "verdicts_per_s", "p50_ms", "p99_ms",
    "mean_batch", "cpu_us_per_verdict",
]  # fmt: skip


def _load(tmp: Path) -> tuple[TeacherModel, str]:
    from edgeloop.agents.teacher import TEACHER_NAME, load_teacher
    from edgeloop.artifacts.signing import generate_keypair, load_private_key, load_public_key
    from edgeloop.artifacts.store import DirectoryStore

    home = edgeloop_home()
    store = DirectoryStore(home / "trainer" / "store")
    pub = home / "keys" / "release.pub"
    if store.versions(TEACHER_NAME) and pub.exists():
        model = load_teacher(store, public_key=load_public_key(pub))
        return model, f"{store.root} v{model.version}"

    import torch

    from edgeloop.artifacts.manifest import Lineage
    from edgeloop.tasks.digits import DigitsTask
    from edgeloop.trainer.export import export_onnx
    from edgeloop.trainer.release import TEACHER_TARGET, publish

    torch.manual_seed(0)
    task = DigitsTask()
    onnx = export_onnx(
        task.build_teacher(), torch.zeros((1, *task.input_shape)), tmp / "teacher.onnx"
    )
    priv, pub = generate_keypair(tmp / "keys")
    store = DirectoryStore(tmp / "store")
    publish(
        store, load_private_key(priv), model_name=TEACHER_NAME, onnx_path=onnx,
        staging=tmp / "staging", lineage=Lineage(trigger_id="bench"),
        card={"task": task.name, "precision": "fp32"}, target=TEACHER_TARGET,
    )  # fmt: skip
    return load_teacher(store, public_key=load_public_key(pub)), "untrained TeacherCNN (temp)"


@dataclass(frozen=True)
class Load:
    """`clients` closed-loop clients, or (clients=0) open-loop arrivals at `rate` per s."""

    label: str
    max_batch: int
    max_wait_s: float
    clients: int
    rate: float = 0.0


def _bare(model: TeacherModel, xs: np.ndarray, n: int) -> dict[str, float]:
    """session.run at batch 1 in a plain loop: no asyncio, no queue, no thread hop."""
    lat = []
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        model.predict(xs[i % len(xs)][None])
        lat.append(time.perf_counter() - s)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return _figures(n / wall, lat, 1.0, cpu / n)


def _figures(rate: float, lat: list[float], mean_batch: float, cpu_s: float) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(lat) * 1000, [50, 99])
    return {
        "verdicts_per_s": rate,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "mean_batch": mean_batch,
        "cpu_us_per_verdict": cpu_s * 1e6,
    }


async def _batched(model: TeacherModel, xs: np.ndarray, n: int, load: Load) -> dict[str, float]:
    from edgeloop.agents.teacher import TeacherBatcher

    batcher = TeacherBatcher(model, max_batch=load.max_batch, max_wait_s=load.max_wait_s)
    lat: list[float] = []

    async def one(i: int, sent: float) -> None:
        await batcher.infer(xs[i % len(xs)])
        lat.append(time.perf_counter() - sent)

    async def client(c: int, count: int) -> None:
        for i in range(count):
            await one(c * count + i, time.perf_counter())

    async def arrivals(group: asyncio.TaskGroup) -> None:
        # Requests are due at i / rate; each wake-up sends every request now due, timed
        # from when it was due (so a late wake-up counts against the batcher, not for it).
        start = time.perf_counter()
        for i in range(n):
            due = start + i / load.rate
            if (ahead := due - time.perf_counter()) > 0:
                await asyncio.sleep(ahead)
            group.create_task(one(i, due))

    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(batcher.run())
        c0, t0 = time.process_time(), time.perf_counter()
        async with asyncio.TaskGroup() as group:
            if load.clients:
                for c in range(load.clients):
                    group.create_task(client(c, n // load.clients))
            else:
                await arrivals(group)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        runner.cancel()
    return _figures(len(lat) / wall, lat, batcher.stats.mean_batch, cpu / len(lat))


def _loads() -> list[Load]:
    rate = f"{OPEN_RATE:.0f}/s"
    return [
        Load("batch 1", 1, 0.0, CONCURRENCY),
        *[Load(f"micro-batch {b}", b, MAX_WAIT_S, CONCURRENCY) for b in BATCH_SIZES],
        # No wait: a batch is whatever queued while the previous one ran.
        Load("micro-batch 64, no wait", 64, 0.0, CONCURRENCY),
        Load("batch 1, one client", 1, 0.0, LIGHT),
        Load("micro-batch 64, one client", 64, MAX_WAIT_S, LIGHT),
        Load("micro-batch 64, no wait, one client", 64, 0.0, LIGHT),
        Load(f"batch 1, {rate}", 1, 0.0, 0, OPEN_RATE),
        Load(f"micro-batch 64, {rate}", 64, MAX_WAIT_S, 0, OPEN_RATE),
        Load(f"micro-batch 64, no wait, {rate}", 64, 0.0, 0, OPEN_RATE),
    ]


def _load_name(load: Load) -> str:
    if not load.clients:
        return f"{load.rate:.0f}/s open"
    return f"{load.clients} client" + ("s" if load.clients > 1 else "")


def run(quick: bool) -> dict[str, Any]:
    from edgeloop.tasks.digits import DigitsTask

    n = 2_048 if quick else 16_384
    rounds = 1 if quick else 3
    xs = DigitsTask().splits(0).clean_holdout.x
    with tempfile.TemporaryDirectory() as tmp_name:
        model, source = _load(Path(tmp_name))
        model.predict(xs[:64])  # warm the session at the largest batch shape
        best: dict[str, dict[str, Any]] = {}
        for _ in range(rounds):
            bare = _bare(model, xs, n // 4)
            base = {"config": "session.run", "load": "1 client", "clients": 1, "max_batch": 1,
                    "max_wait_ms": 0}  # fmt: skip
            figs: dict[str, dict[str, Any]] = {"bare session.run": base | bare}
            for load in _loads():
                # One client is slow by design (and open loop takes n / rate seconds).
                requests = n if load.clients > LIGHT else n // 8
                got = asyncio.run(_batched(model, xs, requests, load))
                figs[load.label] = {"config": "batcher", "load": _load_name(load),
                                    "clients": load.clients, "max_batch": load.max_batch,
                                    "max_wait_ms": load.max_wait_s * 1000, **got}  # fmt: skip
            for label, f in figs.items():
                if label not in best or f["verdicts_per_s"] > best[label]["verdicts_per_s"]:
                    best[label] = f
    rows: list[dict[str, Any]] = [{"name": label, **f} for label, f in best.items()]
    one = best["batch 1"]["verdicts_per_s"]
    loaded = [r for r in rows if r["name"].startswith("micro") and r["clients"] > LIGHT]
    top = max(loaded, key=lambda r: float(r["verdicts_per_s"]))
    return {
        "quick": quick,
        "teacher": source,
        "requests_per_config": n,
        "concurrency": CONCURRENCY,
        "rounds": rounds,
        "intra_op_threads": 1,
        "columns": COLUMNS,
        "labels": {
            "verdicts_per_s": "verdicts/s",
            "p50_ms": "p50 ms",
            "p99_ms": "p99 ms",
            "cpu_us_per_verdict": "cpu us/verdict",
        },
        "rows": rows,
        "summary": {
            "best_micro_batch": top["name"],
            "speedup_vs_batch_1": top["verdicts_per_s"] / one,
            "p99_ratio_vs_batch_1": top["p99_ms"] / best["batch 1"]["p99_ms"],
            "one_client_p50_added_ms": best["micro-batch 64, one client"]["p50_ms"]
            - best["batch 1, one client"]["p50_ms"],
            "no_wait_speedup_vs_batch_1": best["micro-batch 64, no wait"]["verdicts_per_s"] / one,
        },
    }
