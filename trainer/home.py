"""Where the trainer keeps its state (the `--out DIR` of `models bootstrap` / `train run`).

DIR/store/                       artifact store root (DirectoryStore; serve it over HTTP)
DIR/checkpoints/<model>-v<N>.pt  torch weights of every released model (never shipped)
DIR/runs/<run-id>/               training runs, ONNX staging, report JSON + PNG
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeloop.artifacts.store import DirectoryStore


@dataclass(frozen=True)
class TrainerHome:
    root: Path

    @property
    def store(self) -> DirectoryStore:
        return DirectoryStore(self.root / "store")

    def checkpoint(self, model_name: str, version: int) -> Path:
        return self.root / "checkpoints" / f"{model_name}-v{version}.pt"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id
