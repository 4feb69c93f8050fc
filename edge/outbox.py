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
- A row the broker refuses for good (a PUBACK reason no retry changes, see
  `edge/puback.py`) moves to the `quarantine` table in the same transaction that
  deletes the delivered rows: kept with its reason code, counted (persisted) and
  reported in DeviceStatus, never silently deleted. The quarantine has its own cap; past
  it the oldest quarantined row goes, counted as `quarantine_dropped`.
- A full disk (SQLITE_FULL, or an I/O error on write) does not raise out of `append`:
  the event is not stored, `Appended.error` says why, `unstored` counts it (persisted
  once a write succeeds again) and `storage_error` holds the cause until a write
  succeeds. SQLite may already have rolled the transaction back itself when it reports
  SQLITE_FULL; a ROLLBACK is issued only while a transaction is open, so the real error
  is the one reported. Other writes (`settle`, `reserve_seq`) raise
  `OutboxStorageError` (retriable) and change nothing.
- `max_bytes` caps the database file (`PRAGMA max_page_count`): the outbox then never
  takes more of the SD card than that, and reaching it behaves as a full disk.
- A truly full disk can wedge SQLite in WAL mode: deleting rows needs WAL frames, and a
  checkpoint needs room to grow the database file, so nothing frees anything. A reserve
  file (`reserve_bytes`, next to the database) is kept for that moment: on the first
  refused write the database's size is frozen (max_page_count = its page count, so new
  rows can only reuse freed pages) and the reserve is deleted, which gives deletes and
  checkpoints room. Once a checkpoint completes (TRUNCATE, giving the WAL's space back)
  and the disk has room for the reserve plus a margin, the reserve is written again and
  the freeze lifted. While frozen, new rows reuse the pages delivered rows freed: storing
  resumes as the uplink drains.
- WAL journal: the inference thread appends while the uplink reads and deletes. With
  `synchronous=NORMAL` a commit is durable against a process crash (kill -9); `FULL`
  adds an fsync per commit for power cuts.

Thread-safe: one connection behind a lock (appends come from the inference worker
thread, reads and acks from the event loop).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeloop.core.errors import ConfigError, EdgeloopError
from edgeloop.edge.settings import OutboxFullPolicy, SyncMode

# Free space beyond the reserve before a frozen outbox may grow again.
THAW_MARGIN_BYTES = 64 * 1024
# Seqs set aside for events sent while the disk refuses writes (see `reserve_seq`).
SPARE_SEQS = 4
# Primary result codes that mean "the disk could not take the write" (sqlite.org/rescode):
# SQLITE_IOERR (10, every extended IOERR_* shares it) and SQLITE_FULL (13).
_STORAGE_CODES = frozenset({10, 13})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_us INTEGER NOT NULL,
    reason_code INTEGER NOT NULL,
    reason TEXT NOT NULL,
    quarantined_us INTEGER NOT NULL
);
"""


class OutboxStorageError(EdgeloopError):
    """The disk refused a write (full, or an I/O error); nothing was changed.

    Retriable: the same write succeeds once space frees.
    """

    retriable = True


def _storage_cause(exc: sqlite3.Error) -> str | None:
    """The cause when `exc` means the disk refused the write, else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _STORAGE_CODES:
        name = getattr(exc, "sqlite_errorname", "")
        return f"{exc} ({name})" if name else str(exc)
    return None


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    kind: str
    payload: bytes
    created_us: int


