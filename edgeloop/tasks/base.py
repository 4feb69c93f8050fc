"""The task plug-in contract.

A task bundles what the loop needs to know about one ML problem: how raw samples become
model input (numpy only, so the edge device can run it), how quality is measured, and,
on the cloud side, how to build the student and teacher networks. A user who brings
their own ONNX model implements `Task` with `build_student`/`build_teacher` returning
their torch modules (or raising if they only ship ONNX) and their own `preprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # torch is imported only by the cloud-side model builders
    from torch import nn

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    """Model-ready inputs `x` (N, C, H, W float32) with integer labels `y` (N,)."""

    name: str
    x: FloatArray
    y: IntArray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"split {self.name!r}: {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    """The fixed, seeded splits every training run and every gate decision uses."""

    train: Split
    clean_holdout: Split
    drifted_holdout: Split
    # Raw drifted images not in any holdout: where the "field" hard examples come from.
    field_pool: Split


@runtime_checkable
class Task(Protocol):
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]

    def preprocess(self, raw: npt.NDArray[np.floating]) -> FloatArray:
        """Raw samples (N, H, W) in the sensor's range -> model input (N, C, H, W)."""
        ...

    def splits(self, seed: int) -> Splits:
        """Deterministic given `seed`."""
        ...

    def build_student(self) -> nn.Module: ...

    def build_teacher(self) -> nn.Module: ...


def accuracy(logits_or_pred: npt.NDArray[np.generic], y: IntArray) -> float:
    """Top-1 accuracy from logits (N, K) or predicted labels (N,)."""
    pred = logits_or_pred.argmax(axis=1) if logits_or_pred.ndim == 2 else logits_or_pred
    if len(pred) != len(y):
        raise ValueError(f"accuracy: {len(pred)} predictions for {len(y)} labels")
    return float((pred == y).mean()) if len(y) else 0.0
