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
from dataclasses import dataclass

from edgeloop.agents.records import Raw

TP = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class Hole:
    """Offsets [start, end) of a partition that the stage was never handed."""

    topic: str
    partition: int
    start: int
    end: int

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

    def forget(self) -> None:
        """After a rebalance: each partition starts again from the group's commit."""
        self._next.clear()

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
        for raw in batch:
            if raw.topic in self._exempt:
                continue
            tp = (raw.topic, raw.partition)
            expected = self._next.get(tp)
            if expected is None:
                expected = await committed(*tp)
            self._next[tp] = raw.offset + 1
            if expected is not None and raw.offset > expected:
                holes.append(Hole(raw.topic, raw.partition, expected, raw.offset))
            # At or below the expected offset: in order, or read again (Faust's seek to the
            # commit after a rebalance, the stall watchdog's re-seek): nothing missed.
        return holes
