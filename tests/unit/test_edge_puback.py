"""Every MQTT 5 PUBACK reason code has a deliberate outcome (MQTT 5.0 §3.4.2.1), and the
uplink acts on it: delivered rows go, dropped or refused-for-now rows stay, permanently
refused rows are quarantined (kept, counted, reported), never silently deleted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes

from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.outbox import Outbox, Refusal
from edgeloop.edge.paho_compat import AnyReasonCode, install
from edgeloop.edge.puback import REASONS, Disposition, classify, reason_name
from edgeloop.edge.uplink import LinkConfig, MqttUplink, UplinkRejectedError

D = Disposition
# The spec's PUBACK list (§3.4.2.1) plus codes brokers send there in practice.
EXPECTED = {
    0x00: D.DELIVERED,
    0x10: D.RETRY,  # accepted, then discarded: no subscriber
    0x80: D.RETRY,
    0x83: D.RETRY,
    0x87: D.IDENTITY,
    0x89: D.RETRY,
    0x90: D.QUARANTINE,
    0x91: D.RETRY,
    0x95: D.QUARANTINE,
    0x96: D.RETRY,
    0x97: D.RETRY,
    0x99: D.QUARANTINE,
    0x9A: D.QUARANTINE,
}


@pytest.mark.parametrize("code", sorted(EXPECTED), ids=lambda c: f"0x{c:02X}")
def test_every_reason_code_has_its_outcome(code: int) -> None:
    assert classify(code) is EXPECTED[code]
    assert reason_name(code) == REASONS[code][0]


def test_the_table_covers_every_code_of_the_spec_list() -> None:
    spec_puback_codes = {0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}
    assert spec_puback_codes <= set(REASONS)
    assert set(REASONS) == set(EXPECTED)


@pytest.mark.parametrize("code", [0x01, 0x11, 0x7F, 0x81, 0xA2, 0xFF])
def test_an_unknown_code_keeps_the_row(code: int) -> None:
    # Not proof of delivery, and no reason to give the event up either.
    assert classify(code) is D.RETRY
    assert reason_name(code) == f"reason 0x{code:02X}"


def test_only_success_deletes() -> None:
    assert [c for c in range(256) if classify(c) is D.DELIVERED] == [0x00]


def test_paho_reads_a_puback_0x95_instead_of_dropping_the_link() -> None:
    # What Mosquitto 2.0.11 sends for a publish over message_size_limit: mid 4, rc 0x95.
    from paho.mqtt import _packet
    from paho.mqtt.enums import MQTTProtocolVersion

    assert install()
    decoded = _packet.decode_puback(0x40, b"\x00\x04\x95", MQTTProtocolVersion.MQTTv5)
    assert (decoded.mid, decoded.reason.value) == (4, 0x95)
    assert classify(decoded.reason.value) is D.QUARANTINE
    assert decoded.reason.getName() == "reason 0x95"


# -- the quarantine table ------------------------------------------------------------------


def fill(box: Outbox, n: int) -> list[int]:
    """n rows; row seq s has payload b"e<s>"."""
    return [box.append("inference", lambda s: b"e%d" % s, created_us=0).seq for _ in range(n)]


def test_settle_deletes_delivered_and_quarantines_refused_in_one_go(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", capacity=100)
    fill(box, 5)
    done = box.settle([1, 2], [Refusal(3, 0x95, "Packet too large")])
    assert (done.deleted, done.quarantined) == (2, 1)
    assert [r.seq for r in box.peek(0, 10)] == [4, 5]
    assert box.depth == 2
    (row, code, reason), *_ = box.quarantine()
    assert (row.seq, row.payload, code, reason) == (3, b"e3", 0x95, "Packet too large")
    box.close()
    again = Outbox(tmp_path / "o.db", capacity=100)  # counted and kept across a restart
    assert again.quarantined == 1 and again.quarantine_depth == 1
    assert [r.seq for r, _, _ in again.quarantine()] == [3]


def test_a_full_quarantine_drops_its_oldest_and_counts_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", capacity=100, quarantine_capacity=2)
    fill(box, 3)
    box.settle([], [Refusal(s, 0x99, "Payload format invalid") for s in (1, 2, 3)])
    assert [r.seq for r, _, _ in box.quarantine()] == [2, 3]
    assert (box.quarantined, box.quarantine_dropped, box.depth) == (3, 1, 0)


# -- the uplink acting on the codes (a scripted paho client stands in for the broker) ------


@dataclass
class Info:
    mid: int
    rc: int = 0


@dataclass
class ScriptedPaho:
    """Answers each publish with the next scripted reason code, as a broker would."""

    codes: list[int]
    uplink: MqttUplink | None = None
    sent: list[str] = field(default_factory=list)
    on_publish: Any = None

    def publish(self, topic: str, payload: bytes, qos: int) -> Info:
        mid = len(self.sent) + 1
        self.sent.append(topic)
        code = self.codes.pop(0)
        rc = AnyReasonCode(PacketTypes.PUBACK)
        rc.unpack(bytes([code]))
        asyncio.get_running_loop().call_soon(self.on_publish, None, None, mid, rc, None)
        return Info(mid)


@dataclass
class FakeClient:
    _client: ScriptedPaho


async def _ignore(*_: object) -> None:
    return None


def make_uplink(tmp_path: Path, codes: list[int]) -> tuple[MqttUplink, FakeClient, Outbox]:
    box = Outbox(tmp_path / "o.db", capacity=100)
    fill(box, len(codes))
    uplink = MqttUplink(
        LinkConfig("dev-1", "127.0.0.1", 1, None, window=len(codes)),
        box, on_downlink=_ignore, will=lambda: b"", metrics=EdgeMetrics(),
    )  # fmt: skip
    client = FakeClient(ScriptedPaho(codes))
    uplink._hook_pubacks(client)  # type: ignore[arg-type]
    return uplink, client, box


async def test_a_window_is_settled_row_by_row_by_reason_code(tmp_path: Path) -> None:
    uplink, client, box = make_uplink(tmp_path, [0x00, 0x10, 0x95, 0x00, 0x97])
    retry = await uplink._send_window(client, box.peek(0, 10))  # type: ignore[arg-type]
    # 1 and 4 delivered (deleted); 2 (no subscriber) and 5 (quota) kept; 3 quarantined.
    assert retry == 2
    assert [r.seq for r in box.peek(0, 10)] == [2, 5]
    assert [(r.seq, code) for r, code, _ in box.quarantine()] == [(3, 0x95)]
    m = uplink.metrics
    assert m.outbox_quarantined.labels("dev-1", "Packet too large")._value.get() == 1
    assert m.publish_rejected.labels("dev-1", "No matching subscribers")._value.get() == 1
    assert m.published.labels("dev-1", "inference")._value.get() == 2
    assert uplink.last_error is not None and "No matching subscribers" in uplink.last_error


async def test_no_subscriber_keeps_every_row(tmp_path: Path) -> None:
    uplink, client, box = make_uplink(tmp_path, [0x10] * 4)
    assert await uplink._send_window(client, box.peek(0, 10)) == 1  # type: ignore[arg-type]
    assert box.depth == 4 and box.quarantined == 0


async def test_not_authorized_stops_the_uplink_and_keeps_the_rows(tmp_path: Path) -> None:
    uplink, client, box = make_uplink(tmp_path, [0x00, 0x87, 0x87])
    with pytest.raises(UplinkRejectedError, match="CN must be the device id"):
        await uplink._send_window(client, box.peek(0, 10))  # type: ignore[arg-type]
    # What was delivered is settled; the refused rows stay for a device with the right cert.
    assert [r.seq for r in box.peek(0, 10)] == [2, 3]
    assert box.quarantined == 0
