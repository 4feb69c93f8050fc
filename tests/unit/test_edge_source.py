"""Frame queue (newest wins, drops counted), sources, drift schedule, reconnect backoff."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from edgeloop.core.errors import ConfigError
from edgeloop.edge.simulator import Drifter, DriftSchedule
from edgeloop.edge.source import ArraySource, DirectorySource, Frame, FrameQueue
from edgeloop.edge.uplink import backoff_s


def frame(i: int) -> Frame:
    return Frame(np.zeros((8, 8), np.float32), ts_us=i)


async def test_frame_queue_keeps_the_newest_and_counts_drops() -> None:
    dropped: list[int] = []
    queue = FrameQueue(3, on_drop=lambda: dropped.append(1))
    for i in range(5):
        queue.put(frame(i))
    assert len(queue) == 3
    assert queue.dropped == 2 == len(dropped)
    got = [await queue.get() for _ in range(3)]
    assert [f.ts_us for f in got if f is not None] == [2, 3, 4]


async def test_frame_queue_get_waits_for_a_frame() -> None:
    queue = FrameQueue(1)
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.put(frame(7))
    got = await asyncio.wait_for(getter, 1)
    assert got is not None
    assert got.ts_us == 7
    queue.put(frame(8))
    queue.close()  # the source ended: what is queued still comes out, then None
    assert (await queue.get()) is not None
    assert (await queue.get()) is None


async def test_array_source_limit_and_transform() -> None:
    images = np.zeros((4, 8, 8), np.float32)
    source = ArraySource(images, limit=6, transform=lambda x, i: x + i)
    got = [f async for f in source.frames()]
    assert len(got) == 6
    assert [float(f.raw[0, 0]) for f in got] == [0, 1, 2, 3, 4, 5]


async def test_directory_source_reads_single_frames_and_batches(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((8, 8), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 8, 8), np.float32))
    got = [f async for f in DirectorySource(tmp_path).frames()]
    assert [float(f.raw.sum()) for f in got] == [64.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="does not exist"):
        DirectorySource(tmp_path / "missing")


def test_drift_schedule_is_a_step_function_per_cohort() -> None:
    schedule = DriftSchedule.parse(["canary:10=0.3,30=0.8"])
    assert schedule.severity("canary", 5) == 0.0
    assert schedule.severity("canary", 10) == 0.3
    assert schedule.severity("canary", 99) == 0.8
    assert schedule.severity("control", 99) == 0.0
    for bad in ("canary", "canary:x=1", "canary:10=2"):
        with pytest.raises(ConfigError):
            DriftSchedule.parse([bad])


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(0)
    first = [backoff_s(0, 0.5, 30, rng) for _ in range(100)]
    assert all(0.25 <= b <= 0.5 for b in first)
    late = [backoff_s(20, 0.5, 30, rng) for _ in range(100)]
    assert all(15 <= b <= 30 for b in late)
    assert len(set(late)) > 50  # jittered: a fleet does not reconnect in lockstep


def test_a_drift_schedule_counts_from_the_first_frame_not_from_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgeloop.edge import simulator

    clock = [100.0]
    monkeypatch.setattr(simulator.time, "monotonic", lambda: clock[0])
    drifter = Drifter(DriftSchedule.parse(["c:3=0.8"]), "c", seed=0)
    frame = np.random.default_rng(0).random((1, 28, 28)).astype(np.float32)
    clock[0] = 106.0  # 6 s of loading the model and connecting before the first frame
    assert np.array_equal(drifter(frame, 0), frame)  # the first frame is clean
    clock[0] = 108.0
    assert np.array_equal(drifter(frame, 1), frame)  # 2 s after it: still clean
    clock[0] = 109.5
    assert not np.array_equal(drifter(frame, 2), frame)  # 3.5 s after it: drifted
