"""What the uplink carried: payload bytes the broker acknowledged, per second.

DeviceStatus.uplink_bytes_per_s is the rate over the interval since the previous status
record was built (normally one `status_interval_s`; shorter once per connect, when the
last-will status is built). Counted are the payloads of QoS 1 publishes the broker
answered with a success PUBACK (events, offloads, statuses): what actually crossed the
link, not what was attempted. MQTT headers are not counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ThroughputMeter:
    """Bytes added since the last `sample()`, divided by the seconds since it.

    `add` runs on the event loop, `sample` on the thread that builds a status record:
    both take the lock, so no byte is counted in two intervals or in none.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._bytes = 0
        self._since = clock()

    def add(self, n: int) -> None:
        """Count `n` payload bytes the broker acknowledged."""
        with self._lock:
            self._bytes += n

    def sample(self) -> float:
        """The rate since the previous sample (or since creation), and start a new interval.

        Returns:
            Bytes per second; 0.0 when nothing was acknowledged or no time has passed.
        """
        with self._lock:
            now = self._clock()
            elapsed, count = now - self._since, self._bytes
            self._bytes, self._since = 0, now
        return count / elapsed if elapsed > 0 else 0.0
