"""The offset ledger: which source offsets a stage was never handed (Faust dropped them)."""

from __future__ import annotations

import asyncio

from edgeloop.agents.offset_ledger import Hole, OffsetLedger
from edgeloop.agents.records import Raw

INF, OFF, FLEET = "edge.inference.v1", "edge.offload.v1", "fleet.devices.v1"


def raws(topic: str, partition: int, *offsets: int) -> list[Raw]:
    return [Raw(b"v", b"k", topic, partition, o) for o in offsets]


class Commits:
    """The group's committed offsets, counting how often each partition is asked."""

    def __init__(self, **by_tp: int | None) -> None:
        self.by_tp = {tuple(k.rsplit("_", 1)): v for k, v in by_tp.items()}
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, topic: str, partition: int) -> int | None:
        self.asked.append((topic, partition))
        return self.by_tp.get((topic, str(partition)))


def observe(ledger: OffsetLedger, batch: list[Raw], commits: Commits | None = None) -> list[Hole]:
    return asyncio.run(ledger.observe(batch, commits or Commits()))


def test_records_in_order_leave_no_hole() -> None:
    ledger = OffsetLedger()
    commits = Commits()
    assert observe(ledger, raws(INF, 0, 10, 11, 12), commits) == []
    assert observe(ledger, raws(INF, 0, 13, 14), commits) == []
    assert commits.asked == [(INF, 0)]  # asked once, then followed


def test_a_run_skipped_mid_stream_is_a_hole_with_its_exact_offsets() -> None:
    # What the kill test showed: the survivor went on from a later offset of a partition.
    ledger = OffsetLedger()
    observe(ledger, raws(OFF, 2, 54, 55, 56))
    assert observe(ledger, raws(OFF, 2, 80, 81)) == [Hole(OFF, 2, 57, 80)]
    assert observe(ledger, raws(OFF, 2, 82)) == []  # the hole is reported once


def test_after_a_rebalance_the_first_record_is_checked_against_the_commit() -> None:
    # A partition taken over from a dead worker: the group committed 54, the stage is
    # first handed 120 (the records between were fetched and dropped during the rebalance).
    ledger = OffsetLedger()
    observe(ledger, raws(OFF, 0, 1, 2))
    ledger.forget()
    commits = Commits(**{f"{OFF}_2": 54, f"{OFF}_0": 3})
    holes = observe(ledger, raws(OFF, 2, 120, 121) + raws(OFF, 0, 3), commits)
    assert holes == [Hole(OFF, 2, 54, 120)]
    assert Hole(OFF, 2, 54, 120).size == 66


def test_a_partition_never_committed_starts_from_its_first_record() -> None:
    ledger = OffsetLedger()
    assert observe(ledger, raws(INF, 1, 500, 501), Commits(**{f"{INF}_1": None})) == []
    assert observe(ledger, raws(INF, 1, 503)) == [Hole(INF, 1, 502, 503)]


def test_records_read_again_after_a_seek_back_are_not_a_hole() -> None:
    ledger = OffsetLedger()
    observe(ledger, raws(INF, 0, 10, 11, 12, 13))
    # Faust sought back to the commit (11): 11.. again, then on past 13.
    assert observe(ledger, raws(INF, 0, 11, 12, 13, 14, 15)) == []
    assert observe(ledger, raws(INF, 0, 17)) == [Hole(INF, 0, 16, 17)]


def test_partitions_and_topics_are_tracked_apart_in_one_batch() -> None:
    ledger = OffsetLedger()
    observe(ledger, raws(INF, 0, 5) + raws(INF, 1, 7) + raws(OFF, 0, 9))
    batch = raws(INF, 0, 6) + raws(INF, 1, 9) + raws(OFF, 0, 10) + raws(INF, 0, 8)
    assert observe(ledger, batch) == [Hole(INF, 1, 8, 9), Hole(INF, 0, 7, 8)]


def test_compacted_topics_are_not_watched() -> None:
    ledger = OffsetLedger(exempt={FLEET})
    commits = Commits(**{f"{FLEET}_0": 0})
    assert observe(ledger, raws(FLEET, 0, 40, 97, 300), commits) == []
    assert commits.asked == []


def test_forget_asks_the_commit_again_for_every_partition() -> None:
    ledger = OffsetLedger()
    commits = Commits(**{f"{INF}_0": 10})
    observe(ledger, raws(INF, 0, 10, 11), commits)
    ledger.forget()
    observe(ledger, raws(INF, 0, 12), commits)
    assert commits.asked == [(INF, 0), (INF, 0)]


def tail(
    ledger: OffsetLedger, read: list[tuple[str, int, int]], now: float,
    commits: Commits | None = None,
) -> list[Hole]:  # fmt: skip
    return asyncio.run(ledger.tail_holes(read, commits or Commits(), now, quiet_s=15))


def test_records_dropped_at_a_partitions_tail_are_a_hole_once_the_stage_stays_short() -> None:
    """Faust read offsets 10..19 of p3 but the stage got only up to 12, and nothing
    follows them: after the quiet time the missing tail is a hole, exactly once."""
    ledger = OffsetLedger()
    observe(ledger, raws("hard", 3, 10, 11, 12))
    assert tail(ledger, [("hard", 3, 20)], now=0) == []  # may still be queued for the stage
    assert tail(ledger, [("hard", 3, 20)], now=10) == []
    assert tail(ledger, [("hard", 3, 20)], now=15) == [Hole("hard", 3, 13, 20)]
    assert tail(ledger, [("hard", 3, 20)], now=40) == []  # handed over: expected is 20 now
    # The records reach the stage again later (a re-seek): read again, not a hole.
    assert observe(ledger, raws("hard", 3, *range(13, 21))) == []


def test_a_stage_that_keeps_moving_has_no_tail_hole() -> None:
    ledger = OffsetLedger()
    for t, last in enumerate(range(100, 200, 10)):
        observe(ledger, raws("inf", 0, *range(last - 10, last)))
        assert tail(ledger, [("inf", 0, last + 50)], now=t * 10.0) == []


def test_a_tail_dropped_before_the_stage_saw_any_record_starts_at_the_commit() -> None:
    ledger = OffsetLedger()
    commits = Commits(hard_5=151)
    assert tail(ledger, [("hard", 5, 163)], now=0, commits=commits) == []
    assert tail(ledger, [("hard", 5, 163)], now=20, commits=commits) == [Hole("hard", 5, 151, 163)]


def test_no_tail_hole_without_a_commit_or_on_a_compacted_topic() -> None:
    ledger = OffsetLedger(exempt={"fleet"})
    for now in (0, 30):
        assert tail(ledger, [("hard", 1, 9), ("fleet", 0, 9)], now=now) == []


def test_a_rebalance_restarts_the_quiet_time() -> None:
    ledger = OffsetLedger()
    observe(ledger, raws("hard", 3, 1))
    assert tail(ledger, [("hard", 3, 9)], now=0) == []
    ledger.forget()
    observe(ledger, raws("hard", 3, 2), Commits(hard_3=2))
    assert tail(ledger, [("hard", 3, 9)], now=16) == []
    assert tail(ledger, [("hard", 3, 9)], now=31) == [Hole("hard", 3, 3, 9)]
