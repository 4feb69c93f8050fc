"""Which GPU interconnect the trainer runs on; recorded in every release's lineage."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any


def _nvidia_smi_topo() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "topo", "-m"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # nvidia-smi underlines the header with ANSI codes; lineage wants plain text.
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout) if out.returncode == 0 else None


def topo_has_nvlink(topo: str) -> bool:
    """True when the `nvidia-smi topo -m` matrix has an NV<n> cell (bonded NVLinks).

    The legend line "NV#" is not a link; only NV followed by digits counts."""
    return any(tok.startswith("NV") and tok[2:].isdigit() for tok in topo.split())


def detect_interconnect() -> dict[str, Any]:
    """{"kind": "nvlink" | "pcie" | "single-gpu" | "none", "gpus": n, ...}.

    nvlink: `nvidia-smi topo -m` shows NV# links between GPUs; pcie: peers reachable
    (can_device_access_peer) without NVLink, or not reachable at all; single-gpu: one GPU
    (nothing to interconnect); none: no CUDA.
    """
    import torch

    if not torch.cuda.is_available():
        return {"kind": "none", "gpus": 0, "backend": "gloo"}
    n = torch.cuda.device_count()
    info: dict[str, Any] = {
        "gpus": n,
        "backend": "nccl",
        "names": [torch.cuda.get_device_name(i) for i in range(n)],
    }
    topo = _nvidia_smi_topo()
    if topo is not None:
        info["nvidia_smi_topo"] = topo.strip()
    if n < 2:
        info["kind"] = "single-gpu"
        return info
    peer = {
        f"{i}->{j}": bool(torch.cuda.can_device_access_peer(i, j))
        for i in range(n)
        for j in range(n)
        if i != j
    }
    info["peer_access"] = peer
    nvlink = topo is not None and topo_has_nvlink(topo)
    info["kind"] = "nvlink" if nvlink else "pcie"
    return info
