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
        self.epoch = Gauge(
            "edgeloop_trainer_training_epoch",
            "Epochs the running retrain has finished (0 between runs)",
            registry=r,
        )
        self.epochs = Gauge(
            "edgeloop_trainer_training_epochs",
            "Epochs the running retrain will train (0 between runs)",
            registry=r,
        )
        # One series while a retrain runs (removed after it): cardinality stays at one.
        self.trigger = Gauge(
            "edgeloop_trainer_training_trigger",
            "1 for the trigger whose retrain is running",
            ["trigger_id"],
            registry=r,
        )
        self.release = Gauge(
            "edgeloop_trainer_release_version",
            "Model version of the newest release this trainer published, per cohort and "
            "stage (CANARY, or REFUSED naming the serving version)",
            ["cohort", "stage"],
            registry=r,
        )
