"""One short GPU check: the same DDP training under torchrun on CUDA/NCCL and on CPU/gloo.

Run by trainer/gpu_check.sh on a GPU machine. Prints the interconnect found and training
samples/s on GPU vs CPU (same model, same data, same epochs), and writes the JSON to
$OUT or ./gpu-check.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgeloop.trainer.config import Role, TrainConfig
from edgeloop.trainer.launch import run_training


def _run(role: Role, out: Path, *, cpu: bool, epochs: int, batch: int) -> dict[str, Any]:
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # torchrun workers inherit: no CUDA, gloo
    try:
        cfg = TrainConfig(
            out_dir=str(out),
            role=role,
            epochs=epochs,
            batch_size=batch,
            augment_drift=role == "teacher",
        )
        # torchrun=True even for one process: the check is about the launched DDP path.
        return run_training(cfg, nproc=1, threads_per_proc=4, torchrun=True)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False; nothing to check", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
    }
    with tempfile.TemporaryDirectory() as tmp:
        plan: tuple[tuple[Role, int, int], ...] = (("teacher", 3, 256), ("student", 10, 256))
        for role, epochs, batch in plan:
            gpu = _run(role, Path(tmp) / f"{role}-gpu", cpu=False, epochs=epochs, batch=batch)
            cpu = _run(role, Path(tmp) / f"{role}-cpu", cpu=True, epochs=epochs, batch=batch)
            results[role] = {
                "gpu": gpu,
                "cpu": cpu,
                "gpu_over_cpu": gpu["samples_per_s"] / cpu["samples_per_s"],
            }
    inter = results["teacher"]["gpu"]["interconnect"]
    print(f"GPU: {results['gpu']}  torch {results['torch']}  CUDA {results['cuda']}")
    print(
        f"backend: {results['teacher']['gpu']['backend']} "
        f"(cpu run: {results['teacher']['cpu']['backend']})"
    )
    print(f"interconnect: kind={inter['kind']} gpus={inter['gpus']}")
    if "nvidia_smi_topo" in inter:
        print(inter["nvidia_smi_topo"])
    for role in ("teacher", "student"):
        r = results[role]
        print(
            f"{role}: GPU {r['gpu']['samples_per_s']:.0f} samples/s, "
            f"CPU (4 threads) {r['cpu']['samples_per_s']:.0f} samples/s, "
            f"ratio {r['gpu_over_cpu']:.2f}x"
        )
    out = Path(os.environ.get("OUT", ".")) / "gpu-check.json"
    out.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
