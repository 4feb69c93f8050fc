"""Simulated field: hard examples mined from the drifted field pool with the serving models.

Stands in for the fleet + the agents' hard-example router until the Kafka path feeds the
trainer: the serving int8 student "runs on devices", the teacher gives verdicts, and the
router rule (`select_hard`) keeps disagreements, low-confidence samples and an audit draw.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeloop.core.errors import ConfigError
from edgeloop.tasks.digits import get_task
from edgeloop.trainer.export import onnx_logits
from edgeloop.trainer.hard_examples import select_hard
from edgeloop.trainer.home import TrainerHome
from edgeloop.trainer.release import MODEL_FILE, STUDENT_MODEL, TEACHER_MODEL


def _softmax(z: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    probs: npt.NDArray[np.float32] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs


def mine_field_pool(
    home: TrainerHome, out: Path, *, seed: int = 0, limit: int | None = None
) -> dict[str, Any]:
    """Write a HardExampleSet to `out`; return counts by reason and label quality.

    Raises:
        ConfigError: the store holds no student or no teacher (bootstrap never ran).
    """
    pool = get_task("digits").splits(seed).field_pool
    x = pool.x if limit is None else pool.x[:limit]
    store = home.store
    student_v = max(store.versions(STUDENT_MODEL), default=0)
    teacher_v = max(store.versions(TEACHER_MODEL), default=0)
    if student_v == 0 or teacher_v == 0:
        # The same words as `retrain`: an empty store means bootstrap never ran here.
        raise ConfigError(
            f"no serving {STUDENT_MODEL} / {TEACHER_MODEL} in {home.root / 'store'}"
            "; run `edgeloop models bootstrap` first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        s_dir = store.fetch(STUDENT_MODEL, student_v, Path(tmp) / "s")
        t_dir = store.fetch(TEACHER_MODEL, teacher_v, Path(tmp) / "t")
        s_probs = _softmax(onnx_logits(s_dir / MODEL_FILE, x))
        t_probs = _softmax(onnx_logits(t_dir / MODEL_FILE, x))
    hard = select_hard(x, s_probs, t_probs, seed=seed)
    hard.save(out)
    reasons, counts = np.unique(hard.reason, return_counts=True)
    return {
        "pool_size": len(x),
        "hard_examples": len(hard),
        "by_reason": {str(r): int(c) for r, c in zip(reasons, counts, strict=True)},
        # Known here only because the pool is simulated: how often the teacher is right.
        "teacher_label_accuracy_all": float((t_probs.argmax(1) == pool.y[: len(x)]).mean()),
    }
