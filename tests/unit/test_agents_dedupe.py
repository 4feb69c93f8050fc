"""The dedupe window: every redelivered (device, seq) inside the window is dropped, every
new one passes, state survives a round trip through the table's bytes."""

from __future__ import annotations

import random

from edgeloop.agents.dedupe import BatchDedupe, DedupeState, Seen, SeqWindow


def test_each_seq_is_new_once_and_a_duplicate_after() -> None:
    w = SeqWindow(64)
    seqs = list(range(100))
    random.Random(1).shuffle(seqs[50:])  # out of order within the window
    assert [w.add(s) for s in sorted(seqs[:50])] == [Seen.NEW] * 50
    assert all(w.add(s) is Seen.DUPLICATE for s in range(50) if s > 49 - 64)


def test_gaps_are_not_taken_for_duplicates() -> None:
    # seq 5 arrives after 6..9 (another bridge was faster): it is new, then a duplicate.
    w = SeqWindow(16)
    for s in (1, 2, 3, 4, 6, 7, 8, 9):
        assert w.add(s) is Seen.NEW
    assert w.add(5) is Seen.NEW
    assert w.add(5) is Seen.DUPLICATE


def test_older_than_the_window_passes_and_says_so() -> None:
    w = SeqWindow(8)
    w.add(100)
    assert w.add(92) is Seen.OUT_OF_WINDOW
    assert w.add(93) is Seen.NEW


def test_a_jump_larger_than_the_window_forgets_the_old_seqs() -> None:
    w = SeqWindow(8)
    w.add(1)
    w.add(1000)
    assert w.add(999) is Seen.NEW
    assert w.add(1000) is Seen.DUPLICATE


def test_state_survives_the_table_bytes() -> None:
    # A restart restores the window from the changelog: the same answers after it.
    w = SeqWindow(1064)
    for s in range(0, 2000, 3):
        w.add(s)
    restored = SeqWindow.from_bytes(w.to_bytes(), 1064)
    assert restored == w
    assert restored.add(1998) is Seen.DUPLICATE
    assert restored.add(1997) is Seen.NEW


def test_batch_dedupe_catches_duplicates_inside_one_batch_and_writes_back_once() -> None:
    table: dict[str, bytes] = {}
    first = BatchDedupe(32, table.get)
    answers = [first.check("d1", s) for s in (1, 2, 2, 3)] + [first.check("d2", 1)]
    assert answers == [Seen.NEW, Seen.NEW, Seen.DUPLICATE, Seen.NEW, Seen.NEW]
    table.update(first.changed())
    assert sorted(table) == ["d1", "d2"]
    second = BatchDedupe(32, table.get)  # the next batch (or another worker) reads it back
    assert second.check("d1", 3) is Seen.DUPLICATE
    assert second.check("d1", 4) is Seen.NEW


def test_windows_reach_the_table_only_after_their_outputs_were_acknowledged() -> None:
    # A window written before its batch's outputs are in Kafka would turn a crash in
    # between into a loss: the redelivered input would be dropped as a duplicate.
    now = [0.0]
    state = DedupeState(32, {}.get, flush_s=1.0, clock=lambda: now[0])
    assert state.check("d", 1) is Seen.NEW
    now[0] = 5.0
    assert state.due() == []  # in flight: not written, however late
    assert state.due(force=True) == []
    state.acked()
    assert [d for d, _ in state.due()] == ["d"]
    assert state.due() == []  # nothing new since


def test_writes_are_coalesced_per_flush_interval() -> None:
    now = [0.0]
    table: dict[str, bytes] = {}
    state = DedupeState(32, table.get, flush_s=1.0, clock=lambda: now[0])
    for seq in range(1, 50):
        state.check("d", seq)
        state.acked()
        table.update(state.due())
    assert table == {}  # all within one interval
    now[0] = 1.5
    table.update(state.due())
    restored = SeqWindow.from_bytes(table["d"], 32)
    assert restored.add(49) is Seen.DUPLICATE


def test_duplicates_do_not_mark_a_window_dirty() -> None:
    state = DedupeState(32, {}.get, flush_s=0.0)
    state.check("d", 1)
    state.acked()
    state.due()
    assert state.check("d", 1) is Seen.DUPLICATE
    state.acked()
    assert state.due() == []


def test_a_flush_between_batches_never_writes_the_batch_in_flight() -> None:
    # Regression: the flush timer wrote the live window of a device that was dirty from an
    # earlier batch, including seqs the batch in flight had just marked; a kill before
    # that batch's outputs reached Kafka then made the survivor drop them as duplicates.
    state = DedupeState(32, {}.get, flush_s=0.0)
    state.check("d", 1)
    state.acked()  # batch 1 done: d is dirty
    assert state.check("d", 2) is Seen.NEW  # batch 2 in flight
    written = dict(state.due(force=True))  # the timer fires mid-batch
    restored = SeqWindow.from_bytes(written["d"], 32)
    assert restored.add(1) is Seen.DUPLICATE
    assert restored.add(2) is Seen.NEW  # not written before its outputs are acknowledged


def test_a_failed_write_is_retried_at_the_next_flush() -> None:
    state = DedupeState(32, {}.get, flush_s=0.0)
    state.check("d", 1)
    state.acked()
    items = state.due()
    state.requeue(items)  # the table write failed (a rebalance under way)
    assert [d for d, _ in state.due()] == ["d"]
