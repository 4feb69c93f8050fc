"""Prometheus metrics of the edge daemon (names `edgeloop_edge_*`).

One registry per process; the simulator runs many devices in one process, so the
per-device collectors carry a `device` label. The ground-truth counter
(`edgeloop_edge_predictions_total`) is per cohort and model version only: a simulator
knows every frame's label, and the demo's accuracy per cohort needs no per-device series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1, 1.0
)  # fmt: skip
_PUBLISH_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300)


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        d = ["device"]
        self.latency = Histogram(
            "edgeloop_edge_decision_latency_seconds",
            "Per frame, by stage: preprocess, inference (session.run), decision, total",
            [*d, "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "edgeloop_edge_decisions_total",
            "Frames decided, by cohort and decision (LOCAL, OFFLOAD, AUDIT)",
            [*d, "cohort", "decision"],
            registry=r,
        )
        self.predictions = Counter(
            "edgeloop_edge_predictions_total",
            "Frames whose true label the source knows (simulators), by cohort, serving model "
            "version and whether the edge prediction was correct (true, false)",
            ["cohort", "model_version", "correct"],
            registry=r,
        )
        self.over_budget = Counter(
            "edgeloop_edge_offload_over_budget_total",
            "Offloads or audits acted on locally because the byte budget was spent",
            [*d, "wanted"],
            registry=r,
        )
        self.offload_bytes = Counter(
            "edgeloop_edge_offload_bytes_total", "Compressed input bytes offloaded", d, registry=r
        )
        self.frames_dropped = Counter(
            "edgeloop_edge_frames_dropped_total",
            "Frames dropped because the model was busy (newest frame wins)",
            d,
            registry=r,
        )
        self.frames_failed = Counter(
            "edgeloop_edge_frames_failed_total",
            "Frames that could not be processed (bad shape, ...), by error type",
            [*d, "error"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "edgeloop_edge_outbox_depth", "Events stored, not yet acknowledged", d, registry=r
        )
        self.outbox_lost = Counter(
            "edgeloop_edge_outbox_lost_total",
            "Events lost to the outbox cap, by policy (drop_oldest / reject_new)",
            [*d, "policy"],
            registry=r,
        )
        self.outbox_quarantined = Counter(
            "edgeloop_edge_outbox_quarantined_total",
            "Events the broker refused for good (PUBACK reason), moved to the quarantine table",
            [*d, "reason"],
            registry=r,
        )
        self.outbox_unstored = Counter(
            "edgeloop_edge_outbox_unstored_total",
            "Events decided but not stored because the disk refused the write (full, I/O)",
            [*d, "kind"],
            registry=r,
        )
        self.storage_degraded = Gauge(
            "edgeloop_edge_storage_degraded",
            "1 while the outbox's last write failed (the device reports DEGRADED)",
            d,
            registry=r,
        )
        self.published = Counter(
            "edgeloop_edge_published_total", "Events acknowledged by the broker", [*d, "kind"],
            registry=r,
        )  # fmt: skip
        self.publish_rejected = Counter(
            "edgeloop_edge_publish_rejected_total",
            "Publishes the broker answered with a PUBACK reason other than 0x00, by reason",
            [*d, "reason"],
            registry=r,
        )
        self.publish_latency = Histogram(
            "edgeloop_edge_publish_latency_seconds",
            "From the event's creation to the broker's PUBACK (includes time offline)",
            d,
            buckets=_PUBLISH_BUCKETS,
            registry=r,
        )
        self.connected = Gauge(
            "edgeloop_edge_connected", "1 while the MQTT session is up", d, registry=r
        )
        self.reconnects = Counter(
            "edgeloop_edge_reconnects_total", "MQTT connection attempts that failed or ended", d,
            registry=r,
        )  # fmt: skip
        self.applied_version = Gauge(
            "edgeloop_edge_applied_version",
            "Applied version by kind (model: the version serving frames; threshold)",
            [*d, "cohort", "kind"],
            registry=r,
        )
        self.updates = Counter(
            "edgeloop_edge_updates_total",
            "Downlink updates by kind and outcome (applied, stale, refused:<reason>, ...)",
            [*d, "kind", "outcome"],
            registry=r,
        )
        self.verdicts = Counter(
            "edgeloop_edge_verdicts_total",
            "Cloud verdicts on offloads: agree, disagree, unmatched",
            [*d, "outcome"],
            registry=r,
        )
        self.verdict_latency = Histogram(
            "edgeloop_edge_verdict_latency_seconds",
            "From an offload request's creation to its CloudVerdict arriving on the device",
            d,
            buckets=_PUBLISH_BUCKETS,
            registry=r,
        )
