"""The end-to-end benchmark's fleet: device connections (mTLS) publishing at a set rate.

Run as `python -m edgeloop.bench.e2e_devices PLAN OUT` by `e2e_bench`, in its own
process so it does not share a GIL with what it measures. Every device is one paho
client over mutual TLS (its own certificate, as a Pi connects), subscribed to its
`edgeloop/<d>/down/verdict`. Messages are encoded before the clock starts (inference is
excluded, as the benchmark's issue asks) and paced in one thread at the offered rate;
each one's publish time (time.time(), taken just before `publish`), its PUBACK time and
each verdict's arrival time are written to OUT as JSON, with the mean cores each process
named in the plan's `cpu_pids` (and this one) used from the first publish to the last
PUBACK and verdict.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.bench import proc_cpu
from edgeloop.bench.fleet_load import inference_event
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import SingleObjectCodec
from edgeloop.schemas.topics import UplinkKind, mqtt_uplink


@dataclass(frozen=True)
class Message:
    device: int
    event_id: str
    kind: str  # "inference" | "offload"
    topic: str
    payload: bytes


def _offload(device: str, seq: int, of_seq: int, pixels: bytes) -> dict[str, Any]:
    return {
        "event_id": f"{device}:{seq}", "device_id": device, "seq": seq,
        "ts": time.time_ns() // 1000, "model_version": 1, "threshold_version": 1,
        "cohort": "default", "inference_event_id": f"{device}:{of_seq}", "reason": "OFFLOAD",
        "edge_prediction": of_seq % 10, "confidence": 0.4,
        "input": zlib.compress(pixels, 6), "input_encoding": "U8_ZLIB", "input_shape": [8, 8],
    }  # fmt: skip


def encode_messages(
    devices: list[str], total: int, offload_every: int, first_seq: int
) -> list[Message]:
    """`total` InferenceEvents interleaved across `devices`, and after every
    `offload_every`-th one an OffloadRequest for it (a shared per-device seq, as the
    edge's outbox numbers both). Pixels: a fixed 8x8 gradient (the teacher's answer is
    not what is measured)."""
    codec = SingleObjectCodec()
    inf, off = catalog.get("InferenceEvent"), catalog.get("OffloadRequest")
    pixels = bytes((i * 4) % 256 for i in range(64))
    seqs = [first_seq] * len(devices)
    out: list[Message] = []
    for i in range(total):
        d = i % len(devices)
        dev, seq = devices[d], seqs[d]
        out.append(Message(d, f"{dev}:{seq}", "inference", mqtt_uplink(dev, UplinkKind.INFERENCE),
                           codec.encode(inf, inference_event(dev, seq))))  # fmt: skip
        seqs[d] += 1
        if offload_every and i % offload_every == offload_every - 1:
            o = seqs[d]
            out.append(Message(d, f"{dev}:{o}", "offload", mqtt_uplink(dev, UplinkKind.OFFLOAD),
                               codec.encode(off, _offload(dev, o, seq, pixels))))  # fmt: skip
            seqs[d] += 1
    return out


class _Device:
    """One mTLS connection: publishes, and notes PUBACKs and verdicts by time."""

    def __init__(self, plan: dict[str, Any], dev: dict[str, str], clock: _Clock) -> None:
        self.id = dev["id"]
        self.clock = clock
        # paho calls on_publish holding its own out-message lock, which `publish` takes
        # too: no lock of ours may span both, so PUBACKs are kept by mid and paired with
        # the events in order at the end (mids wrap at 65535).
        self.sent_by_mid: dict[int, list[str]] = {}
        self.acks_by_mid: dict[int, list[float]] = {}
        self.codec = SingleObjectCodec([catalog.get("CloudVerdict")])
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.id, protocol=paho.MQTTv5)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dev["ca"])
        ctx.load_cert_chain(dev["cert"], dev["key"])
        c.tls_set_context(ctx)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_connect = self._on_connect
        self.connected = threading.Event()
        self.client = c
        c.connect(plan["host"], plan["port"], keepalive=60)
        c.loop_start()

    def _on_connect(self, c: paho.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
        c.subscribe(f"edgeloop/{self.id}/down/verdict", qos=1)
        self.connected.set()

    def _on_publish(self, _c: paho.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        self.acks_by_mid.setdefault(mid, []).append(time.time())

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.time()
        try:
            record = self.codec.decode(bytes(msg.payload))[1]
        except Exception:  # a bench counts what it cannot read, never dies on it
            self.clock.bad_verdicts += 1
            return
        self.clock.verdicts.setdefault(str(record["request_event_id"]), now)

    def publish(self, m: Message) -> None:
        self.clock.published[m.event_id] = time.time()
        info = self.client.publish(m.topic, m.payload, qos=1)
        self.sent_by_mid.setdefault(info.mid, []).append(m.event_id)

    def acked(self) -> dict[str, float]:
        """Each event's PUBACK time, pairing sends and acks of one mid in order."""
        out: dict[str, float] = {}
        for mid, events in self.sent_by_mid.items():
            out.update(zip(events, self.acks_by_mid.get(mid, []), strict=False))
        return out

    def acked_count(self) -> int:
        return sum(len(v) for v in list(self.acks_by_mid.values()))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class _Clock:
    published: dict[str, float]
    verdicts: dict[str, float]
    bad_verdicts: int = 0