@dataclass(frozen=True, slots=True)
class Appended:
    """What `append` did: the seq it used, whether the row is stored, what it evicted.

    `error` is set when the disk refused the row (the seq was not used then).
    """

    seq: int
    stored: bool
    evicted: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A row the broker refused for good: its PUBACK reason code and name."""

    seq: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Settled:
    deleted: int
    quarantined: int
    quarantine_dropped: int = 0


class Outbox:
    def __init__(
        self,
        path: Path,
        *,
        capacity: int,
        policy: OutboxFullPolicy = "drop_oldest",
        sync: SyncMode = "NORMAL",
        quarantine_capacity: int = 10_000,
        max_bytes: int | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"outbox capacity must be >= 1, got {capacity}")
        if quarantine_capacity < 1:
            raise ConfigError(f"quarantine capacity must be >= 1, got {quarantine_capacity}")
        if policy not in ("drop_oldest", "reject_new"):
            raise ConfigError(f"outbox policy {policy!r}: use drop_oldest or reject_new")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.capacity = capacity
        self.policy: OutboxFullPolicy = policy
        self.quarantine_capacity = quarantine_capacity
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
        # The page cap to return to after a full disk froze the size (see the docstring).
        self._cap_pages = int(self._db.execute("PRAGMA max_page_count").fetchone()[0])
        if max_bytes is not None:
            self.set_max_bytes(max_bytes)
        self._frozen = False
        self._appends_paused = False
        self._reserve = path.with_name(path.name + ".reserve")
        self._reserve_bytes = reserve_bytes
        self._write_reserve()
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
        self.quarantined = self._meta("quarantined", 0)
        self.quarantine_dropped = self._meta("quarantine_dropped", 0)
        self._quarantine_depth: int = self._db.execute(
            "SELECT COUNT(*) FROM quarantine"
        ).fetchone()[0]
        # Events the disk refused: `_unstored_pending` is not on disk yet (it is added to
        # the persisted count by the next write that succeeds).
        self._unstored_saved = self._meta("unstored", 0)
        self._unstored_pending = 0
        # Why the last write failed; None once a write succeeds again.
        self.storage_error: str | None = None
        self._spare_seqs: list[int] = []

    def set_max_bytes(self, max_bytes: int) -> None:
        """Cap the database file at about `max_bytes` (PRAGMA max_page_count).

        Raises:
            ConfigError: the cap is below one page.
        """
        page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        if max_bytes < page:
            raise ConfigError(f"outbox max_bytes {max_bytes} is below one page ({page} bytes)")
        with self._lock:
            self._db.execute(f"PRAGMA max_page_count={max_bytes // page}")
            self._cap_pages = max_bytes // page

    def _write_reserve(self) -> bool:
        """Write the reserve file if it is missing; False when the disk has no room."""
        if self._reserve_bytes <= 0 or self._reserve.exists():
            return True
        tmp = self._reserve.with_suffix(".tmp")
        try:
            with tmp.open("wb") as fh:
                chunk = bytes(min(self._reserve_bytes, 65_536))
                left = self._reserve_bytes
                while left > 0:
                    left -= fh.write(chunk[:left])
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self._reserve)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True

    def _on_disk_refused(self) -> None:
        """Freeze the database's size and give the reserve back (caller holds the lock)."""
        if self._frozen:
            return
        if shutil.disk_usage(self.path.parent).free >= self._reserve_bytes + THAW_MARGIN_BYTES:
            return  # the disk has room: `max_bytes` was reached, deleting rows makes room
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        self._db.execute(f"PRAGMA max_page_count={max(pages, 1)}")
        self._frozen = True
        # Rows within the frozen size still write WAL frames, which would eat the space
        # the reserve gives back: no appends until a checkpoint has emptied the WAL.
        self._appends_paused = True
        self._reserve.unlink(missing_ok=True)

    def _thaw(self) -> None:
        """After a completed checkpoint (the WAL is empty): appends may go on, within the
        frozen size. When the disk has room for the reserve and a margin besides, the
        reserve is written again and the freeze lifted."""
        self._appends_paused = False
        free = shutil.disk_usage(self.path.parent).free
        if free < self._reserve_bytes + THAW_MARGIN_BYTES or not self._write_reserve():
            return
        with self._lock:
            self._db.execute(f"PRAGMA max_page_count={self._cap_pages}")
            self._frozen = False

    @property
    def unstored(self) -> int:
        """Events the disk refused, over the device's lifetime."""
        return self._unstored_saved + self._unstored_pending

    @property
    def quarantine_depth(self) -> int:
        return self._quarantine_depth

    def _transaction(self, body: Callable[[], None]) -> None:
        """Run `body` in one write transaction (caller holds the lock).

        Raises:
            OutboxStorageError: the disk refused the write; the transaction is rolled back.
            sqlite3.Error: any other database error (also rolled back).
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            body()
            if self._unstored_pending:
                saved = self._unstored_saved + self._unstored_pending
                self._set_meta("unstored", saved)
            self._db.execute("COMMIT")
        except BaseException as exc:
            # On SQLITE_FULL SQLite may have rolled back already; a ROLLBACK then raises
            # "cannot rollback - no transaction is active" and would hide the real error.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            cause = _storage_cause(exc) if isinstance(exc, sqlite3.Error) else None
            if cause is not None:
                self.storage_error = cause
                self._on_disk_refused()
                raise OutboxStorageError(f"outbox {self.path}: {cause}") from exc
            raise
        if self._unstored_pending:
            self._unstored_saved += self._unstored_pending
            self._unstored_pending = 0
        if not self._appends_paused:  # while paused, events are still refused
            self.storage_error = None

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
            if self._appends_paused:
                self._unstored_pending += 1
                return Appended(seq, False, 0, self.storage_error or "disk full (paused)")
            payload = encode(seq)
            evicted = 0
            stored = True

            def write() -> None:
                nonlocal evicted, stored
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

            try:
                self._transaction(write)
            except OutboxStorageError:
                # Not stored, seq not used: the device keeps deciding; the caller counts it.
                self._unstored_pending += 1
                return Appended(seq, False, 0, self.storage_error)
            # Only after the commit: memory never claims what the disk does not hold.
            self._next_seq = seq + 1
            self._depth += (1 if stored else 0) - evicted
            self.dropped += evicted
            self.rejected += 0 if stored else 1
            return Appended(seq, stored, evicted)

    def reserve_seq(self) -> int:
        """A seq for an event that is not stored here (the MQTT last will, a status sent
        while the disk is full).

        Each successful reservation also sets aside a few spare seqs (persisted as used),
        handed out when the disk refuses even this one-row update. Spares are older than
        the seqs in use by then, like the will's; unused ones are gaps, like an unsent will.

        Raises:
            OutboxStorageError: the disk refused the write and no spare seq is left.
        """
        with self._lock:
            seq = self._next_seq
            refill = SPARE_SEQS - len(self._spare_seqs)
            try:
                self._transaction(lambda: self._set_meta("next_seq", seq + 1 + refill))
            except OutboxStorageError:
                if not self._spare_seqs:
                    raise
                return self._spare_seqs.pop(0)
            self._spare_seqs.extend(range(seq + 1, seq + 1 + refill))
            self._next_seq = seq + 1 + refill
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
        """Delete delivered rows (one transaction); returns how many were still there.

        Raises:
            OutboxStorageError: the disk refused the write; nothing was deleted.
        """
        return self.settle(seqs, ()).deleted

    def settle(self, delivered: Iterable[int], refused: Iterable[Refusal]) -> Settled:
        """In one transaction: delete `delivered` rows, move `refused` ones to quarantine.

        Raises:
            OutboxStorageError: the disk refused the write; nothing changed.
        """
        gone = [(s,) for s in delivered]
        moves = list(refused)
        if not gone and not moves:
            return Settled(0, 0)
        now = time.time_ns() // 1000
        deleted = moved = trimmed = 0

        def write() -> None:
            nonlocal deleted, moved, trimmed
            before = self._db.total_changes
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", gone)
            deleted = self._db.total_changes - before
            for r in moves:
                moved_now = self._db.execute(
                    "INSERT OR IGNORE INTO quarantine "
                    "SELECT seq, kind, payload, created_us, ?, ?, ? FROM outbox WHERE seq = ?",
                    (r.code, r.reason, now, r.seq),
                ).rowcount
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (r.seq,))
                moved += moved_now
            over = self._quarantine_depth + moved - self.quarantine_capacity
            if over > 0:
                trimmed = self._db.execute(
                    "DELETE FROM quarantine WHERE seq IN "
                    "(SELECT seq FROM quarantine ORDER BY seq LIMIT ?)",
                    (over,),
                ).rowcount
            if moved:
                self._set_meta("quarantined", self.quarantined + moved)
            if trimmed:
                self._set_meta("quarantine_dropped", self.quarantine_dropped + trimmed)

        with self._lock:
            self._transaction(write)
            self._depth -= deleted + moved
            self.quarantined += moved
            self.quarantine_dropped += trimmed
            self._quarantine_depth += moved - trimmed
        return Settled(deleted, moved, trimmed)

    def quarantine(self, limit: int = 100) -> list[tuple[Row, int, str]]:
        """Quarantined rows, oldest first, with their PUBACK reason code and name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, payload, created_us, reason_code, reason FROM quarantine "
                "ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            (Row(int(s), str(k), bytes(p), int(c)), int(code), str(reason))
            for s, k, p, c, code, reason in rows
        ]

    def checkpoint(self) -> None:
        """Copy the WAL back into the database (PASSIVE: never waits on the writer).

        Blocking disk work: call it from a thread (the daemon does every few seconds).
        """
        with self._ckpt_lock:
            frozen = self._frozen
            try:
                # Frozen by a full disk: TRUNCATE also gives the WAL file's space back.
                # It waits for the writer, which is fine while writes are refused anyway.
                mode = "TRUNCATE" if frozen else "PASSIVE"
                busy, _, _ = self._ckpt.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            except sqlite3.Error as exc:
                # Copying the WAL back needs room in the database file: on a full disk
                # it waits for the next round (the WAL keeps the rows meanwhile).
                cause = _storage_cause(exc)
                if cause is None:
                    raise
                self.storage_error = cause
                with self._lock:
                    self._on_disk_refused()
                raise OutboxStorageError(f"outbox {self.path}: checkpoint: {cause}") from exc
            if frozen and not busy:
                self._thaw()

    def close(self) -> None:
        with self._ckpt_lock:
            self._ckpt.close()
        with self._lock:
            self._db.close()
