"""The edge budget an int8 model must meet: file size, p99 latency, peak memory.

Latency is single-sample, one intra-op thread (a Pi 5 core runs the model while the others
do I/O), measured after warm-up. Peak memory is the high-water mark of a fresh process's
resident set while it loads the model and runs it, minus its resident set just before
(Linux /proc), so it counts onnxruntime's arenas and the session, not the interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

_PEAK_PROBE = """
import json, sys
import numpy as np, onnxruntime as ort
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)
x = np.load(sys.argv[2])
try:  # reset the high-water mark so import-time peaks do not count (Linux >= 4.0)
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = kib("VmRSS")
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
for i in range(len(x)):
    s.run(None, {s.get_inputs()[0].name: x[i:i+1]})
after = kib("VmHWM")
print(json.dumps({"kib": after - before}))
"""


@dataclass(frozen=True)
class BudgetMeasurement:
    size_bytes: int
    p50_ms: float
    p99_ms: float
    peak_mem_mb: float


@dataclass(frozen=True)
class EdgeBudget:
    """Defaults fit a Pi 5 with headroom for the daemon; measured on the cloud CPU they
    are an upper bound check (a Pi 5 core is ~2-3x slower than a server core)."""

    max_size_bytes: int = 512 * 1024
    max_p99_ms: float = 5.0
    max_peak_mem_mb: float = 64.0

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def measure_latency(
    path: Path, x: npt.NDArray[np.float32], runs: int = 300, warmup: int = 30
) -> tuple[float, float]:
    from edgeloop.trainer.export import INPUT_NAME, session

    sess = session(path, threads=1)
    samples = [x[i % len(x)][None] for i in range(runs + warmup)]
    times = []
    for i, sample in enumerate(samples):
        t0 = time.perf_counter()
        sess.run(None, {INPUT_NAME: sample})
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def measure_peak_memory_mb(path: Path, x: npt.NDArray[np.float32], work_dir: Path) -> float:
    sample_path = work_dir / "budget-samples.npy"
    np.save(sample_path, x[:50])
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(path), str(sample_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    sample_path.unlink(missing_ok=True)
    return float(json.loads(out.stdout)["kib"]) / 1024.0


def measure(path: Path, x: npt.NDArray[np.float32], work_dir: Path) -> BudgetMeasurement:
    p50, p99 = measure_latency(path, x)
    return BudgetMeasurement(
        size_bytes=path.stat().st_size,
        p50_ms=p50,
        p99_ms=p99,
        peak_mem_mb=measure_peak_memory_mb(path, x, work_dir),
    )
