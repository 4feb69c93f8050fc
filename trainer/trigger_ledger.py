"""The durable record of handled trigger ids: what makes "at most once" survive restarts.

One small JSON file in the trainer home (`<home>/triggers/ledger.json`), rewritten
atomically (temp file, fsync, rename, fsync of the folder) on every change, so a power cut
leaves the old or the new ledger, never half of one. Triggers are rare (a handful a day),
so a whole-file rewrite costs nothing; the file keeps the newest `max_entries` ids, far
more than the trigger topic's retention holds, so a redelivered trigger is always found.

Two states per trigger id:
- `started`: written before training begins. A restart that finds it knows a run was
  interrupted, and does not train again (at most once): it finishes the trigger from
  what the store holds, or dead-letters it as `interrupted`.
- `done`: written after the outcome (release event, dead letter) was acknowledged by
  Kafka, before the trigger's offset is committed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeloop.core.errors import ConfigError

State = Literal["started", "done"]


@dataclass(frozen=True)
class LedgerEntry:
    trigger_id: str
    state: State
    # released | refused | rejected | failed | interrupted (empty while started)
    outcome: str = ""
    at: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)


class TriggerLedger:
    """Not async: callers run its methods in a worker thread (they fsync)."""

    def __init__(self, path: Path, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ConfigError(f"trigger ledger: max_entries must be >= 1, got {max_entries}")
        self.path = path
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[str, LedgerEntry] = self._load()

    def _load(self) -> dict[str, LedgerEntry]:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            entries = [LedgerEntry(**e) for e in doc["entries"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            # Never start over silently: an empty ledger would retrain every trigger.
            raise ConfigError(
                f"trigger ledger {self.path} is unreadable ({exc}); fix or move it away "
                "(every trigger still in the topic would then be handled again)"
            ) from exc
        return {e.trigger_id: e for e in entries}

    def get(self, trigger_id: str) -> LedgerEntry | None:
        return self._entries.get(trigger_id)

    def __len__(self) -> int:
        return len(self._entries)

    def start(self, trigger_id: str, **detail: Any) -> None:
        self._put(LedgerEntry(trigger_id, "started", detail=detail))

    def finish(self, trigger_id: str, outcome: str, **detail: Any) -> None:
        self._put(LedgerEntry(trigger_id, "done", outcome, detail=detail))

    def _put(self, entry: LedgerEntry) -> None:
        with self._lock:
            self._entries.pop(entry.trigger_id, None)
            self._entries[entry.trigger_id] = entry  # newest last
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({"entries": [asdict(e) for e in self._entries.values()]}, indent=1)
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself is durable only once the folder is synced
        finally:
            os.close(dir_fd)
