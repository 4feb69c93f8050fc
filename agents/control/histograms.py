"""Fixed-bucket histograms: the confidence histogram, latency quantiles and PSI.

Bounded, mergeable state (counts per fixed bucket), so a window's memory does not grow
with its traffic and two partial windows add up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Latency buckets: geometric, ratio 2^(1/4) (~19%) from 0.01 ms up to ~42 s, so a quantile
# read from the bucket's geometric middle is within ~9% of the true value.
LATENCY_MIN_MS = 0.01
LATENCY_RATIO = 2.0**0.25
LATENCY_BUCKETS = 88


def confidence_bucket(confidence: float, buckets: int) -> int:
    """Index of the fixed-width bucket [i/B, (i+1)/B) holding `confidence`; 1.0 is in the
    last bucket, values outside [0, 1] are clamped (a NaN counts as 0: least confident).

    Args:
        confidence: the event's confidence.
        buckets: B, the number of buckets over [0, 1].

    Returns:
        The bucket index in [0, B).
    """
    if not confidence > 0.0:  # also NaN
        return 0
    return min(int(confidence * buckets), buckets - 1)


def bucket_upper(index: int, buckets: int) -> float:
    """Upper edge of bucket `index`: tau at this edge offloads buckets 0..index."""
    return (index + 1) / buckets


def latency_bucket(ms: float) -> int:
    """Index of the geometric latency bucket holding `ms` (clamped at both ends)."""
    if not ms > LATENCY_MIN_MS:
        return 0
    i = int(math.log(ms / LATENCY_MIN_MS) / math.log(LATENCY_RATIO)) + 1
    return min(i, LATENCY_BUCKETS - 1)


def latency_quantile(counts: Sequence[int], q: float) -> float:
    """The q-quantile (0 < q <= 1) of a latency histogram, in ms; NaN when it is empty.

    Read as the geometric middle of the bucket holding the ceil(q * n)-th value.
    """
    n = sum(counts)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(q * n))
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            if i == 0:
                return LATENCY_MIN_MS
            lo = LATENCY_MIN_MS * LATENCY_RATIO ** (i - 1)
            return lo * math.sqrt(LATENCY_RATIO)
    raise AssertionError("unreachable: rank <= n")  # pragma: no cover


def psi(current: Sequence[float], reference: Sequence[float], epsilon: float) -> float:
    """Population stability index of `current` against `reference` (counts or shares).

    PSI = sum_i (p_i - q_i) ln(p_i / q_i), p and q the bucket shares after adding
    `epsilon` to each and renormalising (an empty bucket would be ln 0). Rule of thumb:
    < 0.1 no shift, 0.1-0.25 moderate, > 0.25 significant.

    Args:
        current: this window's histogram.
        reference: the reference histogram, same buckets.
        epsilon: share added to every bucket.

    Returns:
        The PSI (>= 0); NaN when either histogram is empty.

    Raises:
        ValueError: the histograms have different bucket counts.
    """
    if len(current) != len(reference):
        raise ValueError(f"histograms differ in buckets: {len(current)} vs {len(reference)}")
    n_cur, n_ref = sum(current), sum(reference)
    if n_cur <= 0 or n_ref <= 0:
        return math.nan
    k = len(current)
    p = [(c / n_cur + epsilon) / (1 + k * epsilon) for c in current]
    q = [(r / n_ref + epsilon) / (1 + k * epsilon) for r in reference]
    return sum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
