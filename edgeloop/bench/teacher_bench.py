"""Teacher benchmark: cloud verdicts/s and per-request latency through `TeacherBatcher`,
micro-batched (several `max_batch` values) next to batch size 1, and next to a bare
`session.run` loop at batch 1, all in the same run on the same session.

Load: `clients` concurrent clients, each asking for one verdict at a time (closed loop):
256, as the worker has the records of a `take()` batch in flight, and 1, where batching
cannot help and only adds its wait (up to `max_wait_s`). Latency is per request, from
`infer` to its answer (queue wait + batch wait + the batch's run). Each configuration runs
`rounds` times, interleaved with the others so all see the same machine state; the round
with the best throughput is reported with its own latencies.

The teacher is the newest `digits-teacher` in $EDGELOOP_HOME/trainer/store (verified with
$EDGELOOP_HOME/keys/release.pub); without one, the shipped architecture (`TeacherCNN`,
untrained: the graph, not the weights, sets the cost) is exported and released into a
temp store, and verified and loaded the same way.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
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
COLUMNS = [
    "config", "clients", "max_batch", "max_wait_ms", "verdicts_per_s", "p50_ms", "p99_ms",
    "mean_batch",
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


def _bare(model: TeacherModel, xs: np.ndarray, n: int) -> dict[str, float]:
    """session.run at batch 1 in a plain loop: no asyncio, no queue, no thread hop."""
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        model.predict(xs[i % len(xs)][None])
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    return _figures(n / wall, lat, 1.0)


def _figures(rate: float, lat: list[float], mean_batch: float) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(lat) * 1000, [50, 99])
    return {
        "verdicts_per_s": rate,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "mean_batch": mean_batch,
    }


async def _batched(
    model: TeacherModel, xs: np.ndarray, n: int, *, max_batch: int, max_wait_s: float, clients: int
) -> dict[str, float]:
    from edgeloop.agents.teacher import TeacherBatcher

    batcher = TeacherBatcher(model, max_batch=max_batch, max_wait_s=max_wait_s)
    lat: list[float] = []
    per_client = n // clients

    async def client(c: int) -> None:
        for i in range(per_client):
            s = time.perf_counter()
            await batcher.infer(xs[(c * per_client + i) % len(xs)])
            lat.append(time.perf_counter() - s)

    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(batcher.run())
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for c in range(clients):
                group.create_task(client(c))
        wall = time.perf_counter() - t0
        runner.cancel()
    return _figures(len(lat) / wall, lat, batcher.stats.mean_batch)


def run(quick: bool) -> dict[str, Any]:
    from edgeloop.tasks.digits import DigitsTask

    n = 2_048 if quick else 16_384
    rounds = 1 if quick else 3
    xs = DigitsTask().splits(0).clean_holdout.x
    with tempfile.TemporaryDirectory() as tmp_name:
        model, source = _load(Path(tmp_name))
        model.predict(xs[:64])  # warm the session at the largest batch shape
        configs: list[tuple[str, int, float, int]] = [
            ("batch 1 (no batching)", 1, 0.0, CONCURRENCY),
            *[(f"micro-batch {b}", b, MAX_WAIT_S, CONCURRENCY) for b in BATCH_SIZES],
            # No wait: a batch is whatever queued while the previous one ran.
            ("micro-batch 64, no wait", 64, 0.0, CONCURRENCY),
            ("batch 1, one client", 1, 0.0, LIGHT),
            ("micro-batch 64, one client", 64, MAX_WAIT_S, LIGHT),
            ("micro-batch 64, no wait, one client", 64, 0.0, LIGHT),
        ]
        best: dict[str, dict[str, float]] = {}
        for _ in range(rounds):
            figs = {"bare session.run, batch 1": _bare(model, xs, n // 4)}
            for label, max_batch, wait, clients in configs:
                requests = n if clients > LIGHT else n // 16  # one client is slow by design
                f = asyncio.run(
                    _batched(model, xs, requests, max_batch=max_batch, max_wait_s=wait,
                             clients=clients)
                )  # fmt: skip
                figs[label] = {"clients": clients, "max_batch": max_batch,
                               "max_wait_ms": wait * 1000, **f}  # fmt: skip
            figs["bare session.run, batch 1"] |= {"clients": 1, "max_batch": 1, "max_wait_ms": 0}
            for label, f in figs.items():
                if label not in best or f["verdicts_per_s"] > best[label]["verdicts_per_s"]:
                    best[label] = f
    rows: list[dict[str, Any]] = [{"config": label, **f} for label, f in best.items()]
    one = best["batch 1 (no batching)"]["verdicts_per_s"]
    loaded = [r for r in rows if r["config"].startswith("micro") and r["clients"] > LIGHT]
    top = max(loaded, key=lambda r: float(r["verdicts_per_s"]))
    return {
        "quick": quick,
        "teacher": source,
        "requests_per_config": n,
        "concurrency": CONCURRENCY,
        "rounds": rounds,
        "intra_op_threads": 1,
        "columns": COLUMNS,
        "labels": {"verdicts_per_s": "verdicts/s", "p50_ms": "p50 ms", "p99_ms": "p99 ms"},
        "rows": rows,
        "summary": {
            "best_micro_batch": top["config"],
            "speedup_vs_batch_1": top["verdicts_per_s"] / one,
            "p99_ratio_vs_batch_1": top["p99_ms"] / best["batch 1 (no batching)"]["p99_ms"],
            "one_client_p50_added_ms": best["micro-batch 64, one client"]["p50_ms"]
            - best["batch 1, one client"]["p50_ms"],
            "no_wait_speedup_vs_batch_1": best["micro-batch 64, no wait"]["verdicts_per_s"] / one,
        },
    }
