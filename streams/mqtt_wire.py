"""The few MQTT 5 packets the bridge's uplink needs, encoded and parsed by hand.

Why not a library here: measured on the 2-core benchmark machine, paho's receive path
(packet objects, callbacks, locks) tops out near 5k QoS 1 messages/s *before* the bridge
does any work, half the bridge's target. The uplink needs CONNECT, SUBSCRIBE, PUBLISH
(QoS 0/1 in), PUBACK out, PINGREQ and DISCONNECT; those are a few dozen lines of the
MQTT 5.0 specification (OASIS, sections 3.1-3.14). Everything else (downlink, devices)
uses aiomqtt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"


class ProtocolError(Exception):
    """The broker sent something this client cannot accept; the connection is dropped."""


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
) -> bytes:
    flags = (0x80 if username else 0) | (0x40 if password else 0) | (0x02 if clean_start else 0)
    props = (
        b"\x11" + struct.pack("!I", session_expiry_s) + b"\x21" + struct.pack("!H", receive_maximum)
    )
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


def split_packets(buf: bytes) -> tuple[list[tuple[int, int, memoryview]], int]:
    """Complete packets at the start of `buf` as (type, flags, body); and bytes consumed."""
    packets: list[tuple[int, int, memoryview]] = []
    view = memoryview(buf)
    pos, end = 0, len(buf)
    while pos + 2 <= end:
        first = buf[pos]
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= end:
                return packets, pos
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("remaining length longer than 4 bytes")
        if i + length > end:
            break
        packets.append((first >> 4, first & 0x0F, view[i : i + length]))
        pos = i + length
    return packets, pos


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


def parse_connack(body: memoryview) -> tuple[bool, int]:
    """(session present, reason code)."""
    return bool(body[0] & 0x01), body[1]


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
