"""paho-mqtt 2.x cannot read every PUBACK reason code a broker sends.

paho names reason codes per packet type and treats a code it has no PUBACK name for
as a malformed packet: it drops the connection. Mosquitto 2.0 answers a PUBLISH over
its `message_size_limit` with PUBACK 0x95 "Packet too large" (seen on 2.0.11: "Sending
PUBACK ... rc149"), which paho 2.2 does not list for PUBACK. The device would reconnect,
send the same row again and be cut off again, forever, never learning the reason.

`install()` swaps the class paho's packet decoder builds for one that keeps any code
(named "reason 0xNN" when paho has no name), so the uplink sees 0x95 and quarantines
the row (`edge/puback.py`). It reaches into `paho.mqtt._packet`, a private module:
pyproject pins paho-mqtt below 3 for it, and `install()` does nothing (and says so)
when that module no longer looks as expected.
"""

from __future__ import annotations

from paho.mqtt import _packet
from paho.mqtt.reasoncodes import ReasonCode

from edgeloop.core.logs import get_logger

log = get_logger(__name__)


class AnyReasonCode(ReasonCode):
    """A ReasonCode that accepts every code on the wire."""

    def unpack(self, buffer: bytes | bytearray) -> int:
        try:
            return super().unpack(buffer)
        except (KeyError, ValueError):
            self.value = buffer[0]
            return 1

    def getName(self) -> str:  # noqa: N802 - paho's method name
        try:
            return super().getName()
        except (KeyError, ValueError):
            return f"reason 0x{self.value:02X}"


def install() -> bool:
    """Make paho's decoder keep unknown reason codes; True when it is in place."""
    current = getattr(_packet, "ReasonCode", None)
    if current is AnyReasonCode:
        return True
    if current is not ReasonCode:
        log.warning("paho's packet decoder changed; unknown PUBACK reason codes drop the link")
        return False
    setattr(_packet, "ReasonCode", AnyReasonCode)  # noqa: B010 - a private module's global
    return True
