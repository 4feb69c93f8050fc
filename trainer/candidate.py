"""From trained weights to a gated int8 candidate: export, quantize both ways, measure.

Static (QDQ, calibrated on clean training samples) and dynamic int8 are both built; the
one that passes the gate wins, and between two that pass the more accurate one (drifted +
clean), then the faster. Both variants' numbers are recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeloop.tasks.base import Splits, accuracy
from edgeloop.trainer.budget import BudgetMeasurement, measure
from edgeloop.trainer.export import QuantMode, export_onnx, onnx_logits, quantize, validate_fp32
from edgeloop.trainer.gate import GateDecision, GatePolicy, Scores, decide

CALIBRATION_SAMPLES = 200


def onnx_scores(path: Path, splits: Splits) -> Scores:
    return Scores(
        clean=accuracy(onnx_logits(path, splits.clean_holdout.x), splits.clean_holdout.y),
        drifted=accuracy(onnx_logits(path, splits.drifted_holdout.x), splits.drifted_holdout.y),
    )


def torch_scores(model: nn.Module, splits: Splits) -> Scores:
    model = model.to("cpu").eval()
    with torch.no_grad():
        clean = model(torch.from_numpy(splits.clean_holdout.x)).numpy()
        drifted = model(torch.from_numpy(splits.drifted_holdout.x)).numpy()
    return Scores(
        clean=accuracy(clean, splits.clean_holdout.y),
        drifted=accuracy(drifted, splits.drifted_holdout.y),
    )


@dataclass(frozen=True)
class Variant:
    mode: QuantMode
    path: Path
    scores: Scores
    decision: GateDecision

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "path": str(self.path),
            "scores": asdict(self.scores),
            "gate": self.decision.to_dict(),
        }


@dataclass(frozen=True)
class Candidate:
    fp32_path: Path
    fp32_scores: Scores
    fp32_size_bytes: int
    fp32_budget: BudgetMeasurement
    variants: tuple[Variant, ...]
    chosen: Variant

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp32": {
                "path": str(self.fp32_path),
                "scores": asdict(self.fp32_scores),
                "size_bytes": self.fp32_size_bytes,
                "budget": asdict(self.fp32_budget),
            },
            "variants": [v.to_dict() for v in self.variants],
            "chosen": self.chosen.mode,
            "passed": self.chosen.decision.passed,
        }


def _rank(v: Variant) -> tuple[bool, float, float]:
    return (v.decision.passed, v.scores.drifted + v.scores.clean, -v.decision.budget.p99_ms)


def build_candidate(
    model: nn.Module,
    splits: Splits,
    work_dir: Path,
    *,
    serving: Scores | None,
    policy: GatePolicy | None = None,
) -> Candidate:
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, torch.from_numpy(splits.train.x[:1]), work_dir / "model.fp32.onnx")
    validate_fp32(model, fp32, splits.clean_holdout.x)
    calib = splits.train.x[
        np.random.default_rng(0).permutation(len(splits.train))[:CALIBRATION_SAMPLES]
    ]
    variants = []
    for mode in ("static", "dynamic"):
        path = quantize(fp32, work_dir / f"model.int8-{mode}.onnx", mode, calib)
        scores = onnx_scores(path, splits)
        budget = measure(path, splits.clean_holdout.x, work_dir)
        variants.append(Variant(mode, path, scores, decide(scores, serving, budget, policy)))
    return Candidate(
        fp32_path=fp32,
        fp32_scores=onnx_scores(fp32, splits),
        fp32_size_bytes=fp32.stat().st_size,
        fp32_budget=measure(fp32, splits.clean_holdout.x, work_dir),
        variants=tuple(variants),
        chosen=max(variants, key=_rank),
    )
