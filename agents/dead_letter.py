"""Dead letters of the agents: the bytes a stage could not process, with the reason."""

from __future__ import annotations

from edgeloop.agents.ids import derived_id
from edgeloop.schemas.events import DeadLetter


def dead_letter(
    *,
    stage: str,
    reason: str,
    detail: str,
    source: str,
    payload: bytes,
    device_id: str | None,
    cap: int,
    now_us: int,
) -> DeadLetter:
    """The DeadLetter record for `payload` read from `source` (`topic/partition/offset`).

    Its id derives from `source`, so a redelivered bad record dead-letters under the same
    id. `payload` is kept up to `cap` bytes (the DLQ is for diagnosis, not storage).
    """
    return {
        "event_id": derived_id("dlq", source),
        "ts": now_us,
        "stage": stage,
        "reason": reason,
        "detail": detail[:2000],
        "source": source,
        "client_id": None,
        "device_id": device_id,
        "payload": payload[:cap],
        "payload_size": len(payload),
        "truncated": len(payload) > cap,
    }
