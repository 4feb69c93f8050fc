"""Settings of one edge device daemon (env prefix `EDGELOOP_EDGE_`).

Built once in the CLI and passed down. The MQTT endpoint comes from `MqttSettings`
(`EDGELOOP_MQTT_*`, or the endpoints file `infra up` writes); the device's own
certificate, key and CA are paths here because they belong to the device, not the broker.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edgeloop.core.settings import _Base

ConfidenceName = Literal["max_prob", "margin", "entropy"]
OutboxFullPolicy = Literal["drop_oldest", "reject_new"]
SyncMode = Literal["OFF", "NORMAL", "FULL"]


class EdgeSettings(_Base):
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_EDGE_", frozen=True, extra="ignore"
    )

    device_id: str
    cohort: str = "default"
    # Outbox, applied versions and the A/B model slots live here; it must survive reboots.
    state_dir: Path
    # The model to start with when the state dir has none yet (a signed artifact dir).
    initial_model: Path | None = None
    pubkey: Path | None = None
    # What `verify_artifact` compares with the manifest's target.
    target: str = "pi5-cpu"

    # mTLS identity (CN = device id: the broker's ACL confines us to edgeloop/<CN>/#).
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None

    # Inference.
    intra_op_threads: int = Field(1, ge=1)
    inter_op_threads: int = Field(1, ge=1)
    confidence: ConfidenceName = "max_prob"
    # Until the controller sends a ThresholdUpdate (version 0 = the local default).
    tau: float = Field(0.8, ge=0.0, le=1.0)
    audit_rate: float = Field(0.0, ge=0.0, le=1.0)
    # Frames waiting for the model. Full: the newest frame wins, the oldest is dropped and
    # counted (a camera frame is worth less the older it gets).
    frame_queue: int = Field(4, ge=1)

    # Offload: the input goes compressed, within this many bytes per second (token
    # bucket with `offload_burst_bytes`); over budget the device acts locally and counts it.
    offload_bytes_per_s: float = Field(16_384.0, ge=0.0)
    offload_burst_bytes: int = Field(65_536, ge=0)
    # Offloads waiting for a CloudVerdict, matched by event id; oldest forgotten beyond.
    pending_verdicts: int = Field(10_000, ge=1)

    # Outbox (SQLite WAL).
    outbox_capacity: int = Field(100_000, ge=1)
    outbox_policy: OutboxFullPolicy = "drop_oldest"
    # NORMAL survives a process crash (kill -9) without loss; FULL also a power cut, at
    # the cost of an fsync per commit.
    outbox_sync: SyncMode = "NORMAL"
    # Most bytes the outbox database may take on the card (None: what the disk allows).
    # Reaching it, like a full disk, leaves events unstored and the device DEGRADED.
    outbox_max_bytes: int | None = Field(None, ge=65_536)
    # Disk space kept in a file next to the outbox and given back when the disk is full,
    # so that delivered rows can still be deleted and the WAL checkpointed (0: none).
    outbox_reserve_bytes: int = Field(1_048_576, ge=0)
    # Rows the broker refused for good, kept for inspection; past it the oldest goes
    # (counted as quarantine_dropped).
    quarantine_capacity: int = Field(10_000, ge=1)

    # Uplink: QoS 1 messages in flight per connection (the duplicate window on reconnect).
    publish_window: int = Field(64, ge=1, le=65535)
    status_interval_s: float = Field(30.0, gt=0)
    # Bytes/s this device's uplink can carry (its link, as the operator knows it), reported
    # in DeviceStatus; the threshold controller lets offloads use a share of it. None:
    # undeclared, and the controller sets no per-device uplink limit (the cohort's tau
    # applies). Never inferred from measured traffic: that depends on tau itself.
    uplink_capacity_bytes_per_s: float | None = Field(None, gt=0)
    keepalive_s: int = Field(30, ge=5)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    # The broker keeps our downlink subscriptions and queued verdicts this long offline.
    session_expiry_s: int = Field(86_400, ge=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    download_timeout_s: float = Field(60.0, gt=0)

    metrics_port: int | None = None
    # Test and batch knobs: stop taking frames after this many InferenceEvents in the
    # device's lifetime (persisted), and exit once the outbox is drained.
    max_events: int | None = Field(None, ge=1)
    exit_when_drained: bool = False
