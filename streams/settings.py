"""Settings of the MQTT ⇄ Kafka bridge."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from edgeloop.core.settings import _Base
from edgeloop.schemas.bounded import DecodeLimits


class BridgeSettings(_Base):
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_BRIDGE_", frozen=True, extra="ignore"
    )

    uplink: bool = True
    downlink: bool = True
    # Shared-subscription group: every bridge process in a group gets a share of the load.
    share_group: str = "edgeloop-bridge"
    # A stable id per process: the broker keeps its unacknowledged messages for it across
    # a crash (persistent session) and redelivers them after the restart.
    client_id: str = "edgeloop-bridge-1"
    session_expiry_s: int = Field(3600, ge=0)
    # MQTT 5 Receive Maximum: the most unacknowledged QoS 1 messages the broker should
    # send us. Mosquitto 2.0.11 sends more on a backlog (docs/architecture.md, "Receive
    # Maximum"), so it bounds neither memory nor duplicates on its own.
    receive_maximum: int = Field(1000, ge=1, le=65535)
    # Payload cap: a bigger payload is dead-lettered (`oversize`). The bridge announces
    # this plus room for the topic and properties as its MQTT Maximum Packet Size, so the
    # broker never sends a larger packet; the broker's own `message_size_limit` (the
    # generated Mosquitto config uses the same default) refuses bigger publishes to the
    # device with PUBACK 0x95.
    max_message_bytes: int = Field(256 * 1024, ge=64)
    # Timestamps outside this window are dead-lettered `bad_timestamp` (see DecodeLimits),
    # on the uplink and the downlink alike; an empty window is refused at start-up.
    min_timestamp_us: int = DecodeLimits.min_timestamp_us
    max_timestamp_us: int = DecodeLimits.max_timestamp_us
    # MQTT keep-alive: a PINGREQ every half of it; a connection silent for a whole
    # keep-alive after a PINGREQ is dropped and re-established (half-open detection).
    keepalive_s: int = Field(30, ge=0, le=65535)
    # Graceful stop: how long settling the in-flight records may take before the intake
    # disconnects anyway (keep it under the runner's shutdown timeout, 10 s).
    drain_timeout_s: float = Field(5.0, gt=0)
    validation: Literal["full", "header"] = "full"
    # native: the asyncio MQTT 5 receive path (fast); paho: paho-mqtt on its own thread.
    intake: Literal["native", "paho"] = "native"
    # Kafka producer batching. aiokafka batches on its own while a request is in flight,
    # so lingering only adds latency at low rates (measured: p50 2.8 ms at 0, 8.5 ms at 5).
    linger_ms: int = Field(0, ge=0)
    max_batch_bytes: int = Field(256 * 1024, ge=1024)
    # The producer refuses a record larger than this itself (aiokafka's max_request_size);
    # match it to the brokers' `message.max.bytes`. A refused record is dead-lettered.
    max_request_bytes: int = Field(1024 * 1024, ge=1024)
    # How much of a rejected payload the dead-letter event keeps.
    dlq_payload_bytes: int = Field(4096, ge=0)
    retry_backoff_max_s: float = Field(5.0, gt=0)
    downlink_group: str = "edgeloop-bridge-downlink"
    metrics_port: int | None = None

    @model_validator(mode="after")
    def _window_is_not_empty(self) -> BridgeSettings:
        self.decode_limits()  # raises ConfigError naming both bounds
        return self

    def decode_limits(self) -> DecodeLimits:
        """The caps both directions decode untrusted bytes with.

        Raises:
            ConfigError: the timestamp window is empty.
        """
        return DecodeLimits(
            max_message_bytes=self.max_message_bytes,
            min_timestamp_us=self.min_timestamp_us,
            max_timestamp_us=self.max_timestamp_us,
        )
