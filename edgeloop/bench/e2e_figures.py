"""Figures of the end-to-end benchmark, from timestamps alone (no I/O, unit-tested).

Every stamp is seconds since the epoch on one host: device publish and PUBACK and
verdict arrival by time.time() in the device process; records in Kafka by their
CreateTime (milliseconds, set by the producing client when it appends the record to a
batch: the bridge for `edge.inference.v1`, the agents worker for
`edge.inference.enriched.v1`). The bridge stage is publish -> its record's CreateTime,
the agents stage that -> the enriched record's CreateTime; a stage's share is its mean
over the mean of the whole (means add up, percentiles do not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeloop.bench.control_figures import percentile


@dataclass(frozen=True)
class Stamps:
    """One offered rate's timestamps, keyed by event id."""

    offered_per_s: float
    send_seconds: float  # first publish -> last publish, in the device process
    published: Mapping[str, float]  # InferenceEvent publish
    acked: Mapping[str, float]  # PUBACK from the broker (inference and offloads)
    bridged: Mapping[str, float]  # CreateTime in edge.inference.v1
    enriched: Mapping[str, float]  # CreateTime in edge.inference.enriched.v1
    offloads: Mapping[str, float]  # OffloadRequest publish
    verdicts: Mapping[str, float]  # CloudVerdict arrival at the device, by request id
    # Arrival at a bare aiokafka consumer of edge.inference.v1: the agents' baseline.
    consumed: Mapping[str, float] = field(default_factory=dict)
    # Mean cores each process used from the first publish to the last PUBACK and verdict
    # (proc_cpu.cores), with "total".
    cores: Mapping[str, float] = field(default_factory=dict)


