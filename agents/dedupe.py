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

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

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
