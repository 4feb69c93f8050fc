"""A full disk degrades the device; it never kills it, and storing resumes by itself.

The daemon runs in-process against a real Mosquitto. At first only the status topic has
a subscriber, so the broker answers inference and offload publishes with 0x10 and the
device keeps them: the outbox fills until the disk refuses writes. Two disks:

- `max_page_count`: the outbox's own cap (`outbox_max_bytes`, PRAGMA max_page_count);
- `tmpfs`: the whole state dir on a tiny tmpfs (needs root to mount).

Then a subscriber for everything appears: the outbox drains, space frees, and the
events decided from then on are stored and delivered again. The device keeps deciding
until it reports ONLINE again (however slow the machine, the frames never run out before
storing resumes), then its source stops and it exits drained. Every InferenceEvent is
accounted for: delivered, or counted as not stored.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.edge.source import ArraySource, Frame
from edgeloop.infra.mosquitto import Mosquitto
from tests.integration.test_edge_daemon import CODEC, EdgeModels, bootstrap_models, until

pytestmark = pytest.mark.integration

# Generous bounds for a loaded machine: waits end as soon as the behaviour shows.
WAIT_S = 180


@dataclass
class UntilStopped:
    """Frames from `source` until `stop` is set: the test, not a frame count, decides when
    the device has decided enough."""

    source: ArraySource
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def frames(self) -> AsyncIterator[Frame]:
        async for frame in self.source.frames():
            if self.stop.is_set():
                return
            yield frame


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> EdgeModels:
    # The same root as test_edge_daemon's fixture: the bootstrap runs once per session.
    return bootstrap_models(tmp_path_factory.getbasetemp() / "edge-models")


@dataclass
class TopicCollector:
    """A cloud subscriber to one topic filter (persistent session, reconnects)."""

    broker: Mosquitto
    topic: str
    ident: str
    got: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host, self.broker.port, username=self.broker.username,
                    password=self.broker.password.get_secret_value(), identifier=self.ident,
                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
                ) as client:  # fmt: skip
                    await client.subscribe(self.topic, qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        schema, record = CODEC.decode(bytes(message.payload))  # type: ignore[arg-type]
                        self.got.append((schema.short_name, record))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.3)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for k, r in self.got if k == kind]


@pytest.fixture(params=["max_page_count", "tmpfs"])
def state_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, int | None]]:
    """(state dir, outbox_max_bytes): a capped database, or a 512 KiB tmpfs."""
    if request.param == "max_page_count":
        yield tmp_path / "state", 64 * 1024
        return
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the max_page_count variant runs the same path")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    # The model slot (~64 KiB), state.json and the outbox's 128 KiB reserve take part of
    # it; the outbox gets the rest.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
    try:
        yield mount / "state", None
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_degrades_the_device_and_storing_resumes(
    mosquitto_factory: Callable[[], Awaitable[Mosquitto]],
    models: EdgeModels,
    state_dir: tuple[Path, int | None],
) -> None:
    from edgeloop.edge.daemon import EdgeDaemon, Endpoint
    from edgeloop.edge.settings import EdgeSettings
    from edgeloop.tasks.digits import DigitsTask, load_raw

    broker = await mosquitto_factory()
    directory, max_bytes = state_dir
    device = f"full-{uuid.uuid4().hex[:6]}"
    settings = EdgeSettings(
        device_id=device, state_dir=directory, initial_model=models.student_v1,
        pubkey=models.pubkey, status_interval_s=0.3, exit_when_drained=True,
        outbox_max_bytes=max_bytes, outbox_reserve_bytes=128 * 1024,
        reconnect_min_s=0.05, reconnect_max_s=0.5,
    )  # fmt: skip
    images, _ = load_raw()
    tls = broker.device_credentials(device).ssl_context()
    source = UntilStopped(ArraySource(images, rate_hz=150))
    daemon = EdgeDaemon(
        settings, Endpoint(broker.host, broker.tls_port, tls), source, DigitsTask(),
    )  # fmt: skip
    statuses = TopicCollector(broker, f"edgeloop/{device}/up/status", f"st-{device}")
    everything = TopicCollector(broker, f"edgeloop/{device}/up/#", f"all-{device}")
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(statuses.run())]
        await until(statuses.connected.is_set, 30, "the status subscriber")
        run = tg.create_task(daemon.run())
        try:
            await until(
                lambda: daemon.outbox is not None and daemon.outbox.unstored > 0, 120,
                "the disk to refuse an event",
            )  # fmt: skip
            await until(
                lambda: any(r["state"] == "DEGRADED" for r in statuses.of("DeviceStatus")), 60,
                "a DEGRADED status at the cloud",
            )  # fmt: skip
            assert not run.done()  # the daemon keeps running and deciding
            assert daemon.outbox is not None
            seq_when_full = daemon.outbox.next_seq
            degraded_gauge = daemon.metrics.storage_degraded.labels(device)._value.get()

            # A subscriber for everything: the outbox drains and space frees. The device
            # keeps deciding until storing has resumed: an ONLINE status after the
            # DEGRADED one, and an event decided after the disk filled delivered.
            tasks.append(tg.create_task(everything.run()))
            degraded_seq = next(
                r["seq"] for r in statuses.of("DeviceStatus") if r["state"] == "DEGRADED"
            )
            await until(
                lambda: any(
                    r["seq"] > degraded_seq and r["state"] == "ONLINE"
                    and r["storage_error"] is None for r in statuses.of("DeviceStatus")
                ), WAIT_S, "an ONLINE status after storing resumed",
            )  # fmt: skip
            await until(
                lambda: any(r["seq"] > seq_when_full for r in everything.of("InferenceEvent")),
                WAIT_S, "an event decided after the disk filled, delivered",
            )  # fmt: skip
            source.stop.set()  # enough decided: the device exits once everything is delivered
            try:
                async with asyncio.timeout(WAIT_S):
                    await run  # returns once every stored event was delivered
            except TimeoutError:
                sizes = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
                raise AssertionError(f"not drained; state dir {sizes}") from None
            decided = daemon.stats.frames
            unstored = daemon.metrics.outbox_unstored.labels(device, "inference")._value.get()
            await until(
                lambda: len({r["seq"] for r in everything.of("InferenceEvent")}) + unstored
                >= decided, 60, "the last deliveries at the subscriber",
            )  # fmt: skip
        finally:
            for task in [*tasks, run]:
                task.cancel()

    degraded = next(r for r in statuses.of("DeviceStatus") if r["state"] == "DEGRADED")
    assert degraded["storage_error"] is not None and "full" in degraded["storage_error"]
    assert degraded["last_error"].startswith("outbox: ")
    assert degraded["outbox_unstored"] > 0
    assert degraded_gauge == 1
    # Storing resumed: a later status is ONLINE with no storage error ...
    later = [r for r in statuses.of("DeviceStatus") if r["seq"] > degraded["seq"]]
    assert any(r["state"] == "ONLINE" and r["storage_error"] is None for r in later)
    # ... and events decided after the disk had filled were stored and delivered.
    delivered = {r["seq"] for r in everything.of("InferenceEvent")}
    assert any(seq > seq_when_full for seq in delivered)
    # Every decision is accounted for: delivered, or counted as not stored.
    assert unstored > 0
    assert len(delivered) + unstored == decided
    print(f"delivered={len(delivered)} unstored={unstored:.0f} of {decided}")