def latency(values: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds, and the mean (NaN when empty)."""
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "count": len(ms),
    }


def _deltas(start: Mapping[str, float], end: Mapping[str, float]) -> list[float]:
    return [end[k] - t for k, t in start.items() if k in end]


def rate_figures(s: Stamps) -> dict[str, Any]:
    """Every figure of one offered rate: per-stage latency, shares, counts."""
    n = len(s.published)
    whole = _deltas(s.published, s.enriched)
    bridge = [
        s.bridged[k] - s.published[k] for k in s.published if k in s.bridged and k in s.enriched
    ]
    agents = [
        s.enriched[k] - s.bridged[k] for k in s.published if k in s.bridged and k in s.enriched
    ]
    total = latency(whole)
    stages = {"bridge": latency(bridge), "agents": latency(agents)}
    mean = total["mean_ms"]
    achieved = n / s.send_seconds if s.send_seconds > 0 else math.nan
    # Through the agents: enriched records over the span from the first publish to the
    # last enriched record (what the pipeline kept up with, not what was offered).
    span = (max(s.enriched.values()) - min(s.published.values())) if whole else math.nan
    return {
        "offered_per_s": s.offered_per_s,
        "published_per_s": achieved,
        "enriched_per_s": len(whole) / span if whole and span > 0 else math.nan,
        "events": n,
        "in_kafka": sum(1 for k in s.published if k in s.bridged),
        "enriched": len(whole),
        "missing": n - len(whole),
        "publish_to_enriched": total,
        "stages": stages,
        "shares": {k: (v["mean_ms"] / mean if mean and not math.isnan(mean) else math.nan)
                   for k, v in stages.items()},
        "broker_ack": latency(_deltas(s.published, s.acked)),
        "kafka_to_bare_consumer": latency(_deltas(s.bridged, s.consumed)),
        "offloads": len(s.offloads),
        "verdicts": len(_deltas(s.offloads, s.verdicts)),
        "verdicts_missing": len(s.offloads) - len(_deltas(s.offloads, s.verdicts)),
        "offload_to_verdict": latency(_deltas(s.offloads, s.verdicts)),
        "cores": dict(s.cores),
    }  # fmt: skip


def cores_line(cores: Mapping[str, float], cpus: int | None) -> str:
    """'1.93 of 2 cores: kafka 0.61, devices 0.58, ...' (largest first), or a note when
    nothing was measured."""
    if not cores:
        return "not measured (no /proc)"
    parts = sorted(((k, v) for k, v in cores.items() if k != "total"), key=lambda kv: -kv[1])
    listed = ", ".join(f"{k} {v:.2f}" for k, v in parts)
    return f"{cores.get('total', math.nan):.2f} of {cpus or '?'} cores: {listed}"


COLUMNS = [
    "path", "offered_per_s", "achieved_per_s", "p50_ms", "p99_ms", "max_ms", "share",
    "delivered", "missing", "p99_vs_baseline",
]  # fmt: skip
LABELS = {
    "offered_per_s": "offered/s", "achieved_per_s": "achieved/s", "p50_ms": "p50 ms",
    "p99_ms": "p99 ms", "max_ms": "max ms", "share": "share", "p99_vs_baseline": "p99 / base",
}  # fmt: skip


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


def _row(f: dict[str, Any], path: str, lat: dict[str, float], **cols: object) -> dict[str, Any]:
    """One table row of rate `f`; `cols` fills share, delivered, missing, achieved."""
    base = f["broker_ack"]["p99_ms"]
    return {
        "path": path,
        "offered_per_s": f["offered_per_s"],
        "achieved_per_s": cols.get("achieved", f["enriched_per_s"]),
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "max_ms": lat["max_ms"],
        "share": cols.get("share", ""),
        "delivered": cols.get("delivered", ""),
        "missing": cols.get("missing", ""),
        "p99_vs_baseline": _ratio(lat["p99_ms"], base),
    }


def table_rows(per_rate: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the printed table: per rate, the broker's own PUBACK (the baseline for
    what the bridge and agents add), the whole path, its two stages with their shares,
    and offload -> verdict. `p99 / base` is each row's p99 over the broker PUBACK p99 of
    the same rate (the whole path against the first rate is `p99_vs_first_rate` in the
    JSON)."""
    rows: list[dict[str, Any]] = []
    for f in per_rate:
        ack = f["broker_ack"]
        rows.append(_row(f, "publish -> MQTT PUBACK (broker)", ack,
                         delivered=f"{ack['count']}/{f['events']}",
                         achieved=f["published_per_s"]))  # fmt: skip
        whole = f["publish_to_enriched"]
        rows.append(_row(f, "publish -> enriched (whole)", whole, share=1.0,
                         delivered=f"{f['enriched']}/{f['events']}",
                         missing=f["missing"]))  # fmt: skip
        for stage, lat in f["stages"].items():
            label = "-> edge.inference.v1" if stage == "bridge" else "-> enriched.v1"
            rows.append(_row(f, f"  {stage}: {label}", lat, share=f["shares"][stage]))
        bare = f["kafka_to_bare_consumer"]
        rows.append(_row(f, "  baseline: bare Kafka consumer", bare,
                         delivered=f"{bare['count']}/{f['in_kafka']}"))  # fmt: skip
        rows.append(_row(f, "offload -> verdict on device", f["offload_to_verdict"],
                         delivered=f"{f['verdicts']}/{f['offloads']}",
                         missing=f["verdicts_missing"]))  # fmt: skip
    return rows


def target(per_rate: Sequence[dict[str, Any]], rate: float, p99_ms: float) -> dict[str, Any]:
    """Whether publish -> enriched p99 at `rate` offered is within `p99_ms`, and why not:
    missing events, a publisher or pipeline behind the offered rate, or the p99 itself."""
    f = next((x for x in per_rate if x["offered_per_s"] == rate), None)
    if f is None:
        return {"target_met": False, "reason": f"{rate:g}/s was not run"}
    p99 = f["publish_to_enriched"]["p99_ms"]
    reasons = []
    if f["missing"]:
        reasons.append(f"{f['missing']} of {f['events']} events not enriched")
    for key, what in (("published_per_s", "devices published"),
                      ("enriched_per_s", "the pipeline enriched")):  # fmt: skip
        if not f[key] >= 0.95 * rate:
            reasons.append(f"{what} {f[key]:.0f}/s of {rate:g}/s offered")
    if not p99 <= p99_ms:
        reasons.append(f"p99 {p99:.1f} ms > {p99_ms:g} ms")
    return {"target_met": not reasons, "reason": "; ".join(reasons) or "met"}
