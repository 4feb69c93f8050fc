"""The training run's configuration: one frozen object, written to JSON for torchrun workers.

The launcher (CLI or pipeline) builds it once; each torchrun worker reads the same file,
so every rank trains with identical settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from edgeloop.core.errors import ConfigError

Role = Literal["student", "teacher"]


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str
    role: Role = "student"
    task: str = "digits"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64  # per rank
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # Parent weights to fine-tune from (None = train from scratch).
    init_checkpoint: str | None = None
    # Distillation: teacher state dict; its temperature-softened outputs are the soft targets.
    teacher_checkpoint: str | None = None
    distill_alpha: float = 0.5  # weight of the soft-target loss; 1 - alpha on hard labels
    temperature: float = 3.0
    hard_examples: str | None = None
    # Each hard example is seen this many times per epoch: they are few, and what matters.
    hard_repeat: int = 4
    # Teacher-only: train on drift-augmented copies too, so its verdicts hold in the field.
    augment_drift: bool = False
    # Keep only the base data a retrain needs: a fraction of the clean train set (replay).
    replay_fraction: float = 1.0
    # WiSE-FT (Wortsman et al. 2022): the saved weights are (1 - mix) * init checkpoint
    # + mix * fine-tuned weights, a point on the straight line from the parent to the
    # fine-tune; 1 = the fine-tuned weights as trained. Ignored without `init_checkpoint`.
    finetune_mix: float = 1.0
    checkpoint_every: int = 5
    # Rank 0 rewrites this JSON file ({"epoch": done, "epochs": total}) after every epoch,
    # so whoever launched the run can show its progress (`train serve`'s gauges); "" = none.
    progress_path: str = ""

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "distill_alpha": 0.0 <= self.distill_alpha <= 1.0,
            "temperature": self.temperature > 0,
            "hard_repeat": self.hard_repeat >= 1,
            "replay_fraction": 0.0 < self.replay_fraction <= 1.0,
            "role": self.role in ("student", "teacher"),
            "finetune_mix": 0.0 < self.finetune_mix <= 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"train config: invalid {name}={getattr(self, name)!r}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"train config {path}: {exc}") from exc
