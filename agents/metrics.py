"""Prometheus metrics of the agents (names `edgeloop_agents_*`), on the app's own registry."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgeloop.agents.records import StepResult


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "edgeloop_agents_events_in_total", "Records consumed", ["stage"], registry=r
        )
        self.events_out = Counter(
            "edgeloop_agents_events_out_total",
            "Records produced and acknowledged",
            ["stage", "topic"],
            registry=r,
        )
        self.dedupe_hits = Counter(
            "edgeloop_agents_dedupe_hits_total",
            "Records dropped as duplicates of an event id already seen",
            ["stage"],
            registry=r,
        )
        self.out_of_window = Counter(
            "edgeloop_agents_dedupe_out_of_window_total",
            "Records older than the dedupe window (passed on, cannot be told apart)",
            ["stage"],
            registry=r,
        )
        self.dlq = Counter(
            "edgeloop_agents_dlq_total", "Records dead-lettered", ["stage", "reason"], registry=r
        )
        self.enriched = Counter(
            "edgeloop_agents_enriched_total",
            "Enriched events by where the enrichment came from (STATUS, NONE: flagged)",
            ["source"],
            registry=r,
        )
        self.hard = Counter(
            "edgeloop_agents_hard_examples_total",
            "Hard examples routed, by reason (one sample may count under several)",
            ["reason"],
            registry=r,
        )
        self.suppressed = Counter(
            "edgeloop_agents_hard_examples_suppressed_total",
            "Hard samples not routed: near_duplicate, budget",
            ["why"],
            registry=r,
        )
        self.teacher_batch = Histogram(
            "edgeloop_agents_teacher_batch_size",
            "Samples per teacher session run",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.teacher_latency = Histogram(
            "edgeloop_agents_teacher_latency_seconds",
            "Per request: queued to answered by the teacher",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.lag = Gauge(
            "edgeloop_agents_consumer_lag",
            "Records behind the partition's high watermark",
            ["topic", "partition"],
            registry=r,
        )
        self.stalls = Counter(
            "edgeloop_agents_partition_stalls_total",
            "Source partitions found assigned, behind and not read (then resumed)",
            ["topic"],
            registry=r,
        )
        self.holes = Counter(
            "edgeloop_agents_offset_holes_total",
            "Runs of source offsets Faust never handed to the stage (then read directly)",
            ["stage", "topic"],
            registry=r,
        )
        self.hole_records = Counter(
            "edgeloop_agents_hole_records_total",
            "Records read back from offset holes and handed to the stage",
            ["stage"],
            registry=r,
        )
        self.holes_unread = Counter(
            "edgeloop_agents_offset_holes_unread_total",
            "Holes whose records could not be read (logged with their offsets): lost to the stage",
            ["stage", "topic"],
            registry=r,
        )
        self.retries = Counter(
            "edgeloop_agents_retries_total",
            "Waits for Kafka, the registry or the teacher to come back",
            ["what"],
            registry=r,
        )

    def record(self, stage: str, result: StepResult) -> None:
        """Count one step's tally (once per batch: labelled increments cost per call)."""
        for key, n in result.tally.items():
            kind, _, label = key.partition(":")
            if kind == "in":
                self.events_in.labels(stage).inc(n)
            elif kind == "out":
                self.events_out.labels(stage, label).inc(n)
            elif kind == "duplicate":
                self.dedupe_hits.labels(stage).inc(n)
            elif kind == "out_of_window":
                self.out_of_window.labels(stage).inc(n)
            elif kind == "dlq":
                self.dlq.labels(stage, label).inc(n)
            elif kind == "enrich":
                self.enriched.labels(label).inc(n)
            elif kind == "hard" and label != "none":
                self.hard.labels(label).inc(n)
            elif kind == "suppressed":
                self.suppressed.labels(label).inc(n)

    def on_teacher_batch(self, size: int, _run_s: float, latencies: Sequence[float]) -> None:
        self.teacher_batch.observe(size)
        for latency in latencies:
            self.teacher_latency.observe(latency)
