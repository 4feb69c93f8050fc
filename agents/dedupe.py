"""Dedupe of device events by `(device_id, seq)`: a per-device sliding window of seen seqs.

A device event's `event_id` is `<device_id>:<seq>` with `seq` strictly increasing per device,
and duplicates only arrive within the redelivery window (the edge's QoS 1 in-flight window
plus the bridge's Receive Maximum, `settings.DEFAULT_DEDUPE_WINDOW`). So one table entry per
device holds everything needed: the highest seq seen and a bitmap of which of the `window`
seqs below it were seen. The entry is one changelog write per device per batch (not one per
event), bounded in size (8 + window/8 bytes), and restored from the changelog on restart.

A seq older than the window cannot be told apart: it is let through (at-least-once wins
over loss) and counted as `out_of_window`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

_HW = 8  # bytes of the high-water seq


class Seen(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    OUT_OF_WINDOW = "out_of_window"


@dataclass(slots=True)
class SeqWindow:
    """Which seqs of one device were seen: `high` and bit i = seq `high - i` seen."""

    window: int
    high: int = -1
    bits: int = 0

    @classmethod
    def from_bytes(cls, data: bytes | None, window: int) -> SeqWindow:
        """Restore a window written by `to_bytes`; None or an empty value is a new device.

        A value written with another window size is resized (bits beyond it dropped).
        """
        if not data:
            return cls(window)
        high = int.from_bytes(data[:_HW], "big", signed=True)
        bits = int.from_bytes(data[_HW:], "little") & ((1 << window) - 1)
        return cls(window, high, bits)

    def to_bytes(self) -> bytes:
        return self.high.to_bytes(_HW, "big", signed=True) + self.bits.to_bytes(
            (self.window + 7) // 8, "little"
        )

    def add(self, seq: int) -> Seen:
        """Record `seq`; says whether it was new, a duplicate, or too old to tell."""
        if seq > self.high:
            shift = seq - self.high
            if shift < self.window:
                self.bits = ((self.bits << shift) | 1) & ((1 << self.window) - 1)
            else:
                self.bits = 1
            self.high = seq
            return Seen.NEW
        distance = self.high - seq
        if distance >= self.window:
            return Seen.OUT_OF_WINDOW
        mask = 1 << distance
        if self.bits & mask:
            return Seen.DUPLICATE
        self.bits |= mask
        return Seen.NEW


class BatchDedupe:
    """Dedupe state for one batch: windows loaded once per device, written back once.

    `check` answers for each event in batch order (a duplicate inside the batch is caught
    too); `changed` lists what to write to the table, after the batch's outputs were
    acknowledged (writing first would turn a crash in between into a loss: the redelivered
    input would be dropped as a duplicate of outputs that never reached Kafka).
    """

    __slots__ = ("_load", "_windows", "window")

    def __init__(self, window: int, load: Callable[[str], bytes | None]) -> None:
        self.window = window
        self._load = load
        self._windows: dict[str, SeqWindow] = {}

    def check(self, device_id: str, seq: int) -> Seen:
        w = self._windows.get(device_id)
        if w is None:
            w = self._windows[device_id] = SeqWindow.from_bytes(self._load(device_id), self.window)
        return w.add(seq)

    def changed(self) -> list[tuple[str, bytes]]:
        return [(device, w.to_bytes()) for device, w in self._windows.items()]


class Deduper(Protocol):
    """What a step needs: `check(device_id, seq)`."""

    def check(self, device_id: str, seq: int) -> Seen: ...


class DedupeState:
    """A worker's view of one dedupe table: windows cached in memory, written back to the
    table (one changelog record per device) at most every `flush_s` seconds.

    Why not every batch: with many devices each batch touches most of them, and a write
    per device per batch costs about as much as the event itself. Delaying the write
    never loses an event: the outputs of a batch are acknowledged before its windows
    are even marked dirty, and a window not yet written when the worker dies only means
    a redelivered event is passed again, with the same output id (at-least-once).
    `clear` drops the cache when partitions move (another worker may own them next).
    Memory: one window (8 + window/8 bytes) per device of the worker's partitions.
    """

    def __init__(
        self,
        window: int,
        load: Callable[[str], bytes | None],
        *,
        flush_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._load = load
        self.flush_s = flush_s
        self._clock = clock
        self._windows: dict[str, SeqWindow] = {}
        self._pending: set[str] = set()  # changed by the batch in flight
        # Snapshots taken when a batch's outputs were acknowledged. Never the live window:
        # the batch in flight may have marked seqs in it whose outputs are not in Kafka
        # yet, and a flush between batches (a timer) must not write those.
        self._dirty: dict[str, bytes] = {}
        self._last_flush = clock()

    def check(self, device_id: str, seq: int) -> Seen:
        w = self._windows.get(device_id)
        if w is None:
            w = self._windows[device_id] = SeqWindow.from_bytes(self._load(device_id), self.window)
        seen = w.add(seq)
        if seen is Seen.NEW:
            self._pending.add(device_id)
        return seen

    def acked(self) -> None:
        """The batch's outputs are acknowledged: its windows, as they are now, may be
        written from now on."""
        for device_id in self._pending:
            window = self._windows.get(device_id)
            if window is not None:
                self._dirty[device_id] = window.to_bytes()
        self._pending.clear()

    def due(self, *, force: bool = False) -> list[tuple[str, bytes]]:
        """The acknowledged windows to write now (all of them once `flush_s` has passed,
        or at once with `force`)."""
        now = self._clock()
        if not self._dirty or (not force and now - self._last_flush < self.flush_s):
            return []
        self._last_flush = now
        out = list(self._dirty.items())
        self._dirty.clear()
        return out

    def requeue(self, items: list[tuple[str, bytes]]) -> None:
        """Windows whose write failed: written at the next flush (newer snapshots win)."""
        for device_id, state in items:
            self._dirty.setdefault(device_id, state)

    def clear(self) -> None:
        self._windows.clear()
        self._pending.clear()
        self._dirty.clear()
