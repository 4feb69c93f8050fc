"""Real servers for integration and e2e tests, started on free loopback ports.

Session-scoped servers (started once, shared; run on a background loop, see
edgeloop/infra/testing.py):

- `infra_loop`    LoopThread; `await infra_loop.call(server.restart())` from a test.
- `pki`           DevPki in a session temp dir (CA, server and device certificates).
- `kafka_broker`  KafkaBroker, parametrized "tansu" / "apache" by EDGELOOP_TEST_KAFKA
                  (tansu | apache | both; default both). `.bootstrap`, `.flavor`,
                  `.supports_idempotence`. Each test using it runs once per flavour.
- `mosquitto`     Mosquitto with mTLS for devices and a password for the cloud user:
                  `.port`, `.tls_port`, `.username`, `.password` (SecretStr), `.ca_file`,
                  `.device_credentials(device_id)` -> DeviceCredentials(cert, key, ca).
- `registry`      RegistryProcess on `kafka_broker`: `.url`.
- `infra_stack`   InfraEndpoints: the three above plus a temp `home` holding infra.env
                  (`.env` is the same as a dict), for code that reads settings.

Shared servers keep state between tests (topics, retained messages, registered schemas):
use unique topic names, device ids and subjects. A test that kills or restarts a server
uses the function-scoped factories instead, so it cannot disturb other tests:

- `kafka_factory`      `await kafka_factory("tansu" | "apache")` -> a started KafkaBroker.
- `kafka_flavor`       "tansu" / "apache", parametrized like `kafka_broker`, to pass to
                       `kafka_factory` so that fault tests honour EDGELOOP_TEST_KAFKA too.
- `mosquitto_factory`  `await mosquitto_factory()` -> a started Mosquitto (shares `pki`).
- `bridges`            a list a test appends `BridgeProcess`es to; each is stopped after.

Both run on the test's own loop and are stopped after the test. A server that cannot be
started (binary missing, ...) fails the test with the fix in the message; nothing skips.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from edgeloop.core.errors import InfraError
from edgeloop.infra.kafka import KafkaBroker, make_broker
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.pki import DevPki
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.infra.testing import InfraEndpoints, LoopThread
from tests.integration.bridge_support import BridgeProcess

KAFKA_ENV = "EDGELOOP_TEST_KAFKA"


def _kafka_flavours() -> list[str]:
    choice = os.environ.get(KAFKA_ENV, "both").strip().lower()
    if choice == "both":
        return ["tansu", "apache"]
    if choice in ("tansu", "apache"):
        return [choice]
    raise pytest.UsageError(f"{KAFKA_ENV}={choice!r}: use tansu, apache or both")


KAFKA_FLAVOURS = _kafka_flavours()


def _run(loop: LoopThread, coro: Coroutine[Any, Any, None], what: str) -> None:
    """Start a server on the infra loop; a failure fails the test with its fix."""
    try:
        loop.run(coro)
    except InfraError as exc:
        pytest.fail(f"{what} could not be started: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def infra_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    pki = DevPki(tmp_path_factory.mktemp("pki"))
    pki.server_cert()
    return pki


@pytest.fixture(scope="session")
def kafka_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the Apache Kafka classpath is cached for the session (one mvn call)."""
    return tmp_path_factory.mktemp("kafka-cache")


@pytest.fixture(scope="session", params=KAFKA_FLAVOURS)
def kafka_broker(
    request: pytest.FixtureRequest,
    infra_loop: LoopThread,
    tmp_path_factory: pytest.TempPathFactory,
    kafka_cache: Path,
) -> Iterator[KafkaBroker]:
    flavor: str = request.param
    broker = make_broker(flavor, tmp_path_factory.mktemp(f"kafka-{flavor}"), cache_dir=kafka_cache)
    _run(infra_loop, broker.start(), f"{flavor} Kafka broker")
    try:
        yield broker
    finally:
        infra_loop.run(broker.stop())


@pytest.fixture(params=KAFKA_FLAVOURS)
def kafka_flavor(request: pytest.FixtureRequest) -> str:
    """Each flavour the run covers (EDGELOOP_TEST_KAFKA), for tests using kafka_factory."""
    flavor: str = request.param
    return flavor


@pytest.fixture(scope="session")
def mosquitto(
    infra_loop: LoopThread, pki: DevPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), pki)
    _run(infra_loop, broker.start(), "Mosquitto")
    try:
        yield broker
    finally:
        infra_loop.run(broker.stop())


@pytest.fixture(scope="session")
def registry(
    kafka_broker: KafkaBroker,
    infra_loop: LoopThread,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RegistryProcess]:
    proc = RegistryProcess(
        tmp_path_factory.mktemp(f"registry-{kafka_broker.flavor}"), kafka_broker.bootstrap
    )
    _run(infra_loop, proc.start(), f"schema registry on {kafka_broker.flavor}")
    try:
        yield proc
    finally:
        infra_loop.run(proc.stop())


@pytest.fixture(scope="session")
def infra_stack(
    mosquitto: Mosquitto,
    kafka_broker: KafkaBroker,
    registry: RegistryProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> InfraEndpoints:
    home = tmp_path_factory.mktemp(f"home-{kafka_broker.flavor}")
    return InfraEndpoints.write(home, mosquitto, kafka_broker, registry)


@pytest_asyncio.fixture
async def kafka_factory(
    tmp_path: Path, kafka_cache: Path
) -> AsyncIterator[Callable[[str], Awaitable[KafkaBroker]]]:
    started: list[KafkaBroker] = []

    async def make(flavor: str) -> KafkaBroker:
        broker = make_broker(
            flavor, tmp_path / f"kafka-{flavor}-{len(started)}", cache_dir=kafka_cache
        )
        started.append(broker)
        try:
            await broker.start()
        except InfraError as exc:
            pytest.fail(f"{flavor} Kafka broker could not be started: {exc}", pytrace=False)
        return broker

    try:
        yield make
    finally:
        for broker in reversed(started):
            await broker.stop()


@pytest_asyncio.fixture
async def mosquitto_factory(
    tmp_path: Path, pki: DevPki
) -> AsyncIterator[Callable[[], Awaitable[Mosquitto]]]:
    started: list[Mosquitto] = []

    async def make() -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(started)}", pki)
        started.append(broker)
        try:
            await broker.start()
        except InfraError as exc:
            pytest.fail(f"Mosquitto could not be started: {exc}", pytrace=False)
        return broker

    try:
        yield make
    finally:
        for broker in reversed(started):
            await broker.stop()


@pytest.fixture
def bridges() -> Iterator[list[BridgeProcess]]:
    """Bridge processes a test starts; each is stopped (SIGTERM) after the test."""
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        bridge.stop()
