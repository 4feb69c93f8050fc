"""Hard examples as the trainer consumes them, independent of where they came from.

Today they come from an `.npz` file (written by `save` or by the simulator); later the
Kafka trigger consumer reads `HardExample` events for a trigger's offset ranges and builds
the same `HardExampleSet`. The training entry takes the set, never a source.

npz keys: x (N, C, H, W float32, preprocessed), label (N int64, the teacher's label),
reason (N str), and optionally soft (N, K float32 teacher probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgeloop.core.errors import ConfigError

REASONS = ("disagreement", "low_confidence", "audit", "drift")


@dataclass(frozen=True)
class HardExampleSet:
    x: npt.NDArray[np.float32]
    label: npt.NDArray[np.int64]
    reason: npt.NDArray[np.str_]

    def __post_init__(self) -> None:
        n = len(self.x)
        if len(self.label) != n or len(self.reason) != n:
            raise ConfigError(
                f"hard examples: {n} inputs, {len(self.label)} labels, "
                f"{len(self.reason)} reasons; they must match"
            )
        unknown = sorted(set(self.reason.tolist()) - set(REASONS))
        if unknown:
            raise ConfigError(f"hard examples: unknown reason(s) {unknown}; known: {REASONS}")

    def __len__(self) -> int:
        return len(self.label)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, x=self.x, label=self.label, reason=self.reason)

    @classmethod
    def load(cls, path: Path) -> HardExampleSet:
        if path.suffix != ".npz":
            raise ConfigError(f"hard examples file {path}: only .npz is supported")
        try:
            with np.load(path, allow_pickle=False) as doc:
                return cls(
                    x=doc["x"].astype(np.float32),
                    label=doc["label"].astype(np.int64),
                    reason=doc["reason"].astype(np.str_),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"hard examples file {path}: {exc}") from exc


def select_hard(
    x: npt.NDArray[np.float32],
    student_probs: npt.NDArray[np.float32],
    teacher_probs: npt.NDArray[np.float32],
    *,
    confidence_threshold: float = 0.8,
    audit_fraction: float = 0.05,
    seed: int = 0,
) -> HardExampleSet:
    """The router's rule, offline: disagreement, low confidence, plus a random audit.

    Labels are the teacher's (the fleet has no ground truth); this is what the agents'
    hard-example router does on the stream, used here by the simulator, tests and bench.
    """
    s_pred, t_pred = student_probs.argmax(1), teacher_probs.argmax(1)
    conf = student_probs.max(1)
    audit = np.random.default_rng(seed).random(len(x)) < audit_fraction
    reason = np.where(
        s_pred != t_pred,
        "disagreement",
        np.where(conf < confidence_threshold, "low_confidence", np.where(audit, "audit", "")),
    )
    keep = reason != ""
    return HardExampleSet(
        x=x[keep], label=t_pred[keep].astype(np.int64), reason=reason[keep].astype(np.str_)
    )