def run_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Connect, publish `plan["rate"]` inference events/s for `duration_s` (offloads on
    top), wait `linger_s` for verdicts; returns every timestamp taken."""
    clock = _Clock({}, {})
    devices = [_Device(plan, d, clock) for d in plan["devices"]]
    try:
        for d in devices:
            if not d.connected.wait(30):
                raise TimeoutError(f"device {d.id} did not connect")
        total = int(plan["rate"] * plan["duration_s"])
        ids = [d.id for d in devices]
        msgs = encode_messages(ids, total, plan["offload_every"], plan["first_seq"])
        # What every process of the system used from the first publish until the last
        # PUBACK and verdict (encoding and connecting, before, are left out).
        pids = {**plan.get("cpu_pids", {}), "devices": os.getpid()}
        cpu_before, cpu_t0 = proc_cpu.snapshot(pids), time.monotonic()
        # Offloads ride on top of the inference events: pace by inference events so the
        # offered rate is `rate` events/s, offloads sent right after the event they cite.
        start = time.perf_counter()
        n = 0
        for m in msgs:
            if m.kind == "inference":
                ahead = start + n / plan["rate"] - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
                n += 1
            devices[m.device].publish(m)
        sent_s = time.perf_counter() - start
        deadline = time.monotonic() + plan["linger_s"]
        offloads = {m.event_id for m in msgs if m.kind == "offload"}
        while time.monotonic() < deadline and (
            sum(d.acked_count() for d in devices) < len(msgs)
            or not offloads <= clock.verdicts.keys()
        ):
            time.sleep(0.05)
        cores = proc_cpu.cores(cpu_before, proc_cpu.snapshot(pids), time.monotonic() - cpu_t0)
        return {
            "sent": len(msgs),
            "send_seconds": sent_s,
            "inference": {m.event_id: clock.published[m.event_id] for m in msgs
                          if m.kind == "inference"},
            "offload": {m.event_id: clock.published[m.event_id] for m in msgs
                        if m.kind == "offload"},
            "acked": {k: v for d in devices for k, v in d.acked().items()},
            "verdicts": {k: v for k, v in clock.verdicts.items() if k in offloads},
            "bad_verdicts": clock.bad_verdicts,
            "cores": cores,
        }  # fmt: skip
    finally:
        for d in devices:
            d.close()


def main() -> None:
    """`python -m edgeloop.bench.e2e_devices PLAN OUT`: run the plan, write the stamps."""
    plan = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run_plan(plan)))


if __name__ == "__main__":
    main()
