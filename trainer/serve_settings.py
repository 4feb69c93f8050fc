"""Settings of the trigger consumer (`edgeloop train serve`), env prefix EDGELOOP_TRAINER_."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edgeloop.artifacts.rollout import DEFAULT_CANARY_SHARE
from edgeloop.core.settings import _Base


class TrainerServeSettings(_Base):
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_TRAINER_", frozen=True, extra="ignore", populate_by_name=True
    )

    # Trainer home (store, checkpoints, runs, ledger); None = $EDGELOOP_HOME/trainer.
    home: Path | None = None
    # Release signing keys; None = $EDGELOOP_HOME/keys.
    keys_dir: Path | None = None
    triggers_topic: str = "ml.training-triggers.v1"
    releases_topic: str = "ml.model-releases.v1"
    # Consumer group used only to store the committed trigger offsets (no group
    # membership: see trigger_consumer.py for why).
    group_id: str = "edgeloop-trainer"
    client_id: str = "edgeloop-trainer-1"
    # Models this trainer can retrain; a trigger for any other is dead-lettered.
    models: tuple[str, ...] = ("digits-student",)
    # A released model goes to this cohort first; the rollout judge promotes it in waves.
    canary_cohort: str = "canary"
    # The share of that cohort's devices the CANARY release applies to (ModelRelease.share).
    # It is the rollout judge's canary share, read from the judge's own variable so the two
    # cannot disagree: the judge compares the members against the rest of the cohort.
    canary_share: float = Field(
        DEFAULT_CANARY_SHARE, gt=0, lt=1, validation_alias="EDGELOOP_CONTROL_JUDGE__CANARY_SHARE"
    )
    # Where devices download artifacts (the store served over HTTP); None = file:// URLs.
    artifact_base_url: str | None = None
    epochs: int = Field(15, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    nproc: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    gate_max_clean_drop: float = 0.02
    gate_min_drift_gain: float = 0.01
    # The gate's latency bound (p99 of one inference, ms), measured on this host's CPU:
    # the Pi 5 budget by default. A shared or loaded host (a demo running the whole loop
    # on a laptop) measures its own contention; raise it there, never on a release host.
    gate_max_p99_ms: float = Field(5.0, gt=0)
    # Memory bound of one trigger: its ranges may hold at most this many hard examples.
    max_hard_examples: int = Field(100_000, ge=1)
    range_read_timeout_s: float = Field(60.0, gt=0)
    training_timeout_s: float = Field(3600.0, gt=0)
    # Grace between SIGTERM and SIGKILL of a cancelled or timed-out training run.
    training_kill_grace_s: float = Field(10.0, ge=0)
    dlq_payload_bytes: int = Field(4096, ge=0)
    ledger_max_entries: int = Field(10_000, ge=1)
    metrics_port: int | None = None
