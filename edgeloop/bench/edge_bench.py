"""Edge daemon benchmark: per-frame overhead beyond the model, decision latency, publish
throughput of one device and of a simulated fleet; each next to the raw onnxruntime
`session.run` measured in the same run.

Targets (issue: edge daemon): the daemon adds at most 1 ms p99 per frame beyond the
model run (preprocess + confidence + policy + event encode + the SQLite outbox commit).
The model is the shipped int8 student: the newest in $EDGELOOP_HOME/trainer/store, or
a short bootstrap into a temp dir when there is none.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeloop.artifacts.signing import generate_keypair, load_private_key, load_public_key
from edgeloop.artifacts.verify import verify_artifact
from edgeloop.core.settings import edgeloop_home
from edgeloop.edge.inference import LoadedModel, SessionConfig, load_model
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.outbox import Outbox
from edgeloop.edge.pipeline import INFERENCE, PendingVerdicts, Pipeline
from edgeloop.edge.policy import ByteBudget, OffloadPolicy
from edgeloop.edge.source import Frame
from edgeloop.edge.state import AppliedThreshold
from edgeloop.edge.uplink import LinkConfig, MqttUplink
from edgeloop.schemas.framing import SingleObjectCodec
from edgeloop.tasks.digits import DigitsTask, load_raw

MAX_OVERHEAD_P99_US = 1000.0
STUDENT = "digits-student"


def _find_student(tmp: Path) -> tuple[Path, Path]:
    """(artifact dir, public key): the installed store's newest student, or a bootstrap."""
    home = edgeloop_home()
    model_dir = home / "trainer" / "store" / STUDENT
    pub = home / "keys" / "release.pub"
    versions = sorted(int(p.name) for p in model_dir.glob("[0-9]*")) if model_dir.is_dir() else []
    if versions and pub.exists():
        return model_dir / str(versions[-1]), pub
    from edgeloop.trainer.bootstrap import bootstrap
    from edgeloop.trainer.home import TrainerHome

    priv, pub = generate_keypair(tmp / "keys")
    bootstrap(TrainerHome(tmp / "trainer"), load_private_key(priv), teacher_epochs=1,
              student_epochs=3)  # fmt: skip
    return tmp / "trainer" / "store" / STUDENT / "1", pub


def _pct(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"p50_us": float(p50), "p95_us": float(p95), "p99_us": float(p99)}


def _frame_bench(model: LoadedModel, tmp: Path, frames: int) -> dict[str, dict[str, float]]:
    task = DigitsTask()
    images, _ = load_raw()
    outbox = Outbox(tmp / "bench-outbox.db", capacity=frames * 4)
    pipeline = Pipeline(
        device_id="bench-0", cohort="default", task=task, model=model,
        threshold=AppliedThreshold(1, 0.8, "MAX_PROB", 0.02),
        policy=OffloadPolicy(ByteBudget(1e9, 10**9, time.monotonic()), random.Random(0)),  # noqa: S311
        outbox=outbox, codec=SingleObjectCodec(), metrics=EdgeMetrics(),
        pending=PendingVerdicts(10_000),
    )  # fmt: skip
    raw, total, overhead, inference = [], [], [], []
    for i in range(frames):
        img = images[i % len(images)]
        x = task.preprocess(img[None])
        # Interleaved: the raw run and the daemon's frame see the same machine state.
        t0 = time.perf_counter_ns()
        model.session.run([model.output_name], {model.input_name: x})
        raw.append((time.perf_counter_ns() - t0) / 1000)
        t0 = time.perf_counter_ns()
        outcome = pipeline.process(Frame(img, 0))
        frame_us = (time.perf_counter_ns() - t0) / 1000
        row = outbox.peek(outcome.seq - 1, 1)[0]
        _, event = SingleObjectCodec([INFERENCE]).decode(row.payload)
        inf_us = float(event["latency"]["inference_us"])
        total.append(frame_us)
        inference.append(inf_us)
        overhead.append(frame_us - inf_us)
        if i % 256 == 255:
            # What the uplink and the daemon's checkpointer do, outside the timed frame.
            outbox.ack(r.seq for r in outbox.peek(0, 10_000))
            outbox.checkpoint()
    outbox.close()
    return {
        "raw": _pct(raw),
        "frame": _pct(total),
        "overhead": _pct(overhead),
        "inference": _pct(inference),
    }


