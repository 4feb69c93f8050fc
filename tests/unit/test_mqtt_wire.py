"""The bridge's MQTT 5 codec against packets built by paho (an independent encoder)."""

from __future__ import annotations

import struct

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.streams import mqtt_wire as wire


def publish_packet(
    topic: str, payload: bytes, qos: int, packet_id: int, properties: bytes = b"\x00"
) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode()
    if qos:
        body += struct.pack("!H", packet_id)
    body += properties + payload
    return bytes([0x30 | (qos << 1)]) + wire._varint(len(body)) + body


def test_publish_round_trip_with_properties_and_a_long_payload() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = 60
    packed = props.pack()  # type: ignore[no-untyped-call]
    payload = b"\xc3\x01" + bytes(range(256)) * 2  # > 127 bytes: a 2-byte remaining length
    data = publish_packet("edgeloop/pi-1/up/inference", payload, 1, 513, packed)
    packets, used, _ = wire.split_packets(data)
    assert used == len(data)
    [(kind, flags, body)] = packets
    assert kind == wire.PUBLISH
    msg = wire.parse_publish(flags, body)
    assert (msg.topic, msg.payload, msg.qos, msg.packet_id) == (
        "edgeloop/pi-1/up/inference",
        payload,
        1,
        513,
    )


def test_split_keeps_an_incomplete_packet_for_the_next_read() -> None:
    one = publish_packet("t/a", b"x" * 10, 1, 1)
    two = publish_packet("t/b", b"y" * 300, 0, 0)
    data = one + two[:7]
    packets, used, need = wire.split_packets(data)
    assert len(packets) == 1 and used == len(one)
    assert need == len(two)  # the whole next packet, known from its header
    packets, used, _ = wire.split_packets(data[used:] + two[7:])
    [(_, flags, body)] = packets
    msg = wire.parse_publish(flags, body)
    assert (msg.topic, msg.qos, msg.payload) == ("t/b", 0, b"y" * 300)


def test_acks_and_connect_are_well_formed() -> None:
    assert wire.puback(0x1234) == b"\x40\x02\x12\x34"
    packet = wire.connect(
        "bridge-1",
        username="u",
        password="p",
        keepalive=30,
        clean_start=False,
        session_expiry_s=3600,
        receive_maximum=1000,
    )
    assert packet[0] == 0x10
    [(kind, _, body)], _, _ = wire.split_packets(packet)
    assert kind == wire.CONNECT
    assert bytes(body[:7]) == b"\x00\x04MQTT\x05"
    assert body[7] == 0xC0  # username and password, no clean start
    # Session Expiry 3600 and Receive Maximum 1000 in the properties.
    assert b"\x11\x00\x00\x0e\x10" in bytes(body) and b"\x21\x03\xe8" in bytes(body)


def test_a_five_byte_remaining_length_is_a_protocol_error() -> None:
    with pytest.raises(wire.ProtocolError):
        wire.split_packets(b"\x30\xff\xff\xff\xff\x01")
