"""The verdict stage's measured rate (agents/teacher_rate.py): offloads per busy second,
per second of the span, and the busy share that says whether the stage was saturated."""

from __future__ import annotations

import pytest

from edgeloop.agents.teacher_rate import TeacherRate


def test_a_saturated_stage_reports_its_rate_and_a_full_busy_share() -> None:
    rate = TeacherRate(span_s=10.0)
    # Back to back: 64 offloads every 0.5 s for 20 s.
    for k in range(40):
        rate.record(64, 100.0 + k * 0.5, 100.0 + (k + 1) * 0.5)
    got = rate.measure(120.0)
    assert got is not None
    assert got.per_s == pytest.approx(128.0, rel=0.06)
    assert got.wall_per_s == pytest.approx(128.0, rel=0.06)
    assert got.busy == pytest.approx(1.0)


def test_an_idle_stage_reports_a_low_busy_share_and_its_per_busy_second_rate() -> None:
    rate = TeacherRate(span_s=10.0)
    # One offload every second, each taking 50 ms: 20 per busy second, 1 per second.
    for k in range(20):
        rate.record(1, 100.0 + k, 100.0 + k + 0.05)
    got = rate.measure(120.0)
    assert got is not None
    assert got.per_s == pytest.approx(20.0, rel=0.01)
    assert got.wall_per_s == pytest.approx(1.0, rel=0.15)
    assert got.busy == pytest.approx(0.05, abs=0.01)


def test_batches_older_than_the_span_are_forgotten() -> None:
    rate = TeacherRate(span_s=5.0)
    rate.record(10, 0.0, 1.0)
    assert rate.measure(3.0) is not None
    assert rate.measure(7.0) is None  # nothing answered in the last 5 s
    with pytest.raises(ValueError, match="span_s"):
        TeacherRate(span_s=0)


def test_the_service_time_p99_is_over_offloads_not_over_batches() -> None:
    # 99 offloads answered in 0.1 s batches and one in a 5 s batch: the 99th percentile
    # offload was served in 0.1 s. Two offloads in the slow batch: it is 5 s.
    rate = TeacherRate(span_s=60.0)
    for i in range(99):
        rate.record(1, i * 0.2, i * 0.2 + 0.1)
    rate.record(1, 30.0, 35.0)
    sample = rate.measure(40.0)
    assert sample is not None and sample.service_p99_s == pytest.approx(0.1)
    rate.record(1, 36.0, 41.0)
    sample = rate.measure(42.0)
    assert sample is not None and sample.service_p99_s == pytest.approx(5.0)


def test_a_slow_batch_counts_in_the_service_time_for_one_window_only() -> None:
    # A cold start's 4 s batch, then fast ones: over a 5 s window it has left the figure,
    # while the 30 s span still uses it for the rates.
    rate = TeacherRate(span_s=30.0)
    rate.record(1, 0.0, 4.0)
    for i in range(10):
        rate.record(5, 5.0 + i, 5.0 + i + 0.05)
    early = rate.measure(6.0, service_span_s=5.0)
    late = rate.measure(15.0, service_span_s=5.0)
    assert early is not None and early.service_p99_s == pytest.approx(4.0)
    assert late is not None and late.service_p99_s == pytest.approx(0.05)
    assert late.items == 51


def test_a_window_without_a_finished_batch_keeps_the_last_service_time() -> None:
    # Batches of 5 s against a 3 s window: windows without a finished batch still report
    # 5 s, not 0 (which would let a slow teacher pass the latency SLO every other window).
    rate = TeacherRate(span_s=30.0)
    rate.record(100, 0.0, 5.0)
    for now in (5.5, 8.1):
        sample = rate.measure(now, service_span_s=3.0)
        assert sample is not None and sample.service_p99_s == pytest.approx(5.0)
