"""The training worker that torchrun starts, one process per GPU (or N CPU processes).

    python -m torch.distributed.run --nproc-per-node N -m edgeloop.trainer.ddp CONFIG.json

NCCL when CUDA is present, gloo otherwise. Deterministic: the same config and seed give
the same weights (bit for bit on CPU; on GPU with deterministic kernels). Rank 0 writes
checkpoints (resumed automatically) and the final `model.pt` + `train-result.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from edgeloop.tasks.digits import get_task
from edgeloop.tasks.drift import DriftConfig, apply_drift
from edgeloop.trainer.config import TrainConfig
from edgeloop.trainer.hard_examples import HardExampleSet
from edgeloop.trainer.interconnect import detect_interconnect


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # third-party code may use the global generator
    # cuBLAS needs this for deterministic GEMMs; must be set before the first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _augment_for_teacher(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Drifted copies at several severities: the teacher must be right in the field.

    Seeds differ from the ones the splits use, so the teacher never sees a holdout image."""
    raw = x[:, 0] + np.float32(0.5)
    copies = [x]
    for k, severity in enumerate((0.3, 0.5, 0.7)):
        drifted = apply_drift(raw, DriftConfig(severity=severity), seed=seed + 100 + k)
        copies.append((drifted - np.float32(0.5))[:, None].astype(np.float32))
    return np.concatenate(copies), np.concatenate([y] * len(copies))


def build_dataset(cfg: TrainConfig) -> TensorDataset:
    """Base training set (replay) + hard examples, flagged so the loss can tell them apart."""
    splits = get_task(cfg.task).splits(cfg.seed)
    x, y = splits.train.x, splits.train.y
    if cfg.replay_fraction < 1.0:
        keep = np.random.default_rng(cfg.seed).permutation(len(y))[
            : int(len(y) * cfg.replay_fraction)
        ]
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    if cfg.augment_drift:
        x, y = _augment_for_teacher(x, y, cfg.seed)
    is_hard = np.zeros(len(y), dtype=np.bool_)
    if cfg.hard_examples:
        hard = HardExampleSet.load(Path(cfg.hard_examples))
        x = np.concatenate([x, *([hard.x] * cfg.hard_repeat)])
        y = np.concatenate([y, *([hard.label] * cfg.hard_repeat)])
        is_hard = np.concatenate([is_hard, np.ones(len(hard) * cfg.hard_repeat, np.bool_)])
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(is_hard))


def _loss(
    logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None, cfg: TrainConfig
) -> torch.Tensor:
    hard_loss = F.cross_entropy(logits, y)
    if teacher_logits is None:
        return hard_loss
    t = cfg.temperature
    # Hinton et al.: KL on softened distributions, scaled by T^2 to keep gradient size.
    soft = F.kl_div(
        F.log_softmax(logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    return cfg.distill_alpha * soft + (1.0 - cfg.distill_alpha) * hard_loss


def _state_bytes_hash(model: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _setup() -> tuple[bool, torch.device, int, int]:
    """(distributed, device, rank, world): NCCL on CUDA, gloo on CPU; one GPU per process."""
    distributed = "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", device_id=device if cuda else None
        )
        return True, device, dist.get_rank(), dist.get_world_size()
    return False, device, 0, 1


def _models(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    task = get_task(cfg.task)
    model = (task.build_teacher() if cfg.role == "teacher" else task.build_student()).to(device)
    if cfg.init_checkpoint:
        model.load_state_dict(torch.load(cfg.init_checkpoint, map_location=device))
    teacher: nn.Module | None = None
    if cfg.teacher_checkpoint and cfg.role == "student":
        teacher = task.build_teacher().to(device)
        teacher.load_state_dict(torch.load(cfg.teacher_checkpoint, map_location=device))
        teacher.eval()
    return model, teacher


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run on every rank; returns the result dict (meaningful on rank 0)."""
    distributed, device, rank, world = _setup()
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, teacher = _models(cfg, device)
    ddp: nn.Module = model
    if distributed:
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dataset = build_dataset(cfg)
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)

    ckpt_path = out / "checkpoint.pt"
    start_epoch = 0
    if ckpt_path.exists():  # resume after a crash or preemption
        ckpt = torch.load(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"]) + 1

    samples, t0 = 0, time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)  # a different, seeded shuffle each epoch, same on every rank
        ddp.train()
        for x_cpu, y_cpu, _hard in loader:
            xb, yb = x_cpu.to(device, non_blocking=True), y_cpu.to(device, non_blocking=True)
            with torch.no_grad():
                t_logits = teacher(xb) if teacher is not None else None
            loss = _loss(ddp(xb), yb, t_logits, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            samples += len(yb)
        if rank == 0 and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, tmp
            )
            tmp.replace(ckpt_path)  # atomic: a crash mid-write keeps the previous checkpoint
        if rank == 0 and cfg.progress_path:
            _write_progress(Path(cfg.progress_path), epoch + 1, cfg.epochs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "role": cfg.role,
        "world_size": world,
        "device": device.type,
        "backend": ("nccl" if device.type == "cuda" else "gloo") if distributed else "none",
        "epochs": cfg.epochs,
        "dataset_size": len(dataset),
        # Global throughput: every rank processed about the same number of samples.
        "samples_per_s": samples * world / elapsed if elapsed > 0 else 0.0,
        "train_seconds": elapsed,
    }
    if rank == 0:
        model = model.to("cpu")
        if cfg.init_checkpoint and cfg.finetune_mix < 1.0:
            # After the last checkpoint: a resumed run mixes the same trained weights.
            mix_with_parent(model, cfg.init_checkpoint, cfg.finetune_mix)
        _finish(model, out, result)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def mix_with_parent(model: nn.Module, init_checkpoint: str, mix: float) -> None:
    """WiSE-FT (Wortsman et al. 2022): weights <- (1 - mix) * parent + mix * fine-tuned.

    A fine-tune on a few hundred drifted hard examples gains most of its drifted accuracy
    well before the end of the straight line from the parent, while the clean accuracy it
    loses grows along it; a point between keeps most of the gain and most of the parent's
    clean accuracy (docs/trainer.md, "Retraining", has the measurements).

    Args:
        model: the fine-tuned model, on the CPU; changed in place.
        init_checkpoint: the parent's state dict (the fine-tune's starting point).
        mix: weight of the fine-tuned weights, in (0, 1].

    Raises:
        KeyError: the checkpoint lacks one of the model's tensors.
    """
    parent = torch.load(init_checkpoint, map_location="cpu")
    mixed = {
        name: (1.0 - mix) * parent[name] + mix * value if value.is_floating_point() else value
        for name, value in model.state_dict().items()
    }
    model.load_state_dict(mixed)


def _write_progress(path: Path, done: int, total: int) -> None:
    """Epochs done, for the launcher's progress display; a reader sees a whole file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"epoch": done, "epochs": total}))
    tmp.replace(path)


def _finish(model: nn.Module, out: Path, result: dict[str, Any]) -> None:
    model_cpu = model.to("cpu")
    torch.save(model_cpu.state_dict(), out / "model.pt")
    result["state_sha256"] = _state_bytes_hash(model_cpu)
    result["interconnect"] = detect_interconnect()
    (out / "train-result.json").write_text(json.dumps(result, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edgeloop.trainer.ddp CONFIG.json", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("EDGELOOP_TRAIN_THREADS", "1"))))
    train(TrainConfig.load(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
