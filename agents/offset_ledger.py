"""Which source offsets reached a stage: finds the records Faust dropped before it.

faust-streaming 0.15.3 has several paths that take records out of a partition's flow
without handing them to the agent, and only some of them are repaired:

* a rebalance clears every stream's queue (`flow_control.clear()` on revoke and again on
  each `resume()`, which recovery calls after it has sought the partitions to their
  committed offsets), while the fetcher may already have moved its read offset past them;
* the fetcher's batch that straddles that seek goes on after it: the read offset jumps
  and Faust records the jump as a gap, which its commit then counts as done;
* records below the read offset are dropped as already read.

The symptom, seen in the kill test on both brokers: after a rebalance the survivor skips
a run of consecutive records of a partition and goes on with later ones, so neither the
commit nor the stall watchdog (which looks for a partition that stopped moving) notices.

The ledger watches what a stage is actually handed. Per source partition it keeps the
next offset it expects: after a rebalance the group's committed offset, then one past
each record seen. A record past that offset opens a **hole**: the offsets between were
never handed to the stage. The caller reads exactly those offsets from the broker with a
plain consumer of its own (`agents/backfill.py`) and hands them to the stage before the
batch is acknowledged, so Faust cannot commit past them first. A seek back through
Faust's consumer would not do: the fetcher's batch that straddles the seek moves the read
offset past it again, and the records read again are dropped as already read. Offsets
that do not exist (compaction, transaction markers, retention) simply read as nothing.
Compacted topics, where gaps are normal, are not watched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field

from edgeloop.agents.records import Raw

TP = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class Hole:
    """Offsets [start, end) of a partition that the stage was never handed."""

    topic: str
    partition: int
    start: int
    end: int
    # Index in the batch of the record that revealed it (`observe`): its records go to the
    # stage before that record, so the stage sees the partition in offset order.
    at: int = field(default=0, compare=False)

    @property
    def size(self) -> int:
        return self.end - self.start


class OffsetLedger:
    """Next expected offset per source partition of one stage.

    Args:
        exempt: topics not watched (compacted ones: their gaps are normal).
    """

    def __init__(self, exempt: Collection[str] = ()) -> None:
        self._exempt = frozenset(exempt)
        self._next: dict[TP, int] = {}
        # Per partition whose read position is ahead of the stage: the expected offset
        # then, and since when (monotonic seconds). See `tail_holes`.
        self._behind: dict[TP, tuple[int, float]] = {}

    def forget(self) -> None:
        """After a rebalance: each partition starts again from the group's commit."""
        self._next.clear()
        self._behind.clear()

    async def observe(
        self,
        batch: Iterable[Raw],
        committed: Callable[[str, int], Awaitable[int | None]],
    ) -> list[Hole]:
        """Account for `batch` (in the order the stage got it) and return the new holes.

        Args:
            batch: the records a stage was handed.
            committed: the group's committed offset of (topic, partition), or None when
                it never committed one; asked once per partition after `forget`.

        Returns:
            One `Hole` per skip ahead of the expected offset, in the order found.
        """
        holes: list[Hole] = []
        for index, raw in enumerate(batch):
            if raw.topic in self._exempt:
                continue
            tp = (raw.topic, raw.partition)
            expected = self._next.get(tp)
            if expected is None:
                expected = await committed(*tp)
            self._next[tp] = raw.offset + 1
            if expected is not None and raw.offset > expected:
                holes.append(Hole(raw.topic, raw.partition, expected, raw.offset, index))
            # At or below the expected offset: in order, or read again (Faust's seek to the
            # commit after a rebalance, the stall watchdog's re-seek): nothing missed.
        return holes

    async def tail_holes(
        self,
        read: Iterable[tuple[str, int, int]],
        committed: Callable[[str, int], Awaitable[int | None]],
        now: float,
        quiet_s: float,
    ) -> list[Hole]:
        """Holes at a partition's tail: records Faust read but never handed to the stage,
        with nothing after them yet, so no later batch reveals them (`observe` cannot).

        Faust moves a partition's read position past a message whose hand-off a
        rebalance interrupted; when no record follows, the stage just stops short of the
        partition's end. A partition whose read position has been ahead of the offset
        the stage expects, with that offset unmoved, for `quiet_s` is such a hole. Call
        it only while the stage handles no batch: records still queued for the stage
        reach it within its batch wait, so after `quiet_s` they were dropped.

        Args:
            read: (topic, partition, next offset after the last one Faust read) of each
                assigned source partition.
            committed: as for `observe` (the expected offset before any batch).
            now: monotonic seconds.
            quiet_s: how long the read position must stay ahead, unanswered.

        Returns:
            One `Hole` per such partition, [expected, read); the ledger then expects the
            read position (the caller hands the hole's records to the stage).
        """
        holes: list[Hole] = []
        for topic, partition, position in read:
            if topic in self._exempt:
                continue
            tp = (topic, partition)
            expected = self._next.get(tp)
            if expected is None:
                expected = await committed(topic, partition)
                if expected is None:
                    continue
            if position <= expected:
                self._behind.pop(tp, None)
                continue
            first = self._behind.get(tp)
            if first is None or first[0] != expected:
                self._behind[tp] = (expected, now)
                continue
            if now - first[1] >= quiet_s:
                holes.append(Hole(topic, partition, expected, position))
                self._next[tp] = position
                del self._behind[tp]
        return holes
