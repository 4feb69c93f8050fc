"""Start a training run: in this process (nproc 1, no torchrun) or under torchrun.

`run_training` is the one entry point the CLI, the bootstrap and the retrain pipeline use.
It takes a config whose `hard_examples` points at a file, whatever produced the file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeloop.core.errors import ConfigError, EdgeloopError
from edgeloop.trainer.config import TrainConfig


class TrainingFailedError(EdgeloopError):
    """A torchrun worker exited non-zero; the message carries the tail of its output."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_training(
    cfg: TrainConfig, *, nproc: int = 1, threads_per_proc: int = 1, torchrun: bool | None = None
) -> dict[str, Any]:
    """Train and return train-result.json's content. `torchrun` defaults to nproc > 1."""
    import torch

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        # One process per GPU: more processes than GPUs would share a device under NCCL.
        raise ConfigError(f"--nproc {nproc} > {torch.cuda.device_count()} visible GPUs")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train-config.json"
    cfg.save(cfg_path)
    if not (torchrun if torchrun is not None else nproc > 1):
        from edgeloop.trainer.ddp import train

        torch.set_num_threads(threads_per_proc)
        train(cfg)
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{_free_port()}",
            "-m",
            "edgeloop.trainer.ddp",
            str(cfg_path),
        ]
        env = {
            **os.environ,
            "EDGELOOP_TRAIN_THREADS": str(threads_per_proc),
            "OMP_NUM_THREADS": str(threads_per_proc),
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        (out / "torchrun.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise TrainingFailedError(
                f"torchrun exited {proc.returncode}; see {out}/torchrun.log:"
                f"\n{(proc.stdout + proc.stderr)[-2000:]}"
            )
    return dict(json.loads((out / "train-result.json").read_text()))
