"""Trainer benchmark: training throughput, export + quantize time, int8 vs fp32 student
(size, single-sample latency with onnxruntime, 1 intra-op thread), teacher vs student
accuracy. `run(quick)` returns a flat-ish dict; the `edgeloop bench` command prints it
and writes the JSON. Figures are compared within one run, never across machines."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


def run(quick: bool) -> dict[str, Any]:
    # Heavy imports here: `edgeloop bench --help` must not load torch.
    import torch

    from edgeloop.tasks.digits import get_task
    from edgeloop.trainer.budget import measure_latency
    from edgeloop.trainer.candidate import onnx_scores, torch_scores
    from edgeloop.trainer.config import Role, TrainConfig
    from edgeloop.trainer.export import export_onnx, quantize
    from edgeloop.trainer.launch import run_training

    task = get_task("digits")
    splits = task.splits(0)
    student_epochs, teacher_epochs = (10, 3) if quick else (30, 15)
    out: dict[str, Any] = {
        "quick": quick,
        "threads_per_proc": 1,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = {}
        plan: tuple[tuple[Role, int], ...] = (
            ("student", student_epochs),
            ("teacher", teacher_epochs),
        )
        for role, epochs in plan:
            res = run_training(
                TrainConfig(
                    out_dir=str(tmp / role),
                    role=role,
                    epochs=epochs,
                    augment_drift=role == "teacher",
                )
            )
            model = task.build_teacher() if role == "teacher" else task.build_student()
            model.load_state_dict(torch.load(tmp / role / "model.pt"))
            models[role] = model
            out[f"{role}_train_samples_per_s"] = res["samples_per_s"]
            out[f"{role}_epochs"] = epochs
            out[f"{role}_fp32_acc"] = asdict(torch_scores(model, splits))

        t0 = time.perf_counter()
        fp32 = export_onnx(
            models["student"], torch.from_numpy(splits.train.x[:1]), tmp / "student.onnx"
        )
        out["export_s"] = time.perf_counter() - t0
        calib = splits.train.x[:200]
        x = splits.clean_holdout.x
        runs = 200 if quick else 2000
        p50, p99 = measure_latency(fp32, x, runs=runs)
        out["fp32"] = {"size_bytes": fp32.stat().st_size, "p50_ms": p50, "p99_ms": p99}
        for mode in ("static", "dynamic"):
            t0 = time.perf_counter()
            q = quantize(fp32, tmp / f"student-{mode}.onnx", mode, calib)
            elapsed = time.perf_counter() - t0
            p50, p99 = measure_latency(q, x, runs=runs)
            out[f"int8_{mode}"] = {
                "quantize_s": elapsed,
                "size_bytes": q.stat().st_size,
                "p50_ms": p50,
                "p99_ms": p99,
                "acc": asdict(onnx_scores(q, splits)),
                "size_ratio_vs_fp32": q.stat().st_size / out["fp32"]["size_bytes"],
                "p50_ratio_vs_fp32": p50 / out["fp32"]["p50_ms"],
            }
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
