"""Applied control state (threshold, model version) persisted across reboots.

A JSON file replaced atomically (write a temp file, fsync, rename, fsync the folder):
a power cut leaves the old or the new state, never half of one. Written only when a
ThresholdUpdate or a model swap is applied, so its cost does not matter.

Writers run on two threads: the event loop (threshold updates, withdrawn versions) and the
model updater's worker threads (`asyncio.to_thread`: a model swap, a refusal). `StateFile`
serialises them with a lock around each read-modify-write: without it two writers shared
the temp file (one's rename found it gone: FileNotFoundError, the daemon stopped) and the
slower one wrote back a state that lacked the other's change (a swapped model's version or
a withdrawn version lost at the next reboot).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgeloop.core.errors import ConfigError


@dataclass(frozen=True)
class AppliedThreshold:
    version: int
    tau: float
    confidence_kind: str  # ConfidenceKind symbol, e.g. MAX_PROB
    audit_rate: float
    scope: str = "UNKNOWN"


@dataclass(frozen=True)
class DeviceState:
    threshold: AppliedThreshold
    model_version: int = 0
    # Why the last model release was not applied (reported in DeviceStatus.last_error).
    last_refusal: str | None = None
    # Versions a ROLLBACK withdrew (newest last, at most MAX_WITHDRAWN): never installed
    # again by a CANARY/WAVE/FULL, so a redelivered release cannot undo a rollback.
    withdrawn: tuple[int, ...] = ()


# Old entries matter little: a release older than the running version is refused anyway.
MAX_WITHDRAWN = 32


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateFile:
    def __init__(self, path: Path, default: DeviceState) -> None:
        self.path = path
        self.current = self._load(default)
        # One writer at a time, from any thread (module docstring); reentrant: update saves.
        self._lock = threading.RLock()

    def _load(self, default: DeviceState) -> DeviceState:
        if not self.path.exists():
            return default
        try:
            doc = json.loads(self.path.read_text())
            threshold = AppliedThreshold(**doc["threshold"])
            # Version 0 is the local default, not something the cloud sent: the current
            # settings win, so a changed --tau takes effect until the controller speaks.
            if threshold.version == 0:
                threshold = default.threshold
            return DeviceState(
                threshold=threshold,
                model_version=int(doc.get("model_version", 0)),
                last_refusal=doc.get("last_refusal"),
                withdrawn=tuple(int(v) for v in doc.get("withdrawn", ())),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"device state file {self.path} is unreadable: {exc}") from exc

    def save(self, state: DeviceState) -> None:
        """Persist `state` atomically and make it current (thread-safe)."""
        with self._lock:
            write_atomic(self.path, json.dumps(asdict(state), sort_keys=True).encode())
            self.current = state

    def update(self, **changes: object) -> DeviceState:
        """Change some fields of the current state and persist it, as one step: a
        concurrent update from another thread is never lost (module docstring).

        Args:
            changes: DeviceState fields and their new values.

        Returns:
            The state now current.
        """
        with self._lock:
            state = replace(self.current, **changes)  # type: ignore[arg-type]
            self.save(state)
            return state
