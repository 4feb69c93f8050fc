"""The durable outbox: every uplink event is in SQLite before it is published.

- One row per event, keyed by the device's `seq` (one sequence for all uplink kinds, so
  `event_id = "<device>:<seq>"` is unique). The next seq is stored in the same
  transaction as the row: after a crash the device neither reuses nor skips a number.
- A row is deleted only after the broker's PUBACK (`ack`); `peek` reads in seq order, so
  a replay after a restart or reconnect keeps per-device order. What was in flight when
  the link dropped is sent again: duplicates are bounded by the publish window and
  removed downstream by event id.
- The cap is a declared policy: `drop_oldest` deletes the oldest row to make room,
  `reject_new` refuses the new event. Either way the count is kept (and persisted) and
  reported in DeviceStatus; a seq gap downstream shows the same loss.
- WAL journal: the inference thread appends while the uplink reads and deletes. With
  `synchronous=NORMAL` a commit is durable against a process crash (kill -9); `FULL`
  adds an fsync per commit for power cuts.

Thread-safe: one connection behind a lock (appends come from the inference worker
thread, reads and acks from the event loop).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeloop.core.errors import ConfigError
from edgeloop.edge.settings import OutboxFullPolicy, SyncMode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    kind: str
    payload: bytes
    created_us: int


@dataclass(frozen=True, slots=True)
class Appended:
    """What `append` did: the seq it used, whether the row is stored, what it evicted."""

    seq: int
    stored: bool
    evicted: int = 0


class Outbox:
    def __init__(
        self,
        path: Path,
        *,
        capacity: int,
        policy: OutboxFullPolicy = "drop_oldest",
        sync: SyncMode = "NORMAL",
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"outbox capacity must be >= 1, got {capacity}")
        if policy not in ("drop_oldest", "reject_new"):
            raise ConfigError(f"outbox policy {policy!r}: use drop_oldest or reject_new")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.capacity = capacity
        self.policy: OutboxFullPolicy = policy
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={sync}")
        # No checkpoint on the commit path: SQLite's automatic one (every 1000 pages) runs
        # inside whichever commit crosses the mark, with its writes and fsync, which put
        # milliseconds into the p99 of a frame. `checkpoint()` runs it off that path.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        # A second connection only for checkpoints: in WAL mode a checkpoint runs beside
        # the writer, so it never takes the append lock.
        self._ckpt = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._ckpt_lock = threading.Lock()
        row = self._db.execute("SELECT COUNT(*), MAX(seq) FROM outbox").fetchone()
        self._depth: int = row[0]
        stored_next = self._meta("next_seq", 1)
        # max(seq)+1 covers a database written before meta existed; never go backwards.
        self._next_seq = max(stored_next, (row[1] or 0) + 1)
        self.dropped = self._meta("dropped", 0)
        self.rejected = self._meta("rejected", 0)

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def counter(self, key: str) -> int:
        """A persisted counter kept next to the rows (e.g. events produced so far)."""
        with self._lock:
            return self._meta(f"count:{key}", 0)

    def append(
        self,
        kind: str,
        encode: Callable[[int], bytes],
        *,
        created_us: int,
        count: str | None = None,
    ) -> Appended:
        """Allocate the next seq, encode the event with it and store it, atomically.

        `encode(seq)` builds the payload (the seq is part of the event body). `count`
        names a persisted counter bumped in the same transaction.
        """
        with self._lock:
            seq = self._next_seq
            payload = encode(seq)
            evicted = 0
            stored = True
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._depth >= self.capacity:
                    if self.policy == "reject_new":
                        stored = False
                        self._set_meta("rejected", self.rejected + 1)
                    else:
                        evicted = self._db.execute(
                            "DELETE FROM outbox WHERE seq IN "
                            "(SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                            (self._depth - self.capacity + 1,),
                        ).rowcount
                        self._set_meta("dropped", self.dropped + evicted)
                if stored:
                    self._db.execute(
                        "INSERT INTO outbox(seq, kind, payload, created_us) VALUES (?, ?, ?, ?)",
                        (seq, kind, payload, created_us),
                    )
                self._set_meta("next_seq", seq + 1)
                if count is not None:
                    self._set_meta(f"count:{count}", self._meta(f"count:{count}", 0) + 1)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            # Only after the commit: memory never claims what the disk does not hold.
            self._next_seq = seq + 1
            self._depth += (1 if stored else 0) - evicted
            self.dropped += evicted
            self.rejected += 0 if stored else 1
            return Appended(seq, stored, evicted)

    def reserve_seq(self) -> int:
        """A seq for an event that is not stored here (the MQTT last will)."""
        with self._lock:
            seq = self._next_seq
            self._db.execute("BEGIN IMMEDIATE")
            self._set_meta("next_seq", seq + 1)
            self._db.execute("COMMIT")
            self._next_seq = seq + 1
            return seq

    def peek(self, after_seq: int, limit: int) -> list[Row]:
        """Up to `limit` rows with seq > after_seq, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, payload, created_us FROM outbox WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [Row(int(s), str(k), bytes(p), int(c)) for s, k, p, c in rows]

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged rows (one transaction); returns how many were still there."""
        params = [(s,) for s in seqs]
        if not params:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany("DELETE FROM outbox WHERE seq = ?", params)
                deleted = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth -= deleted
            return deleted

    def checkpoint(self) -> None:
        """Copy the WAL back into the database (PASSIVE: never waits on the writer).

        Blocking disk work: call it from a thread (the daemon does every few seconds).
        """
        with self._ckpt_lock:
            self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        with self._ckpt_lock:
            self._ckpt.close()
        with self._lock:
            self._db.close()
