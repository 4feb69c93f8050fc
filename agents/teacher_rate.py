"""The teacher stage's measured rate: offloads answered per busy second, and how busy the
stage was, over a sliding span.

The controller's cloud capacity C is "offloads/s the teacher sustains" (DESIGN, the
adaptive offload threshold: measured, not assumed). A worker knows two things exactly:
how many offloads its verdict stage answered and how long it was busy answering them
(decode, teacher, encode, the wait for Kafka's acknowledgement; not the wait for the next
batch). Items per busy second is a lower bound of what the stage sustains: back to back,
batches of the sizes it saw would reach it, and a saturated stage takes bigger batches,
whose fixed costs (a produce round trip, a teacher call) spread over more items. Items
per second of the span is the capacity itself when the stage is saturated: busy nearly
all of the span with a backlog waiting (the offload consumer's lag, DESIGN: "measured
from consumer lag"). The control step decides which holds
(`ThresholdSettings.measured_min_busy`, `measured_min_backlog`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateSample:
    """One span's measurement."""

    per_s: float  # offloads answered per busy second
    wall_per_s: float  # offloads answered per second of the span
    busy: float  # share of the span the stage was busy, 0..1
    items: int  # offloads answered in the span
    # The 99th percentile, over the span's offloads, of the time their batch took from
    # being handed to the stage to its verdicts acknowledged: the teacher's service time,
    # without the wait behind a backlog (which the verdict's own latency includes).
    service_p99_s: float = 0.0


class TeacherRate:
    """Batches of the verdict stage over the last `span_s` seconds.

    Args:
        span_s: how far back `measure` looks, in seconds (> 0).

    Raises:
        ValueError: `span_s` is not positive.
    """

    def __init__(self, span_s: float = 30.0) -> None:
        if span_s <= 0:
            raise ValueError(f"span_s must be > 0, got {span_s}")
        self.span_s = span_s
        self._batches: deque[tuple[float, float, int]] = deque()  # (start_s, end_s, items)

    def record(self, items: int, start_s: float, end_s: float) -> None:
        """One batch of `items` offloads, processed from `start_s` to `end_s`
        (monotonic seconds)."""
        if items > 0 and end_s >= start_s:
            self._batches.append((start_s, end_s, items))

    def measure(self, now_s: float, service_span_s: float | None = None) -> RateSample | None:
        """The rate and busy share over [now_s - span_s, now_s]; None before any batch in
        the span.

        The busy share's denominator is the span, or the time since the first batch when
        the stage has run for less than a span (a worker that just started). The service
        time p99 is over the batches that ended in the last `service_span_s` seconds (the
        whole span when None, or when none did): the controller judges its latency SLO
        per window, and one slow batch (a cold start) should not outlast its window.
        """
        since = now_s - self.span_s
        while self._batches and self._batches[0][1] < since:
            self._batches.popleft()
        if not self._batches:
            return None
        # The rate from whole batches; the busy share from the part inside the span.
        busy = sum(end - start for start, end, _ in self._batches)
        inside = sum(min(end, now_s) - max(start, since) for start, end, _ in self._batches)
        items = sum(n for _, _, n in self._batches)
        covered = now_s - max(since, self._batches[0][0])
        if busy <= 0 or covered <= 0:
            return None
        return RateSample(
            per_s=items / busy,
            wall_per_s=items / covered,
            busy=min(1.0, inside / covered),
            items=items,
            service_p99_s=self._service_quantile(
                0.99, now_s - (self.span_s if service_span_s is None else service_span_s)
            ),
        )

    def _service_quantile(self, q: float, since: float) -> float:
        """The q-quantile of the durations of batches ended after `since`, each batch
        weighted by its offloads; of every batch in the span when none ended since (a
        window without a finished batch is no evidence of a fast teacher: batches longer
        than a window would otherwise pass the SLO in every other window)."""
        recent = [(end - start, n) for start, end, n in self._batches if end >= since]
        durations = sorted(recent or [(end - start, n) for start, end, n in self._batches])
        rank = q * sum(n for _, n in durations)
        seen = 0
        for duration, n in durations:
            seen += n
            if seen >= rank:
                return duration
        return durations[-1][0]
