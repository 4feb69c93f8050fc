"""Output event ids derived from input ids (RFC 4122 version 5 UUIDs).

A redelivered input yields the same output id, so a consumer that dedupes by `event_id`
removes the duplicates at-least-once delivery produces (after a crash, a rebalance, or a
commit Faust recorded but Kafka lost).
"""

from __future__ import annotations

import uuid

# Fixed namespace of edgeloop's derived ids: uuid5(NAMESPACE_URL, "edgeloop:agents").
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "edgeloop:agents")


def derived_id(kind: str, source_id: str) -> str:
    """The id of the `kind` output (verdict, hard, dlq, ...) of the input `source_id`."""
    return str(uuid.uuid5(NAMESPACE, f"{kind}:{source_id}"))
