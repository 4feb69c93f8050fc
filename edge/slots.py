"""A/B model slots on disk, switched by renaming a symbolic link.

    <state>/models/slot-a/   a verified artifact (manifest.json, manifest.sig, model.onnx, ...)
    <state>/models/slot-b/
    <state>/models/current -> slot-a

An update is written into the slot `current` does not point to (via a temp dir renamed
into place), and then `current` is replaced by `rename(2)` of a new link: a power cut
leaves `current` on the old or the new slot, each complete. The inactive slot may be
half-written after a crash; it is never read until it was rewritten and verified.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SLOTS = ("slot-a", "slot-b")


class ModelSlots:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.link = root / "current"
        root.mkdir(parents=True, exist_ok=True)

    def current(self) -> Path | None:
        if not self.link.is_symlink():
            return None
        target = self.root / os.readlink(self.link)
        return target if target.is_dir() else None

    def inactive(self) -> Path:
        cur = self.current()
        name = SLOTS[1] if cur is not None and cur.name == SLOTS[0] else SLOTS[0]
        return self.root / name

    def stage(self, artifact_dir: Path) -> Path:
        """Copy a downloaded artifact into the inactive slot; returns the slot path."""
        slot = self.inactive()
        tmp = self.root / f".{slot.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(artifact_dir, tmp)
        shutil.rmtree(slot, ignore_errors=True)
        tmp.rename(slot)
        _fsync_dir(self.root)
        return slot

    def activate(self, slot: Path) -> None:
        """Point `current` at `slot` atomically."""
        tmp = self.root / ".current.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(slot.name)
        tmp.replace(self.link)
        _fsync_dir(self.root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
