"""The bridge's paho receive path: paho's network thread hands messages to asyncio.

The hand-off is a deque filled on paho's thread and emptied by the uplink's router on the
event loop. These tests drive the interleavings that matter with real threads, without a
broker: no packet is read, only paho's `on_message` callback is called.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import paho.mqtt.client as paho

from edgeloop.core.settings import MqttSettings
from edgeloop.streams.intake import Incoming, MqttIntake

TOPIC = b"edgeloop/pi-1/up/inference"


def message(mid: int) -> paho.MQTTMessage:
    msg = paho.MQTTMessage(mid, TOPIC)
    msg.qos = 1
    msg.payload = f"event-{mid}".encode()
    return msg


def intake() -> MqttIntake:
    return MqttIntake(
        MqttSettings(host="127.0.0.1", port=1, username=None, password=None),
        client_id="bridge-test",
        topic_filter="$share/g/edgeloop/+/up/#",
        receive_maximum=10,
        session_expiry_s=60,
    )


class _PausedAppend(deque[Incoming]):
    """A deque whose next `append` waits until the test lets it go on: the point inside
    paho's callback where the consumer may run on the other core."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = threading.Event()
        self.go_on = threading.Event()
        self.paused = False

    def append(self, item: Incoming) -> None:
        if not self.paused:
            self.paused = True
            self.reached.set()
            self.go_on.wait(10)
        super().append(item)


async def test_a_message_that_arrives_while_the_router_empties_the_hand_off_is_taken() -> None:
    """The router takes the last message and starts waiting while paho's thread is between
    seeing a non-empty hand-off and appending the next message. That message (and every
    later one) must still reach the router: once this left 695 messages in the bridge,
    never forwarded, until it was stopped."""
    mqtt = intake()
    mqtt._loop = asyncio.get_running_loop()
    first = message(1)
    mqtt._on_message(mqtt._client, None, first)
    pending = _PausedAppend()
    pending.extend(mqtt._pending)
    pending.paused = False
    mqtt._pending = pending

    # paho's thread delivers message 2 and stops just before appending it.
    delivery = asyncio.create_task(
        asyncio.to_thread(mqtt._on_message, mqtt._client, None, message(2))
    )
    assert await asyncio.to_thread(pending.reached.wait, 10)
    # Meanwhile the router takes message 1 and waits for more.
    assert [m.mid for m in await mqtt.batch(128)] == [1]
    waiting = asyncio.create_task(mqtt.batch(128))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    pending.go_on.set()
    await delivery
    got = await asyncio.wait_for(waiting, 5)
    assert [m.mid for m in got] == [2]


async def test_every_message_from_paho_s_thread_reaches_the_router_in_order() -> None:
    """Many messages from a real second thread, taken in small slices as the router
    does: none is lost, none repeated, arrival order kept."""
    mqtt = intake()
    mqtt._loop = asyncio.get_running_loop()
    total = 20_000

    def deliver() -> None:
        for mid in range(1, total + 1):
            mqtt._on_message(mqtt._client, None, message(mid))

    producer = asyncio.create_task(asyncio.to_thread(deliver))
    taken: list[int] = []
    while len(taken) < total:
        taken.extend(m.mid for m in await asyncio.wait_for(mqtt.batch(7), 10))
    await producer
    assert taken == list(range(1, total + 1))
