"""Folders a command writes to, checked before anything starts."""

from __future__ import annotations

from pathlib import Path


def write_problem(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (created when missing), or None.

    Args:
        folder: the folder; it and its parents are created if they do not exist.

    Returns:
        The OS's reason ("Permission denied", "No such file or directory") or None.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".edgeloop-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return str(exc.strerror or exc)
    return None
