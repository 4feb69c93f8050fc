"""ONNX Runtime sessions for the device, loaded only from verified artifact dirs.

Inference runs on one worker thread (`InferenceWorker`), never on the event loop: a
session.run of a few hundred microseconds would otherwise delay every MQTT ack and
timer. onnxruntime releases the GIL inside `run`, so the loop keeps going meanwhile.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgeloop.artifacts.manifest import Manifest
from edgeloop.core.errors import EdgeloopError

MODEL_FILE = "model.onnx"
CARD_FILE = "model-card.json"
# Runs on a new session before it serves: the first run allocates and plans.
WARMUP_RUNS = 3


class ModelLoadError(EdgeloopError):
    """A verified artifact could not be turned into a working session."""


@dataclass(frozen=True)
class SessionConfig:
    intra_op_threads: int = 1
    inter_op_threads: int = 1

    def options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn a core of a Pi between frames; we run batch 1.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts


class LoadedModel:
    """One ready session. Immutable once built: a swap replaces the whole object."""

    def __init__(self, manifest: Manifest, path: Path, session: ort.InferenceSession) -> None:
        self.manifest = manifest
        self.path = path
        self.session = session
        self.input_name: str = session.get_inputs()[0].name
        self.output_name: str = session.get_outputs()[0].name

    @property
    def name(self) -> str:
        return self.manifest.model_name

    @property
    def version(self) -> int:
        return self.manifest.version

    def logits(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)


def load_model(
    artifact_dir: Path, manifest: Manifest, config: SessionConfig, example: npt.NDArray[np.float32]
) -> LoadedModel:
    """Build a session from an already verified artifact dir and warm it up.

    `example` is one preprocessed input; its output must be a (1, K) score vector.
    """
    path = artifact_dir / MODEL_FILE
    card = artifact_dir / CARD_FILE
    if card.exists():
        try:
            json.loads(card.read_text())
        except ValueError as exc:
            raise ModelLoadError(f"{card} is not valid JSON: {exc}") from exc
    try:
        session = ort.InferenceSession(
            str(path), sess_options=config.options(), providers=["CPUExecutionProvider"]
        )
        model = LoadedModel(manifest, path, session)
        for _ in range(WARMUP_RUNS):
            out = model.logits(example)
    except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        raise ModelLoadError(
            f"{manifest.model_name} v{manifest.version} at {path} does not run: {exc}"
        ) from exc
    if out.ndim != 2 or out.shape[0] != 1:
        raise ModelLoadError(
            f"{manifest.model_name} v{manifest.version}: expected (1, K) scores, got {out.shape}"
        )
    return model


class InferenceWorker:
    """The one thread models run on; also where the per-frame pipeline runs."""

    def __init__(self, name: str = "edge-inference") -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def now_us() -> int:
    return time.time_ns() // 1000
