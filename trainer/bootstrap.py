"""`edgeloop models bootstrap`: teacher and student v1 from clean data, released signed.

The teacher is trained on the clean train split plus drift-augmented copies of it (it
answers the fleet's offloads in the field, so it must hold up under drift); the student
v1 only on the clean split, as a model trained before deployment would be.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeloop.artifacts.manifest import Lineage
from edgeloop.tasks.digits import DRIFT_SEVERITY, get_task
from edgeloop.trainer.candidate import build_candidate, torch_scores
from edgeloop.trainer.config import TrainConfig
from edgeloop.trainer.export import export_onnx, onnx_logits, validate_fp32
from edgeloop.trainer.gate import GatePolicy
from edgeloop.trainer.home import TrainerHome
from edgeloop.trainer.launch import run_training
from edgeloop.trainer.release import (
    STUDENT_MODEL,
    TEACHER_MODEL,
    TEACHER_TARGET,
    publish,
    rounded,
)
from edgeloop.trainer.report import write_report

Progress = Callable[[str], None]


def bootstrap(
    home: TrainerHome,
    key: Ed25519PrivateKey,
    *,
    seed: int = 0,
    nproc: int = 1,
    threads: int = 1,
    teacher_epochs: int = 15,
    student_epochs: int = 30,
    policy: GatePolicy | None = None,
    progress: Progress = lambda _step: None,
) -> dict[str, Any]:
    """Train, export, quantize, gate, sign and store; return the report (also on disk)."""
    t_start = time.perf_counter()
    run = home.run_dir("bootstrap")
    shutil.rmtree(run, ignore_errors=True)  # a bootstrap starts over; releases are kept
    task = get_task("digits")
    splits = task.splits(seed)

    progress("train teacher")
    t_res = run_training(
        TrainConfig(
            out_dir=str(run / "teacher"),
            role="teacher",
            seed=seed,
            epochs=teacher_epochs,
            augment_drift=True,
        ),
        nproc=nproc,
        threads_per_proc=threads,
    )
    teacher = task.build_teacher()
    teacher.load_state_dict(torch.load(run / "teacher" / "model.pt"))
    progress("train student")
    s_res = run_training(
        TrainConfig(out_dir=str(run / "student"), role="student", seed=seed, epochs=student_epochs),
        nproc=nproc,
        threads_per_proc=threads,
    )
    student = task.build_student()
    student.load_state_dict(torch.load(run / "student" / "model.pt"))

    progress("export teacher")
    t_onnx = export_onnx(teacher, torch.from_numpy(splits.train.x[:1]), run / "teacher.onnx")
    validate_fp32(teacher, t_onnx, splits.clean_holdout.x)
    teacher_scores = torch_scores(teacher, splits)
    progress("export + quantize student")
    cand = build_candidate(student, splits, run / "student-onnx", serving=None, policy=policy)
    report: dict[str, Any] = {
        "seed": seed,
        "drift_severity": DRIFT_SEVERITY,
        "split_sizes": {
            s.name: len(s)
            for s in (splits.train, splits.clean_holdout, splits.drifted_holdout, splits.field_pool)
        },
        "teacher": {"scores": asdict(teacher_scores), "train": t_res},
        "student": {
            "torch_scores": asdict(torch_scores(student, splits)),
            "train": s_res,
            **cand.to_dict(),
        },
        "released": {},
    }
    if not cand.chosen.decision.passed:
        report["refused"] = list(cand.chosen.decision.reasons)
    else:
        progress("sign + store")
        lineage_common = {
            "trigger_id": "bootstrap",
            "parent_version": None,
            "interconnect": s_res.get("interconnect", {}),
        }
        t_man = publish(
            home.store,
            key,
            model_name=TEACHER_MODEL,
            onnx_path=t_onnx,
            staging=run / "staging",
            target=TEACHER_TARGET,
            lineage=Lineage(**lineage_common, holdout_scores=rounded(asdict(teacher_scores))),
            card={"task": task.name, "precision": "fp32"},
        )
        chosen = cand.chosen
        s_man = publish(
            home.store,
            key,
            model_name=STUDENT_MODEL,
            onnx_path=chosen.path,
            staging=run / "staging",
            lineage=Lineage(
                **lineage_common,
                holdout_scores=rounded(asdict(chosen.scores)),
                extra={"quantization": chosen.mode},
            ),
            card={"task": task.name, "precision": "int8", "quantization": chosen.mode},
        )
        for name, version, src in (
            (TEACHER_MODEL, t_man.version, run / "teacher" / "model.pt"),
            (STUDENT_MODEL, s_man.version, run / "student" / "model.pt"),
        ):
            home.checkpoint(name, version).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, home.checkpoint(name, version))
        report["released"] = {TEACHER_MODEL: t_man.version, STUDENT_MODEL: s_man.version}
    # Agreement of the exported teacher with torch, as a sanity figure in the report.
    report["teacher"]["onnx_clean_acc"] = float(
        (onnx_logits(t_onnx, splits.clean_holdout.x).argmax(1) == splits.clean_holdout.y).mean()
    )
    report["seconds"] = time.perf_counter() - t_start
    bars = {
        "teacher fp32": asdict(teacher_scores),
        "student fp32": asdict(cand.fp32_scores),
        **{f"student int8 {v.mode}": asdict(v.scores) for v in cand.variants},
    }
    write_report(
        report,
        run / "bootstrap-report.json",
        run / "bootstrap-accuracy.png",
        bars,
        "bootstrap: holdout accuracy",
    )
    return report