async def _drain(uplinks: list[MqttUplink], outboxes: list[Outbox]) -> float:
    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(u.run()) for u in uplinks]
        while any(o.depth for o in outboxes):  # noqa: ASYNC110 - benchmark poll
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        for t in tasks:
            t.cancel()
    return elapsed


async def _publish_bench(tmp: Path, devices: int, per_device: int, window: int) -> float:
    from edgeloop.infra.mosquitto import Mosquitto
    from edgeloop.infra.pki import DevPki

    pki = DevPki(tmp / "pki")
    codec = SingleObjectCodec()
    async with Mosquitto(tmp / f"mosquitto-{devices}", pki) as broker:
        uplinks, outboxes = [], []
        for d in range(devices):
            device = f"bench-{devices}-{d:04d}"
            box = Outbox(tmp / f"pub-{devices}" / f"{device}.db", capacity=per_device + 10)
            for _ in range(per_device):
                box.append("inference", _encoder(codec, device), created_us=time.time_ns() // 1000)
            creds = pki.device_cert(device)

            async def ignore(*_: object) -> None:
                return None

            uplinks.append(MqttUplink(
                LinkConfig(device, broker.host, broker.tls_port, creds.ssl_context(),
                           window=window),
                box, on_downlink=ignore, will=lambda: b"", metrics=EdgeMetrics(),
            ))  # fmt: skip
            outboxes.append(box)
        elapsed = await _drain(uplinks, outboxes)
        for box in outboxes:
            box.close()
    return devices * per_device / elapsed


def _encoder(codec: SingleObjectCodec, device: str) -> Callable[[int], bytes]:
    def encode(seq: int) -> bytes:
        return codec.encode(INFERENCE, _event(device, seq))

    return encode


def _event(device: str, seq: int) -> dict[str, Any]:
    probs = [0.02] * 10
    probs[seq % 10] = 0.82
    return {
        "event_id": f"{device}:{seq}", "device_id": device, "seq": seq,
        "ts": time.time_ns() // 1000, "model_version": 1, "threshold_version": 1,
        "cohort": "default", "prediction": seq % 10, "confidence": 0.82,
        "confidence_kind": "MAX_PROB", "probs": probs, "threshold": 0.8, "decision": "LOCAL",
        "exit_index": 0, "latency": {"preprocess_us": 10, "inference_us": 60, "decision_us": 20},
        "frame_ts": None,
    }  # fmt: skip


def run(quick: bool = False) -> dict[str, Any]:
    frames = 500 if quick else 5000
    one_device = 2000 if quick else 20_000
    fleet_devices, fleet_each = (20, 100) if quick else (100, 200)
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp_name:
        tmp = Path(tmp_name)
        artifact, pub = _find_student(tmp)
        manifest = verify_artifact(artifact, load_public_key(pub), now=None)
        model = load_model(
            artifact, manifest, SessionConfig(1, 1), np.zeros((1, 1, 8, 8), np.float32)
        )
        lat = _frame_bench(model, tmp, frames)
        one = asyncio.run(_publish_bench(tmp, 1, one_device, 64))
        fleet = asyncio.run(_publish_bench(tmp, fleet_devices, fleet_each, 64))
    raw = lat["raw"]
    rows: list[dict[str, Any]] = [
        {"figure": "raw onnxruntime session.run (int8, 1 thread)", **raw},
        {"figure": "session.run inside the daemon's frame", **lat["inference"]},
        {"figure": "frame: preprocess+run+decide+encode+outbox commit", **lat["frame"]},
        {"figure": "daemon overhead beyond session.run", **lat["overhead"]},
    ]
    columns = ["figure", "p50_us", "p95_us", "p99_us"]
    for row in rows:
        row["x_raw_p50"] = row["p50_us"] / raw["p50_us"]
    columns.append("x_raw_p50")
    summary = {
        "overhead_p99_us": lat["overhead"]["p99_us"],
        "overhead_target_p99_us": MAX_OVERHEAD_P99_US,
        "overhead_within_target": lat["overhead"]["p99_us"] <= MAX_OVERHEAD_P99_US,
        "publish_events_per_s_1_device": one,
        f"publish_events_per_s_{fleet_devices}_devices": fleet,
        "publish_1_device_vs_raw_run_rate": one / (1e6 / raw["p50_us"]),
        "model": f"{manifest.model_name} v{manifest.version}",
        "frames": frames,
    }
    return {"rows": rows, "columns": columns, "summary": summary}
