"""Prometheus metrics of the bridge (names `edgeloop_bridge_*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class BridgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.uplink_in = Counter(
            "edgeloop_bridge_uplink_received_total", "MQTT messages received", ["kind"], registry=r
        )
        self.uplink_out = Counter(
            "edgeloop_bridge_uplink_produced_total",
            "Records acknowledged by Kafka",
            ["kind"],
            registry=r,
        )
        self.dlq = Counter(
            "edgeloop_bridge_dlq_total", "Messages dead-lettered", ["reason"], registry=r
        )
        self.added_latency = Histogram(
            "edgeloop_bridge_uplink_added_latency_seconds",
            "From MQTT receive to the Kafka acknowledgement",
            # Fine below 10 ms: the p99 target lives there.
            buckets=(
                0.00025,
                0.0005,
                0.00075,
                0.001,
                0.0015,
                0.002,
                0.003,
                0.004,
                0.005,
                0.006,
                0.008,
                0.01,
                0.015,
                0.02,
                0.03,
                0.05,
                0.1,
                0.25,
                1,
                5,
            ),
            registry=r,
        )
        self.in_flight = Gauge(
            "edgeloop_bridge_uplink_in_flight",
            "Received, not yet acknowledged messages",
            registry=r,
        )
        self.registry_lookups = Counter(
            "edgeloop_bridge_registry_lookups_total", "Schema id lookups", ["result"], registry=r
        )
        self.fingerprint_resolutions = Counter(
            "edgeloop_bridge_fingerprint_resolutions_total",
            "Unknown single-object fingerprints looked up among the subject's versions "
            "(hit, found, negative, throttled, unregistered)",
            ["result"],
            registry=r,
        )
        self.retries = Counter(
            "edgeloop_bridge_retries_total",
            "Waits for Kafka or the registry to come back",
            ["what"],
            registry=r,
        )
        self.downlink_out = Counter(
            "edgeloop_bridge_downlink_published_total",
            "MQTT publishes acknowledged by the broker",
            ["kind"],
            registry=r,
        )
