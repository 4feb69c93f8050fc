"""The durable outbox: order, cap policies, replay after a reopen (crash), seq allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeloop.core.errors import ConfigError
from edgeloop.edge.outbox import SPARE_SEQS, Outbox


def fill(box: Outbox, n: int, kind: str = "inference") -> list[int]:
    return [
        box.append(kind, lambda seq: f"event-{seq}".encode(), created_us=0, count=kind).seq
        for _ in range(n)
    ]


def test_rows_come_back_in_seq_order_and_ack_deletes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", capacity=100)
    seqs = fill(box, 10)
    assert seqs == list(range(1, 11))
    rows = box.peek(0, 4)
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert rows[0].payload == b"event-1"
    assert [r.seq for r in box.peek(4, 100)] == list(range(5, 11))
    assert box.ack([1, 2, 3]) == 3
    assert box.ack([3]) == 0  # a duplicate PUBACK after a replay deletes nothing
    assert box.depth == 7
    assert [r.seq for r in box.peek(0, 2)] == [4, 5]


def test_replay_after_reopen_keeps_unacked_rows_and_never_reuses_a_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", capacity=100)
    fill(box, 5)
    box.ack([1, 2, 3, 4, 5])
    fill(box, 3)  # 6, 7, 8
    box.ack([6])
    box.close()  # as after kill -9: nothing is kept in memory that is not on disk
    again = Outbox(tmp_path / "o.db", capacity=100)
    assert [r.seq for r in again.peek(0, 100)] == [7, 8]
    assert again.depth == 2
    assert fill(again, 1) == [9]
    assert again.counter("inference") == 9
    again.ack([7, 8, 9])
    again.close()
    # Empty outbox: the next seq still continues (it is stored, not derived from rows).
    assert fill(Outbox(tmp_path / "o.db", capacity=100), 1) == [10]


def test_drop_oldest_when_full_is_counted_and_persisted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", capacity=3, policy="drop_oldest")
    fill(box, 5)
    assert [r.seq for r in box.peek(0, 10)] == [3, 4, 5]
    assert box.dropped == 2
    assert box.depth == 3
    box.close()
    assert Outbox(tmp_path / "o.db", capacity=3).dropped == 2


def test_reject_new_when_full_is_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", capacity=3, policy="reject_new")
    results = [box.append("inference", lambda s: b"x", created_us=0) for _ in range(5)]
    assert [r.stored for r in results] == [True, True, True, False, False]
    assert [r.seq for r in box.peek(0, 10)] == [1, 2, 3]
    assert box.rejected == 2
    # The refused events used their seq: downstream sees the gap that matches the count.
    assert box.next_seq == 6


def test_reserved_seq_is_never_reused(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", capacity=10)
    assert box.reserve_seq() == 1
    # The spare seqs set aside with it (for statuses on a full disk) are not reused either.
    assert fill(box, 1) == [2 + SPARE_SEQS]
    box.close()
    assert fill(Outbox(tmp_path / "o.db", capacity=10), 1) == [3 + SPARE_SEQS]


def test_a_full_disk_still_gives_a_status_a_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeloop.edge.outbox import OutboxStorageError

    box = Outbox(tmp_path / "o.db", capacity=100)
    first = box.reserve_seq()

    def disk_full(_body: object) -> None:  # what a full tmpfs does to every write
        raise OutboxStorageError("database or disk is full")

    monkeypatch.setattr(box, "_transaction", disk_full)
    spares = [box.reserve_seq() for _ in range(SPARE_SEQS)]
    assert spares == list(range(first + 1, first + 1 + SPARE_SEQS))
    with pytest.raises(OutboxStorageError):
        box.reserve_seq()  # spares spent: the caller skips this status


def test_a_failing_encoder_stores_nothing(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", capacity=10)

    def bad(_seq: int) -> bytes:
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        box.append("inference", bad, created_us=0)
    assert box.depth == 0
    assert fill(box, 1) == [1]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        Outbox(tmp_path / "o.db", capacity=0)
    with pytest.raises(ConfigError, match="policy"):
        Outbox(tmp_path / "o.db", capacity=1, policy="keep_all")  # type: ignore[arg-type]


def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    from edgeloop.edge.daemon import _exclusive

    held = pytest.raises(ConfigError, match="another edge daemon")
    with _exclusive(tmp_path), held, _exclusive(tmp_path):
        pass
    with _exclusive(tmp_path):  # released on exit
        pass


def test_a_full_database_leaves_events_unstored_counted_and_storing_resumes(
    tmp_path: Path,
) -> None:
    # PRAGMA max_page_count under the hood: SQLite answers SQLITE_FULL and rolls the
    # transaction back itself, as on a full SD card.
    box = Outbox(tmp_path / "o.db", capacity=100_000, max_bytes=64 * 1024)
    results = [
        box.append("inference", lambda s: b"x" * 200, created_us=0, count="inference")
        for _ in range(1000)
    ]
    stored = [r for r in results if r.stored]
    refused = [r for r in results if not r.stored]
    assert stored and refused  # the cap was reached, and appending never raised
    assert all(r.error is not None and "full" in r.error for r in refused)
    assert box.unstored == len(refused)
    assert box.storage_error is not None and "SQLITE_FULL" in box.storage_error
    # A refused event used no seq: what is stored is gap-free.
    assert [r.seq for r in box.peek(0, 10_000)] == list(range(1, len(stored) + 1))
    assert box.counter("inference") == len(stored)

    # Space frees (the uplink delivered and deleted rows, the daemon's checkpointer ran):
    # storing resumes by itself.
    assert box.ack(r.seq for r in box.peek(0, 50)) == 50
    box.checkpoint()
    again = box.append("inference", lambda s: b"x" * 200, created_us=0)
    assert again.stored and again.seq == len(stored) + 1
    assert box.storage_error is None
    box.close()
    # The count of unstored events reached the disk with the first write that succeeded.
    assert Outbox(tmp_path / "o.db", capacity=100_000).unstored == len(refused)


def test_other_writes_on_a_full_database_raise_the_real_error(tmp_path: Path) -> None:
    from edgeloop.edge.outbox import OutboxStorageError, Refusal

    box = Outbox(tmp_path / "o.db", capacity=100_000, max_bytes=64 * 1024)
    while box.append("inference", lambda s: b"x" * 500, created_us=0).stored:
        pass
    # Quarantining copies a row: it needs pages the cap does not have.
    big = [Refusal(r.seq, 0x95, "Packet too large") for r in box.peek(0, 100)]
    with pytest.raises(OutboxStorageError, match="full") as err:
        box.settle([], big)
    assert err.value.retriable
    assert box.quarantined == 0 and box.depth == len(box.peek(0, 10_000))
