"""Settings of the Faust stream worker (`edgeloop agents`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from edgeloop.core.settings import _Base
from edgeloop.schemas.topics import level_problem

# The redelivery window the dedupe table must cover, in events per device: a device
# re-publishes at most its QoS 1 in-flight window after a reconnect (EdgeSettings.
# publish_window, 64), and a crashed bridge's broker session redelivers at most its
# Receive Maximum (BridgeSettings.receive_maximum, 1000), all of which may come from one
# device. Their sum bounds how far behind the newest seq a duplicate can arrive.
EDGE_PUBLISH_WINDOW = 64
BRIDGE_RECEIVE_MAXIMUM = 1000
DEFAULT_DEDUPE_WINDOW = EDGE_PUBLISH_WINDOW + BRIDGE_RECEIVE_MAXIMUM


class AgentsSettings(_Base):
    """One frozen model per service (env prefix `EDGELOOP_AGENTS_`)."""

    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_AGENTS_", frozen=True, extra="ignore"
    )

    # Faust app id = consumer group and the prefix of the table changelog topics, so it
    # must make legal Kafka topic names: [A-Za-z0-9._-], at most 249 characters with the
    # longest suffix ("-dedupe-inference-changelog", 27).
    app_id: str = "edgeloop-agents"
    # Partitions of the changelog topics; must equal the source topics' (co-partitioning:
    # a device's fleet record, dedupe state and events live on the same partition number).
    partitions: int = Field(6, ge=1)
    # The address the worker's web server listens on (and names itself by).
    web_host: str = "127.0.0.1"
    # Faust's web server: /metrics (Prometheus) and Faust's own pages (health at /).
    # 1..65535: Faust's web server cannot take 0 (an OS-chosen port) and crashed on it.
    web_port: int = Field(6066, ge=1, le=65535)
    # Faust's data folder (memory tables keep nothing there, Faust still writes to it).
    # The CLI defaults it to $EDGELOOP_HOME/agents.
    data_dir: Path = Path(".edgeloop/agents")
    # ---- batching (stream.take) ----------------------------------------------------------
    # Faust fills a `take` buffer one event at a time (tens of microseconds each) and
    # yields it when full or `within` after it started waiting: a short `within` makes
    # small batches even with a backlog, and per-batch costs (one dedupe write per device,
    # one metrics update) then count per event. Enrichment is not latency-critical.
    batch_max: int = Field(1000, ge=1)
    batch_within_s: float = Field(0.05, gt=0)
    # Verdicts go back to a waiting device: small batches, short wait.
    verdict_batch_max: int = Field(256, ge=1)
    verdict_batch_within_s: float = Field(0.01, gt=0)
    # Faust's stream buffer per topic partition and aiokafka's records per poll.
    stream_buffer_maxsize: int = Field(16_384, ge=64)
    max_poll_records: int = Field(1000, ge=1)
    # How often the consumer refreshes its metadata. The group leader rebalances when a
    # subscribed topic's partitions change in it, and Faust's assignor skips a topic the
    # leader's metadata lists without partitions: on Apache Kafka a topic Faust created
    # a moment before (the control log) can be listed so while its leader is elected. At
    # aiokafka's default (5 min) the control plane then stayed off for minutes.
    metadata_max_age_s: float = Field(10.0, gt=0)
    # How long a stop on SIGINT/SIGTERM may take before the process exits anyway
    # (agents/bounded_stop.py); a second signal exits at once.
    stop_timeout_s: float = Field(30.0, gt=0)
    # A killed worker's partitions move to the others once its group session times out.
    session_timeout_s: float = Field(10.0, gt=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # A source partition behind its high watermark whose read position has not moved for
    # this long is treated as stalled (see Context.update_lag) and resumed; one whose read
    # position stays ahead of what its stage was handed for this long, with the stage
    # idle, has a tail hole (OffsetLedger.tail_holes) and is read directly.
    stall_s: float = Field(15.0, gt=0)
    producer_linger_ms: int = Field(5, ge=0)
    producer_max_batch_bytes: int = Field(256 * 1024, ge=1024)
    # ---- stages ---------------------------------------------------------------------------
    verdicts: bool = True  # the teacher stage (needs a teacher model)
    # Events per device the dedupe state covers behind the newest seq (see above).
    dedupe_window: int = Field(DEFAULT_DEDUPE_WINDOW, ge=8, le=1 << 20)
    # Dedupe windows are written to their table (changelog) at most this often; see
    # agents.dedupe.DedupeState for why a delay never loses an event.
    dedupe_flush_s: float = Field(0.5, ge=0)
    # Fleet table entries whose decoded enrichment is cached in memory (LRU).
    fleet_cache_size: int = Field(100_000, ge=1)
    max_message_bytes: int = Field(1 << 20, ge=64)
    dlq_payload_bytes: int = Field(4096, ge=0)
    # ---- teacher --------------------------------------------------------------------------
    # The CLI defaults these to where `models bootstrap` and `keys init` put them:
    # $EDGELOOP_HOME/trainer/store and $EDGELOOP_HOME/keys/release.pub.
    store: str = Field(".edgeloop/trainer/store", description="directory or http(s) URL")
    public_key: Path = Path(".edgeloop/keys/release.pub")
    teacher_name: str = "digits-teacher"
    teacher_max_batch: int = Field(64, ge=1)
    teacher_max_wait_s: float = Field(0.005, ge=0)
    teacher_queue_size: int = Field(4096, ge=1)
    # How often the store is checked for a newer (verified) teacher release.
    teacher_reload_s: float = Field(30.0, gt=0)
    max_decoded_input_bytes: int = Field(1 << 20, ge=64)
    # ---- hard-example router (KubeEdge Sedna filter family) -----------------------------
    confidence_threshold: float = Field(0.8, ge=0, le=1)
    margin_threshold: float = Field(0.2, ge=0, le=1)
    entropy_threshold: float = Field(0.5, ge=0, le=1)
    per_device_cap: int = Field(50, ge=1)
    global_cap: int = Field(1000, ge=1)
    budget_window_s: float = Field(60.0, gt=0)
    # Near-duplicate suppression: difference hashes within this many bits are one sample.
    near_duplicates: bool = True
    near_dup_hamming: int = Field(4, ge=0, le=64)
    # Cohorts the control plane marks as drifting (a hook until it writes a table). The
    # variable takes a comma-separated list (`a,b`) or a JSON list (`["a","b"]`).
    drifting_cohorts: Annotated[frozenset[str], NoDecode] = frozenset()
    retry_backoff_max_s: float = Field(5.0, gt=0)

    @field_validator("app_id")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", value):
            raise ValueError(
                "must be 1-200 of the characters A-Z a-z 0-9 . _ - (it prefixes the "
                "worker's Kafka topic names)"
            )
        return value

    @field_validator("drifting_cohorts", mode="before")
    @classmethod
    def _cohort_list(cls, value: Any) -> Any:
        """`a,b` or `["a","b"]` from the environment; each a cohort id (one MQTT topic
        level, as `edgeloop fleet` accepts)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list: {exc}") from None
            elif text.startswith(("{", '"')):
                raise ValueError('expected a comma-separated list (a,b) or a JSON list (["a","b"])')
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(value, list | tuple | set | frozenset):
            for cohort in value:
                problem = level_problem(cohort)
                if problem is not None:
                    raise ValueError(f"cohort {cohort!r} {problem}")
        return value
