"""One retrain in its own process: `python -m edgeloop.trainer.retrain_job JOB.json OUT.json`.

The trigger consumer runs each retrain as a child process rather than a thread: the
consumer's event loop stays free (torch, ONNX export and quantization hold the GIL for
long stretches), a cancelled consumer can stop the run (a thread cannot be killed), and a
crash or OOM of training leaves the consumer alive to dead-letter the trigger. With
`nproc > 1` the job itself launches torchrun (`run_training`).

JOB.json: {"home", "private_key", "public_key", "request": RetrainRequest fields,
"policy": {"max_clean_drop", "min_drift_gain", "max_p99_ms"}}. OUT.json: retrain()'s report, written
atomically once the run finished (released or refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.core.errors import ConfigError, EdgeloopError


class TrainingFailedError(EdgeloopError):
    """The retrain child process failed or ran out of time; `reason` says which."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RetrainJob:
    home: str
    private_key: str
    public_key: str
    request: dict[str, Any]
    policy: dict[str, float] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> RetrainJob:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"retrain job {path}: {exc}") from exc


def run_job(job: RetrainJob) -> dict[str, Any]:
    from edgeloop.artifacts.signing import load_private_key, load_public_key
    from edgeloop.trainer.budget import EdgeBudget
    from edgeloop.trainer.gate import GatePolicy
    from edgeloop.trainer.home import TrainerHome
    from edgeloop.trainer.retrain import RetrainRequest, retrain

    req = dict(job.request)
    req["hard_examples"] = Path(req["hard_examples"])
    return retrain(
        TrainerHome(Path(job.home)),
        load_private_key(Path(job.private_key)),
        load_public_key(Path(job.public_key)),
        RetrainRequest(**req),
        policy=GatePolicy(
            max_clean_drop=job.policy.get("max_clean_drop", GatePolicy.max_clean_drop),
            min_drift_gain=job.policy.get("min_drift_gain", GatePolicy.min_drift_gain),
            budget=EdgeBudget(max_p99_ms=job.policy.get("max_p99_ms", EdgeBudget.max_p99_ms)),
        ),
    )


async def run_child(
    job_path: Path, out_path: Path, log_path: Path, *, timeout_s: float, grace_s: float
) -> int:
    """Run the job in a child process; its exit code. On timeout or cancellation the
    child's process group gets SIGTERM, then SIGKILL after `grace_s`."""
    with log_path.open("wb") as log_fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgeloop.trainer.retrain_job",
            str(job_path),
            str(out_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_fh,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group: stopping it stops torchrun's workers too.
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout_s):
                return await proc.wait()
        except TimeoutError:
            await _stop_group(proc, grace_s)
            raise TrainingFailedError(
                f"retrain did not finish within {timeout_s}s; stopped",
                reason="training_timeout",
            ) from None
        except asyncio.CancelledError:
            # Shutdown: stop the run, then let the cancellation go on.
            await asyncio.shield(_stop_group(proc, grace_s))
            raise


async def _stop_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:  # JOB.json and OUT.json
        print("usage: python -m edgeloop.trainer.retrain_job JOB.json OUT.json", file=sys.stderr)
        return 2
    out = Path(args[1])
    report = run_job(RetrainJob.load(Path(args[0])))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, sort_keys=True, default=str))
    os.replace(tmp, out)  # the consumer reads a whole report or none
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
