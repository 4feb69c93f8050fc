"""What the device does with each MQTT 5 PUBACK reason code (MQTT 5.0 §3.4.2.1).

A code below 0x80 is a "success" to the protocol, but only 0x00 means the broker took
the message for a subscriber. 0x10 "No matching subscribers" means it was accepted and
thrown away: it happens before any bridge has subscribed, after a bridge's session
expired, after a broker lost its state. So:

- DELIVERED (0x00): the row is deleted.
- RETRY: 0x10 and the refusals that can pass later (0x80 unspecified, 0x83
  implementation specific, 0x89 server busy, 0x91 packet id in use, 0x96 message rate
  too high, 0x97 quota exceeded, and any code this table does not know): the row stays
  and is sent again after a backoff. The broker dropped it, so no duplicate results.
- QUARANTINE: refusals that the same bytes on the same topic will get every time
  (0x90 topic name invalid, 0x95 packet too large, 0x99 payload format invalid,
  0x9A retain not supported): the row moves to the outbox's quarantine table, counted
  and reported; the rows behind it go on.
- IDENTITY (0x87 not authorized): permanent too, but not about the row. Topics are
  built from the device id, and the broker's ACL allows `edgeloop/<certificate CN>/#`,
  so 0x87 means the certificate is not this device's and every row would be refused
  (the status reports that would tell the cloud included). The uplink stops with that
  error and keeps every row, instead of quarantining the whole outbox.
"""

from __future__ import annotations

import enum


class Disposition(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    QUARANTINE = "quarantine"
    IDENTITY = "identity"


# Code -> (name as the spec spells it, what the device does). 0x89, 0x95, 0x96 and 0x9A
# are not in the spec's PUBACK list, but brokers send them there (Mosquitto: 0x95 for a
# publish over message_size_limit).
REASONS: dict[int, tuple[str, Disposition]] = {
    0x00: ("Success", Disposition.DELIVERED),
    0x10: ("No matching subscribers", Disposition.RETRY),
    0x80: ("Unspecified error", Disposition.RETRY),
    0x83: ("Implementation specific error", Disposition.RETRY),
    0x87: ("Not authorized", Disposition.IDENTITY),
    0x89: ("Server busy", Disposition.RETRY),
    0x90: ("Topic Name invalid", Disposition.QUARANTINE),
    0x91: ("Packet Identifier in use", Disposition.RETRY),
    0x95: ("Packet too large", Disposition.QUARANTINE),
    0x96: ("Message rate too high", Disposition.RETRY),
    0x97: ("Quota exceeded", Disposition.RETRY),
    0x99: ("Payload format invalid", Disposition.QUARANTINE),
    0x9A: ("Retain not supported", Disposition.QUARANTINE),
}


def classify(code: int) -> Disposition:
    """What to do with a row whose publish got PUBACK reason `code`.

    An unknown code keeps the row (RETRY): it proves no delivery, and guessing
    "permanent" would take the event out of the outbox on a broker's whim.
    """
    known = REASONS.get(code)
    return known[1] if known is not None else Disposition.RETRY


def reason_name(code: int) -> str:
    """The spec's name of `code` (for logs, metric labels and the quarantine table)."""
    known = REASONS.get(code)
    return known[0] if known is not None else f"reason 0x{code:02X}"
