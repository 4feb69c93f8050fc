"""DeadLetter records of the bridge, Confluent-framed for `<topic>.dlq.v1`.

The bridge owns its dead-letter topics, so it registers the `DeadLetter` schema under
their subjects itself (once per topic, waiting out a registry outage with the caller's
retry). Shared by the uplink and the downlink, so both write the same facts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

from edgeloop.schemas import catalog
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import subject_for

Retry = Callable[[str, Callable[[], Awaitable[int]]], Awaitable[int]]


class DeadLetters:
    def __init__(self, registry: RegistryClient, stage: str, payload_bytes: int) -> None:
        self._registry = registry
        self._stage = stage
        self._payload_bytes = payload_bytes
        self._schema = catalog.get("DeadLetter")
        self._codec = ConfluentCodec()
        self._ids: dict[str, int] = {}

    async def encode(
        self,
        topic: str,
        *,
        reason: str,
        detail: str,
        source: str,
        device_id: str | None,
        payload: bytes,
        retry: Retry,
        payload_bytes: int | None = None,
    ) -> bytes:
        """The dead letter for `topic`, keeping the first `payload_bytes` of the payload
        (default: the configured cap; 0 keeps none).

        Raises:
            What `retry` gives up on while registering the schema (a permanent refusal).
        """
        cap = self._payload_bytes if payload_bytes is None else payload_bytes
        record = {
            "event_id": str(uuid.uuid4()),
            "ts": time.time_ns() // 1000,
            "stage": self._stage,
            "reason": reason,
            "detail": detail,
            "source": source,
            "client_id": None,
            "device_id": device_id,
            "payload": payload[:cap],
            "payload_size": len(payload),
            "truncated": len(payload) > cap,
        }
        schema_id = self._ids.get(topic)
        if schema_id is None:
            text = self._schema.text
            subject = subject_for(topic)
            schema_id = await retry("registry", lambda: self._registry.register(subject, text))
            self._ids[topic] = schema_id
        return self._codec.encode(schema_id, self._schema, record)
