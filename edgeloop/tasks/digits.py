"""The task that ships with edgeloop: handwritten digits (scikit-learn `load_digits`).

Splits (fixed, seeded; documented in docs/trainer.md):
  1,797 images are shuffled with `seed`, then cut into
  - train            60 %  clean images the bootstrap models learn from
  - clean_holdout    20 %  clean images: the "do not regress" check of the gate
  - drifted_holdout  20 %  drifted with `DRIFT_SEVERITY`, seed + 1: the "must improve" check
  - field_pool       the train images drifted again (seed + 2): what the fleet "sees" in
                     the field, i.e. new frames of digits the models know, where hard
                     examples come from.
The holdout images are never trained on, clean or drifted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edgeloop.tasks.base import FloatArray, IntArray, Split, Splits
from edgeloop.tasks.drift import DriftConfig, apply_drift

if TYPE_CHECKING:
    from torch import nn

# At 0.5 a clean-trained student drops from ~98 % to ~60 %; the drift-augmented teacher
# stays near 80 %, so its labels are worth learning from.
DRIFT_SEVERITY = 0.5
_TRAIN_FRAC = 0.6
_CLEAN_FRAC = 0.2
# load_digits pixels are integers 0..16.
_PIXEL_MAX = 16.0


def load_raw() -> tuple[npt.NDArray[np.float32], IntArray]:
    """Images (N, 8, 8) in [0, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / _PIXEL_MAX).clip(0.0, 1.0)
    return images, np.asarray(digits.target, dtype=np.int64)


class DigitsTask:
    name = "digits"
    num_classes = 10
    input_shape = (1, 8, 8)

    def preprocess(self, raw: npt.NDArray[np.floating]) -> FloatArray:
        """(N, 8, 8) in [0, 1] -> (N, 1, 8, 8) float32 centred on 0.5 (what the nets expect)."""
        if raw.ndim != 3 or raw.shape[1:] != (8, 8):
            raise ValueError(f"digits preprocess expects (N, 8, 8), got shape {raw.shape}")
        x = np.asarray(raw, dtype=np.float32).clip(0.0, 1.0) - np.float32(0.5)
        return x[:, None, :, :].astype(np.float32)

    def splits(self, seed: int, drift_severity: float = DRIFT_SEVERITY) -> Splits:
        images, labels = load_raw()
        order = np.random.default_rng(seed).permutation(len(labels))
        n_train = int(len(order) * _TRAIN_FRAC)
        n_clean = int(len(order) * _CLEAN_FRAC)
        tr, cl, dr = np.split(order, [n_train, n_train + n_clean])
        drift = DriftConfig(severity=drift_severity)
        drifted = apply_drift(images[dr], drift, seed=seed + 1)
        field = apply_drift(images[tr], drift, seed=seed + 2)
        return Splits(
            train=Split("train", self.preprocess(images[tr]), labels[tr]),
            clean_holdout=Split("clean_holdout", self.preprocess(images[cl]), labels[cl]),
            drifted_holdout=Split("drifted_holdout", self.preprocess(drifted), labels[dr]),
            field_pool=Split("field_pool", self.preprocess(field), labels[tr]),
        )

    def build_student(self) -> nn.Module:
        from edgeloop.tasks.models import EdgeCNN

        return EdgeCNN(self.num_classes)

    def build_teacher(self) -> nn.Module:
        from edgeloop.tasks.models import TeacherCNN

        return TeacherCNN(self.num_classes)


def get_task(name: str) -> DigitsTask:
    """The registry of shipped tasks; plug-ins are passed as objects, not by name."""
    if name != "digits":
        raise ValueError(f"unknown task {name!r}; shipped tasks: digits")
    return DigitsTask()
