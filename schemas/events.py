"""Typed views of the events, for code that builds or reads them.

The .avsc files are the truth; a unit test checks every field name and type here against them.
Records are plain dicts at run time (what fastavro reads and writes): no copying.
"""

from __future__ import annotations

from typing import Literal, TypedDict

DeviceState = Literal["UNKNOWN", "ONLINE", "OFFLINE", "DEGRADED"]

OutboxPolicy = Literal["UNKNOWN", "DROP_OLDEST", "REJECT_NEW"]

InputEncoding = Literal["UNKNOWN", "F32_RAW", "F32_ZLIB", "U8_RAW", "U8_ZLIB", "JPEG", "PNG"]

HardReason = Literal[
    "UNKNOWN", "DISAGREE", "LOW_CONFIDENCE", "LOW_MARGIN", "HIGH_ENTROPY", "AUDIT", "DRIFT"
]

ConfidenceKind = Literal["UNKNOWN", "MAX_PROB", "MARGIN", "ENTROPY"]

Decision = Literal["UNKNOWN", "LOCAL", "OFFLOAD", "AUDIT"]

EnrichmentSource = Literal["UNKNOWN", "FLEET", "STATUS", "NONE"]

ReleaseStage = Literal["UNKNOWN", "CANARY", "WAVE", "FULL", "ROLLBACK", "REFUSED"]

Scope = Literal["UNKNOWN", "DEVICE", "COHORT", "FLEET"]

TriggerReason = Literal["UNKNOWN", "COUNT", "DRIFT", "SCHEDULE", "MANUAL"]


class CloudVerdict(TypedDict):
    """The cloud teacher's answer to an OffloadRequest."""

    event_id: str
    ts: int
    request_event_id: str
    device_id: str
    teacher_model: str
    teacher_version: int
    label: int
    confidence: float
    edge_prediction: int
    agree: bool
    model_version: int
    latency_ms: float


class DeadLetter(TypedDict):
    """Bytes a stage could not process, kept with the reason so nothing is silently lost."""

    event_id: str
    ts: int
    stage: str
    reason: str
    detail: str
    source: str
    client_id: str | None
    device_id: str | None
    payload: bytes
    payload_size: int
    truncated: bool


class DeviceRecord(TypedDict):
    """Fleet metadata for one device (compacted topic, key = device_id)."""

    event_id: str
    ts: int
    device_id: str
    cohort: str
    hardware: str
    target: str
    site: str
    labels: dict[str, str]
    registered_at: int
    decommissioned: bool


class DeviceStatus(TypedDict):
    """Periodic health report of a device (also its MQTT last will, with state OFFLINE)."""

    event_id: str
    device_id: str
    seq: int
    ts: int
    state: DeviceState
    cohort: str
    model_version: int
    threshold_version: int
    outbox_depth: int
    outbox_capacity: int
    outbox_policy: OutboxPolicy
    outbox_dropped: int
    frames_dropped: int
    uptime_s: float
    rtt_ms: float | None
    uplink_bytes_per_s: float | None
    last_error: str | None
    outbox_quarantined: int
    outbox_unstored: int
    storage_error: str | None
    uplink_capacity_bytes_per_s: float | None


class HardExample(TypedDict):
    """A sample worth training on, with the teacher's label and the reasons it was chosen."""

    event_id: str
    ts: int
    source_event_id: str
    device_id: str
    cohort: str
    model_version: int
    input: bytes
    input_encoding: InputEncoding
    input_shape: list[int]
    label: int
    edge_prediction: int
    confidence: float
    reasons: list[HardReason]


class LatencySplit(TypedDict):
    """Where the time of one decision went, in microseconds."""

    preprocess_us: int
    inference_us: int
    decision_us: int


class InferenceEvent(TypedDict):
    """One decision made on a device: one per frame the model ran on."""

    event_id: str
    device_id: str
    seq: int
    ts: int
    model_version: int
    threshold_version: int
    cohort: str
    prediction: int
    confidence: float
    confidence_kind: ConfidenceKind
    probs: list[float]
    threshold: float
    decision: Decision
    exit_index: int
    latency: LatencySplit
    frame_ts: int | None


class EnrichedInferenceEvent(TypedDict):
    """An InferenceEvent joined with its device's fleet record (same leading fields)."""

    event_id: str
    device_id: str
    seq: int
    ts: int
    model_version: int
    threshold_version: int
    cohort: str
    prediction: int
    confidence: float
    confidence_kind: ConfidenceKind
    probs: list[float]
    threshold: float
    decision: Decision
    exit_index: int
    latency: LatencySplit
    frame_ts: int | None
    enrichment: EnrichmentSource
    fleet_cohort: str
    hardware: str
    target: str
    site: str
    labels: dict[str, str]
    decommissioned: bool


class ModelRelease(TypedDict):
    """One step of a model rollout: a release to a cohort, a promotion, or a rollback."""

    event_id: str
    ts: int
    model_name: str
    model_version: int
    cohort: str
    stage: ReleaseStage
    wave: int
    artifact_url: str
    manifest_sha256: str
    target: str
    parent_version: int | None
    reason: str
    # The fraction of the cohort's devices a CANARY/WAVE step applies to, chosen by
    # edgeloop.artifacts.rollout.membership_score (Avro default 1.0: every device).
    share: float


class OffloadRequest(TypedDict):
    """A device asks the cloud to judge an unsure or a random audit sample."""

    event_id: str
    device_id: str
    seq: int
    ts: int
    model_version: int
    threshold_version: int
    cohort: str
    inference_event_id: str
    reason: Decision
    edge_prediction: int
    confidence: float
    input: bytes
    input_encoding: InputEncoding
    input_shape: list[int]


class StreamSignal(TypedDict):
    """Signals computed over one window of the stream for one device, cohort or the fleet."""

    event_id: str
    ts: int
    scope: Scope
    scope_id: str
    window_start: int
    window_end: int
    values: dict[str, float]
    sample_count: int


class ThresholdUpdate(TypedDict):
    """A new offload threshold for a device or cohort, with why it was chosen."""

    event_id: str
    ts: int
    scope: Scope
    scope_id: str
    threshold_version: int
    tau: float
    confidence_kind: ConfidenceKind
    audit_rate: float
    reason: str
    signals: dict[str, float]


class OffsetRange(TypedDict):
    """A half-open offset range [start, end) of one topic partition."""

    topic: str
    partition: int
    start_offset: int
    end_offset: int


class TrainingTrigger(TypedDict):
    """Asks the trainer to retrain on exactly the hard examples in the named ranges."""

    event_id: str
    ts: int
    trigger_id: str
    model_name: str
    base_model_version: int
    reason: TriggerReason
    ranges: list[OffsetRange]
    hard_example_count: int
    detail: str
