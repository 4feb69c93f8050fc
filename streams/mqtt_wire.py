"""The few MQTT 5 packets the bridge's uplink needs, encoded and parsed by hand.

Why not a library here: measured on the 2-core benchmark machine, paho's receive path
(packet objects, callbacks, locks) tops out near 5k QoS 1 messages/s *before* the bridge
does any work, half the bridge's target. The uplink needs CONNECT, SUBSCRIBE, PUBLISH
(QoS 0/1 in), PUBACK out, PINGREQ/PINGRESP and DISCONNECT; those are a few dozen lines
of the MQTT 5.0 specification (OASIS, sections 3.1-3.14). Everything else (downlink,
devices) uses aiomqtt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
# MQTT 5 section 3.14.2.1: DISCONNECT with reason 0x95 "Packet too large" (no properties).
DISCONNECT_TOO_LARGE = b"\xe0\x01\x95"

# CONNACK property identifiers this client reads (MQTT 5 section 3.2.2.3).
SERVER_KEEP_ALIVE = 0x13

# Property id -> how its value is encoded (MQTT 5 section 2.2.2.2), to step over the ones
# this client does not read.
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), _BYTE),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), _TWO),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), _FOUR),
    0x0B: _VARINT,
    **dict.fromkeys((0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F), _UTF8),
    **dict.fromkeys((0x09, 0x16), _BINARY),
    0x26: _PAIR,
}


class ProtocolError(Exception):
    """The broker sent something this client cannot accept; the connection is dropped."""


class PacketTooLargeError(ProtocolError):
    """A packet is larger than the Maximum Packet Size this client announced.

    MQTT 5 section 3.1.2.11.4: the server must not send one; a client that receives one
    treats it as a protocol error and disconnects with reason 0x95. It is refused as soon
    as its remaining length is decoded, before any of its body is buffered.
    """


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + _varint(len(body)) + body


def connect(
    client_id: str,
    *,
    username: str | None,
    password: str | None,
    keepalive: int,
    clean_start: bool,
    session_expiry_s: int,
    receive_maximum: int,
    maximum_packet_size: int | None = None,
) -> bytes:
    """A CONNECT packet (MQTT 5 section 3.1).

    `maximum_packet_size` (property 0x27) tells the server the largest packet this client
    accepts; per section 3.1.2.11.4 the server drops a larger PUBLISH for this client
    instead of sending it.
    """
    flags = (0x80 if username else 0) | (0x40 if password else 0) | (0x02 if clean_start else 0)
    props = (
        b"\x11" + struct.pack("!I", session_expiry_s) + b"\x21" + struct.pack("!H", receive_maximum)
    )
    if maximum_packet_size is not None:
        props += b"\x27" + struct.pack("!I", maximum_packet_size)
    body = _utf8("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive)
    body += _varint(len(props)) + props + _utf8(client_id)
    if username:
        body += _utf8(username)
    if password:
        body += _utf8(password)
    return _packet(CONNECT, 0, body)


def subscribe(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00" + _utf8(topic_filter) + bytes([qos])
    return _packet(SUBSCRIBE, 0b0010, body)


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int


def split_packets(
    buf: bytes, max_body: int | None = None
) -> tuple[list[tuple[int, int, memoryview]], int, int]:
    """Complete packets at the start of `buf` as (type, flags, body).

    Args:
        buf: bytes received, starting at a packet boundary.
        max_body: the largest remaining length accepted (None: any).

    Returns:
        (packets, bytes consumed, size of the incomplete packet that follows: its whole
        length once its header is complete, else 0). The caller buffers the rest until
        that many bytes are there, without parsing again (reassembly stays linear).

    Raises:
        ProtocolError: a remaining length longer than 4 bytes.
        PacketTooLargeError: a remaining length over `max_body`, as soon as it is decoded.
    """
    packets: list[tuple[int, int, memoryview]] = []
    view = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        first = buf[pos]
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= end:
                return packets, pos, 0
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("remaining length longer than 4 bytes")
        if max_body is not None and length > max_body:
            raise PacketTooLargeError(
                f"packet type {first >> 4} of {length} bytes exceeds the {max_body}-byte maximum"
            )
        if i + length > end:
            return packets, pos, i + length - pos
        packets.append((first >> 4, first & 0x0F, view[i : i + length]))
        pos = i + length
    return packets, pos, 0


def parse_publish(flags: int, body: memoryview) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    topic_len = (body[0] << 8) | body[1]
    topic = bytes(body[2 : 2 + topic_len]).decode()
    pos = 2 + topic_len
    packet_id = 0
    if qos:
        packet_id = (body[pos] << 8) | body[pos + 1]
        pos += 2
    # Properties: skipped (no topic aliases: we never allowed any in CONNECT).
    props_len, shift = 0, 0
    while True:
        byte = body[pos]
        pos += 1
        props_len |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    pos += props_len
    return Publish(topic, bytes(body[pos:]), qos, packet_id)


@dataclass(slots=True)
class Connack:
    session_present: bool
    reason: int
    # Server Keep Alive (property 0x13): when present, the client must use it instead of
    # the keep-alive it asked for (MQTT 5 section 3.2.2.3.14).
    server_keep_alive: int | None


def parse_connack(body: memoryview) -> Connack:
    """CONNACK (MQTT 5 section 3.2): session present, reason code and the properties read."""
    props = _properties(body, 2) if len(body) > 2 else {}
    keep_alive = props.get(SERVER_KEEP_ALIVE)
    return Connack(
        bool(body[0] & 0x01), body[1], keep_alive if isinstance(keep_alive, int) else None
    )


def _properties(body: memoryview, pos: int) -> dict[int, int | bytes]:
    """The properties at `pos`: integers as int, everything else as raw bytes."""
    length, pos = _read_varint(body, pos)
    end = pos + length
    if end > len(body):
        raise ProtocolError("properties run past the end of the packet")
    out: dict[int, int | bytes] = {}
    while pos < end:
        ident = body[pos]
        pos += 1
        kind = _PROPERTY_TYPES.get(ident)
        if kind is None:
            raise ProtocolError(f"unknown property identifier {ident:#04x}")
        if kind == _BYTE:
            out[ident], pos = body[pos], pos + 1
        elif kind == _TWO:
            out[ident], pos = (body[pos] << 8) | body[pos + 1], pos + 2
        elif kind == _FOUR:
            out[ident], pos = int.from_bytes(body[pos : pos + 4], "big"), pos + 4
        elif kind == _VARINT:
            out[ident], pos = _read_varint(body, pos)
        else:
            for _ in range(2 if kind == _PAIR else 1):
                size = (body[pos] << 8) | body[pos + 1]
                out[ident], pos = bytes(body[pos + 2 : pos + 2 + size]), pos + 2 + size
    if pos != end:
        raise ProtocolError("a property runs past the properties' length")
    return out


def _read_varint(body: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ProtocolError("variable byte integer longer than 4 bytes")


def parse_suback(body: memoryview) -> tuple[int, list[int]]:
    packet_id = (body[0] << 8) | body[1]
    props_len, pos, shift = 0, 2, 0
    while True:
        byte = body[pos]
        pos += 1
        props_len |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return packet_id, list(body[pos + props_len :])
