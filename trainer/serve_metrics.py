"""Prometheus metrics of the trigger consumer (names `edgeloop_trainer_*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TrainerMetrics:
    """`edgeloop_trainer_*` on the service's own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.triggers = Counter(
            "edgeloop_trainer_triggers_total",
            "Triggers by outcome: released, refused (gate), skipped (handled before), "
            "rejected (dead-lettered bad trigger), failed (training failed), interrupted",
            ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "edgeloop_trainer_dead_letters_total", "Triggers dead-lettered", ["reason"], registry=r
        )
        self.hard_examples = Counter(
            "edgeloop_trainer_hard_examples_total", "Hard examples read for training", registry=r
        )
        self.training_seconds = Histogram(
            "edgeloop_trainer_training_seconds",
            "Wall time of one retrain (train, export, quantize, gate, sign)",
            buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400),
            registry=r,
        )
        self.retries = Counter(
            "edgeloop_trainer_retries_total",
            "Waits for Kafka or the registry to come back while handling a trigger",
            registry=r,
        )
        self.busy = Gauge(
            "edgeloop_trainer_training_in_progress", "1 while a retrain runs", registry=r
        )
