"""Prometheus text -> samples, and the arithmetic the observer does on them.

Counters are compared between two scrapes (a rate over a window is a delta of two
cumulative values, as PromQL's `increase` does); a value lower than its baseline means the
process restarted, and then the whole current value is the increase (PromQL's reset rule).
Quantiles come from histogram bucket deltas with linear interpolation inside the bucket
(PromQL's `histogram_quantile`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
# sample name -> [(labels, value)]
Samples = dict[str, list[tuple[dict[str, str], float]]]


def drop_families(text: str, families: Collection[str]) -> str:
    """`text` without the lines (samples, HELP and TYPE) of `families`.

    prometheus_client's parser is pure Python: a simulated fleet's per-device histograms
    are thousands of lines that took it over a second per scrape on a loaded 2-core
    machine. Lines are dropped by their metric name's prefix before it sees them.
    """
    if not families:
        return text
    prefixes = tuple(families)
    comments = tuple(f"# {kind} {f}" for kind in ("HELP", "TYPE") for f in families)
    return "\n".join(
        line
        for line in text.split("\n")
        if not (line.startswith(prefixes) or line.startswith(comments))
    )


def parse(text: str, *, skip: Collection[str] = ()) -> Samples:
    """Parse Prometheus text exposition into samples by sample name.

    Sample names are the exposed ones (`foo_total`, `foo_bucket`, `foo_count`), not the
    family names the parser reports (`foo`).

    Args:
        text: a `/metrics` body.
        skip: metric families (name prefixes) left out before parsing.

    Returns:
        Every sample, grouped by its name.

    Raises:
        ValueError: the text is not in the Prometheus text format.
    """
    out: Samples = {}
    for family in text_string_to_metric_families(drop_families(text, skip)):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def merge(parts: Iterable[Samples]) -> Samples:
    """The samples of several targets as one scrape (same names are concatenated)."""
    out: Samples = {}
    for part in parts:
        for name, rows in part.items():
            out.setdefault(name, []).extend(rows)
    return out


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """Sum of `name`'s samples whose labels include `labels`; None when there is none."""
    rows = [
        v for lab, v in samples.get(name, ()) if all(lab.get(k) == w for k, w in labels.items())
    ]
    return sum(rows) if rows else None


def grouped(samples: Samples, name: str, by: tuple[str, ...], **labels: str) -> dict[Labels, float]:
    """`sum by (by...)` of `name` over the samples whose labels include `labels`."""
    out: dict[Labels, float] = {}
    for lab, v in samples.get(name, ()):
        if all(lab.get(k) == w for k, w in labels.items()):
            key = tuple((k, lab.get(k, "")) for k in by)
            out[key] = out.get(key, 0.0) + v
    return out


def increase(current: float, baseline: float | None) -> float:
    """Counter increase since `baseline`; a drop means a restart (the counter began again)."""
    if baseline is None:
        return current
    return current if current < baseline else current - baseline


def buckets(samples: Samples, name: str) -> dict[float, float]:
    """`name`'s histogram buckets summed over every label set: upper bound -> count."""
    out: dict[float, float] = {}
    for lab, v in samples.get(f"{name}_bucket", ()):
        le = float(lab["le"])  # "+Inf" parses to inf
        out[le] = out.get(le, 0.0) + v
    return out


def bucket_increase(
    current: Mapping[float, float], baseline: Mapping[float, float]
) -> dict[float, float]:
    """Per-bucket counter increase (reset rule per bucket)."""
    return {le: increase(v, baseline.get(le)) for le, v in current.items()}


def quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """`histogram_quantile(q, ...)` over cumulative bucket counts; None without samples.

    An observation beyond the last finite bound reports that bound (the histogram knows no
    more), as PromQL does.
    """
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for le in bounds:
        count = cumulative[le]
        if count >= rank:
            if math.isinf(le):
                return prev_bound
            if count == prev_count:
                return le
            return prev_bound + (le - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = le, count
    return prev_bound
