"""Frame sources and the bounded frame queue between a source and the model.

A source is an async iterator of `Frame`s (a camera driver, a sensor, a directory of
.npy files, the simulator's generator). The queue in front of the model keeps the newest
frames: a frame waiting behind a busy model gets staler, so when it is full the oldest is
dropped and counted.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edgeloop.core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Frame:
    raw: npt.NDArray[np.float32]  # (H, W) in the sensor's range, what the task preprocesses
    ts_us: int  # capture time
    label: int | None = None  # known only to simulators; never sent


class FrameSource(Protocol):
    def frames(self) -> AsyncIterator[Frame]: ...


def _now_us() -> int:
    return time.time_ns() // 1000


class ArraySource:
    """Frames from an (N, H, W) array at `rate_hz` (0 = as fast as taken), optionally looped.

    `transform(images, i)` lets the simulator drift frames as time goes on.
    """

    def __init__(
        self,
        images: npt.NDArray[np.float32],
        *,
        rate_hz: float = 0.0,
        loop: bool = True,
        labels: npt.NDArray[np.int64] | None = None,
        transform: Callable[[npt.NDArray[np.float32], int], npt.NDArray[np.float32]] | None = None,
        limit: int | None = None,
    ) -> None:
        if images.ndim != 3 or len(images) == 0:
            raise ConfigError(f"ArraySource needs a non-empty (N, H, W) array, got {images.shape}")
        self.images = images
        self.rate_hz = rate_hz
        self.loop = loop
        self.labels = labels
        self.transform = transform
        self.limit = limit

    async def frames(self) -> AsyncIterator[Frame]:
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        i = 0
        n = len(self.images)
        while (self.loop or i < n) and (self.limit is None or i < self.limit):
            img = self.images[i % n]
            if self.transform is not None:
                img = self.transform(img[None], i)[0]
            label = int(self.labels[i % n]) if self.labels is not None else None
            yield Frame(img, _now_us(), label)
            i += 1
            if period:
                next_at += period
                # Absolute schedule: a slow consumer does not stretch the sensor's rate.
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            else:
                await asyncio.sleep(0)


class DirectorySource:
    """Every `*.npy` file in a folder (sorted): an (H, W) frame or an (N, H, W) batch."""

    def __init__(self, folder: Path, *, rate_hz: float = 0.0) -> None:
        if not folder.is_dir():
            raise ConfigError(f"frame source folder {folder} does not exist")
        self.folder = folder
        self.rate_hz = rate_hz

    async def frames(self) -> AsyncIterator[Frame]:
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        for path in sorted(self.folder.glob("*.npy")):
            arr = np.load(path, allow_pickle=False).astype(np.float32)
            batch = arr[None] if arr.ndim == 2 else arr
            if batch.ndim != 3:
                raise ConfigError(f"{path}: expected (H, W) or (N, H, W), got {arr.shape}")
            for img in batch:
                yield Frame(img, _now_us())
                await asyncio.sleep(period)


class FrameQueue:
    """Bounded, newest wins: `put` never waits; when full the oldest frame is dropped."""

    def __init__(self, capacity: int, on_drop: Callable[[], None] = lambda: None) -> None:
        if capacity < 1:
            raise ConfigError(f"frame queue capacity must be >= 1, got {capacity}")
        self._items: deque[Frame] = deque()
        self._capacity = capacity
        self._ready = asyncio.Event()
        self._on_drop = on_drop
        self._closed = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, frame: Frame) -> None:
        if len(self._items) >= self._capacity:
            self._items.popleft()
            self.dropped += 1
            self._on_drop()
        self._items.append(frame)
        self._ready.set()

    def close(self) -> None:
        """The source is done: `get` returns None once the queue is empty."""
        self._closed = True
        self._ready.set()

    async def get(self) -> Frame | None:
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()
