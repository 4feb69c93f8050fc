"""Sign a gated model and put it in the artifact store, with its lineage.

The trainer's own state (torch checkpoints, reports) lives beside the store in the
trainer home, never inside a release: devices get the int8 ONNX model and a model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeloop.artifacts.manifest import Lineage, Manifest
from edgeloop.artifacts.signing import DEFAULT_TARGET, sign_artifact
from edgeloop.artifacts.store import ArtifactStore
from edgeloop.trainer.export import INPUT_NAME, OPSET, OUTPUT_NAME

STUDENT_MODEL = "digits-student"
TEACHER_MODEL = "digits-teacher"
TEACHER_TARGET = "cloud-cpu"
MODEL_FILE = "model.onnx"
CARD_FILE = "model-card.json"


def next_version(store: ArtifactStore, model_name: str) -> int:
    return max(store.versions(model_name), default=0) + 1


def publish(
    store: ArtifactStore,
    key: Ed25519PrivateKey,
    *,
    model_name: str,
    onnx_path: Path,
    staging: Path,
    lineage: Lineage,
    card: dict[str, Any],
    target: str = DEFAULT_TARGET,
) -> Manifest:
    """Stage model + card, sign them, store them under the next version."""
    version = next_version(store, model_name)
    stage = staging / f"{model_name}-v{version}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copy2(onnx_path, stage / MODEL_FILE)
    full_card = {
        "model_name": model_name,
        "version": version,
        "opset": OPSET,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        **card,
    }
    (stage / CARD_FILE).write_text(json.dumps(full_card, indent=2, sort_keys=True))
    manifest = sign_artifact(
        stage,
        key,
        model_name=model_name,
        version=version,
        files=[MODEL_FILE, CARD_FILE],
        lineage=lineage,
        target=target,
    )
    store.put(stage)
    return manifest


def rounded(scores: dict[str, float]) -> dict[str, float]:
    # Manifest floats are rounded so the canonical JSON is the same on every platform.
    return {k: round(float(v), 6) for k, v in scores.items()}
