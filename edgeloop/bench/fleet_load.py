"""Load for the bridge: many devices' events over MQTT, and a Kafka-side collector.

Used by the bridge benchmark and by the integration tests, so both measure the same
traffic. Publishing uses paho's threaded client at QoS 1 with a wide in-flight window;
`publish_events` returns once the broker acknowledged every message.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.core.settings import MqttSettings
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import SingleObjectCodec
from edgeloop.schemas.topics import UplinkKind, mqtt_uplink


def inference_event(device: str, seq: int, pad: int = 0) -> dict[str, object]:
    """A realistic InferenceEvent (10 classes); `pad` lengthens the cohort name to size it."""
    probs = [0.0] * 10
    probs[seq % 10] = 0.75
    probs[(seq + 1) % 10] = 0.25
    return {
        "event_id": f"{device}:{seq}",
        "device_id": device,
        "seq": seq,
        "ts": time.time_ns() // 1000,
        "model_version": 1,
        "threshold_version": 1,
        "cohort": "default" + "x" * pad,
        "prediction": seq % 10,
        "confidence": 0.75,
        "confidence_kind": "MAX_PROB",
        "probs": probs,
        "threshold": 0.5,
        "decision": "LOCAL",
        "exit_index": 0,
        "latency": {"preprocess_us": 40, "inference_us": 310, "decision_us": 12},
        "frame_ts": None,
    }


def encoded_events(
    devices: int, per_device: int, size: int = 200, prefix: str = "dev"
) -> list[tuple[str, bytes]]:
    """(MQTT topic, payload) pairs interleaved across devices, each about `size` bytes."""
    codec = SingleObjectCodec([catalog.get("InferenceEvent")])
    schema = catalog.get("InferenceEvent")
    base = len(codec.encode(schema, inference_event(f"{prefix}-0", 0)))
    pad = max(0, size - base)
    out = []
    for seq in range(per_device):
        for d in range(devices):
            device = f"{prefix}-{d}"
            out.append(
                (
                    mqtt_uplink(device, UplinkKind.INFERENCE),
                    codec.encode(schema, inference_event(device, seq, pad)),
                )
            )
    return out


@dataclass
class PublishResult:
    sent: int
    seconds: float
    send_ns: dict[int, int] = field(default_factory=dict)
    # CONNACKs received: more than one means paho reconnected, and resent (as MQTT
    # requires) every PUBLISH not yet acknowledged: duplicates downstream that no bridge
    # made, up to `inflight` per reconnect.
    connects: int = 0
    inflight: int = 0


def publish_events(
    mqtt: MqttSettings,
    messages: list[tuple[str, bytes]],
    *,
    client_id: str = "edgeloop-load",
    rate: float | None = None,
    timeout_s: float = 300,
) -> PublishResult:
    """Publish at QoS 1 (at `rate` msg/s, or as fast as acks come); wait for every PUBACK."""
    done = threading.Event()
    acked = 0
    lock = threading.Lock()

    def on_publish(_c: paho.Client, _u: object, _mid: int, _rc: object, _p: object) -> None:
        nonlocal acked
        with lock:
            acked += 1
            if acked == len(messages):
                done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    if mqtt.username:
        client.username_pw_set(
            mqtt.username, mqtt.password.get_secret_value() if mqtt.password else None
        )
    inflight = 1000
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    connects = 0

    def on_connect(_c: paho.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
        nonlocal connects
        connects += 1

    client.on_connect = on_connect
    client.connect(mqtt.host, mqtt.port, keepalive=60)
    client.loop_start()
    start = time.perf_counter()
    try:
        for i, (topic, payload) in enumerate(messages):
            if rate:
                ahead = start + i / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            client.publish(topic, payload, qos=1)
        if messages and not done.wait(timeout_s):
            raise TimeoutError(f"only {acked} of {len(messages)} publishes acknowledged")
        return PublishResult(
            len(messages), time.perf_counter() - start, connects=connects, inflight=inflight
        )
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class Collected:
    event_ids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    ack_ns: list[int] = field(default_factory=list)
    # (partition, offset) of each record read: tells a record written twice from one
    # read twice.
    positions: list[tuple[int, int]] = field(default_factory=list)


async def collect(
    bootstrap: str,
    topic: str,
    expected: int,
    *,
    key_prefix: str = "",
    timeout_s: float = 120,
    idle_s: float = 10,
) -> Collected:
    """Read `topic` from the start until `expected` distinct event ids keyed `key_prefix...`
    arrived, or nothing new came for `idle_s`, or `timeout_s` passed. Keeps duplicates."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out = Collected()
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    distinct: set[str] = set()
    try:
        while time.monotonic() < deadline and len(distinct) < expected:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            got = False
            for records in batches.values():
                for rec in records:
                    if not (rec.key or b"").startswith(key_prefix.encode()):
                        continue
                    headers = dict(rec.headers or ())
                    event_id = headers.get("event_id", b"").decode()
                    out.event_ids.append(event_id)
                    distinct.add(event_id)
                    out.keys.append((rec.key or b"").decode())
                    out.bridges.append(headers.get("bridge", b"").decode())
                    out.ack_ns.append(rec.timestamp * 1_000_000)
                    out.positions.append((rec.partition, rec.offset))
                    got = True
            if got:
                last_new = time.monotonic()
            elif time.monotonic() - last_new > idle_s:
                break
        return out
    finally:
        await consumer.stop()


def main() -> None:
    """`python -m edgeloop.bench.fleet_load`: a publisher in its own process, so it does not
    share a GIL with what it measures. Prints one JSON line with the result."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--home", type=Path, required=True, help="EDGELOOP_HOME with infra.env")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--per-device", type=int, default=400)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--rate", type=float, default=None, help="msg/s; default: flat out")
    parser.add_argument("--prefix", default="bench")
    args = parser.parse_args()
    messages = encoded_events(args.devices, args.per_device, args.size, args.prefix)
    result = publish_events(
        MqttSettings.load(args.home), messages, client_id=f"load-{args.prefix}", rate=args.rate
    )
    print(json.dumps({"sent": result.sent, "seconds": result.seconds}))


if __name__ == "__main__":
    main()
