"""The whole embedded stack: Mosquitto, a Kafka flavour and the schema registry.

Layout under $EDGELOOP_HOME:

    pki/                      CA, broker and device certificates (kept across runs)
    infra/mosquitto/          config, ACL, password file, persistence, mosquitto.log
    infra/kafka/              server.properties, data, kafka.log / tansu.log
    infra/registry/           registry.log
    infra/state.json          what runs where (written by the owner of the stack)
    infra.env                 endpoints for every other command (core/settings.py)

`Stack.start()`/`stop()` serve tests and `--foreground`; `Stack.run()` is the supervisor:
it starts everything, restarts a child that dies (with backoff), and stops all on cancel.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import orjson

from edgeloop.core.errors import InfraError
from edgeloop.core.logs import get_logger
from edgeloop.core.settings import endpoints_file
from edgeloop.infra.kafka import KafkaBroker, make_broker
from edgeloop.infra.mosquitto import Mosquitto
from edgeloop.infra.pki import DevPki
from edgeloop.infra.process import ChildProcess
from edgeloop.infra.registry_proc import RegistryProcess

log = get_logger(__name__)

# Restart backoff for a crashed child: doubles per consecutive crash, capped; a child
# that stayed up for STABLE_S counts as healthy again and starts over at the minimum.
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0


class _Component(Protocol):
    @property
    def process(self) -> ChildProcess | None: ...
    @property
    def running(self) -> bool: ...
    @property
    def pid(self) -> int | None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@dataclass(frozen=True)
class StackOptions:
    kafka: str = "tansu"
    bootstrap: str | None = None  # for kafka="external"
    mqtt_port: int | None = None
    mqtt_tls_port: int | None = None
    kafka_port: int | None = None
    registry_port: int | None = None
    registry: bool = True


def infra_dir(home: Path) -> Path:
    return home / "infra"


def state_file(home: Path) -> Path:
    return infra_dir(home) / "state.json"


def pid_file(home: Path) -> Path:
    return infra_dir(home) / "supervisor.pid"


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class Stack:
    """Every embedded server for one $EDGELOOP_HOME."""

    name = "infra"

    def __init__(self, home: Path, options: StackOptions | None = None) -> None:
        self.home = home
        self.options = opts = options or StackOptions()
        base = infra_dir(home)
        self.pki = DevPki(home / "pki")
        self.mosquitto = Mosquitto(
            base / "mosquitto", self.pki, port=opts.mqtt_port, tls_port=opts.mqtt_tls_port
        )
        self.kafka: KafkaBroker = make_broker(
            opts.kafka,
            base / "kafka",
            port=opts.kafka_port,
            bootstrap=opts.bootstrap,
            cache_dir=base / "cache",
        )
        self.registry: RegistryProcess | None = (
            RegistryProcess(base / "registry", self.kafka.bootstrap, port=opts.registry_port)
            if opts.registry
            else None
        )
        self.phase = "new"
        self.error: str | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    def components(self) -> dict[str, _Component]:
        found: dict[str, _Component] = {"mosquitto": self.mosquitto, "kafka": self.kafka}
        if self.registry is not None:
            found["registry"] = self.registry
        return found

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start all and write the endpoints file; on failure stop what had started."""
        self.phase = "starting"
        self.write_state()
        try:
            # The brokers do not depend on each other; the registry needs Kafka.
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.mosquitto.start())
                tg.create_task(self.kafka.start())
            if self.registry is not None:
                await self.registry.start()
        except BaseException as exc:
            self.phase, self.error = "failed", _describe(exc)
            await self.stop(keep_state=True)
            if isinstance(exc, ExceptionGroup):
                # The CLI prints an EdgeloopError as one clear line; a group would be a
                # traceback. Every start failure is named in the message.
                raise InfraError(self.error) from exc
            raise
        path = self.write_endpoints()
        self.phase = "ready"
        self.write_state()
        pids = {f"{name}_pid": c.pid for name, c in self.components().items()}
        log.info("infra ready", extra={"endpoints": str(path), **pids})

    async def stop(self, *, keep_state: bool = False) -> None:
        """Stop in reverse dependency order; remove the endpoints file (now stale)."""
        endpoints_file(self.home).unlink(missing_ok=True)
        for component in reversed(list(self.components().values())):
            await component.stop()
        if not keep_state:
            self.phase = "stopped"
        self.write_state()

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """The supervisor: start, keep children alive until cancelled, stop all."""
        try:
            await self.start()
            async with asyncio.TaskGroup() as tg:
                for name, component in self.components().items():
                    if component.process is not None:  # an external broker has none
                        tg.create_task(self._watch(name, component), name=f"watch-{name}")
        finally:
            await self.stop(keep_state=self.phase == "failed")

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _watch(self, name: str, component: _Component) -> None:
        crashes = 0
        while True:
            process = component.process
            started = time.monotonic()
            code = await process.wait() if process is not None else None
            async with self._lock(name):
                if component.running:  # someone else restarted it meanwhile
                    continue
                crashes = 1 if time.monotonic() - started > STABLE_S else crashes + 1
                delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (crashes - 1))
                log.warning(
                    "child exited, restarting",
                    extra={"component": name, "code": code, "delay_s": delay, "crashes": crashes},
                )
                self.phase = "degraded"
                self.write_state()
                await asyncio.sleep(delay)
                try:
                    await component.start()
                except Exception:
                    log.exception("restart failed", extra={"component": name})
                    continue
            if name == "kafka" and self.kafka.flavor == "tansu" and self.registry is not None:
                # Tansu keeps topics in memory: after its restart _schemas is empty, and
                # the registry must re-read it or it would hand out ids the topic forgot.
                async with self._lock("registry"):
                    await self.registry.stop()
                    await self.registry.start()
            self.phase = "ready"
            self.write_endpoints()
            self.write_state()

    # -- what the rest of edgeloop reads ------------------------------------------------
    def endpoints(self) -> dict[str, str]:
        """The EDGELOOP_* variables of core/settings.py that point at this stack."""
        return endpoints_env(self.mosquitto, self.kafka, self.registry)

    def write_endpoints(self) -> Path:
        return write_endpoints(self.home, self.endpoints())

    def state(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = [
            {
                "name": "mosquitto",
                "endpoint": f"mqtt://{self.mosquitto.host}:"
                f"{self.mosquitto.port} (cloud), mqtts://{self.mosquitto.host}:"
                f"{self.mosquitto.tls_port} (devices)",
                "pid": self.mosquitto.pid,
                "log": str(self.mosquitto.log_file),
                "kind": "mqtt",
                "ports": [self.mosquitto.port, self.mosquitto.tls_port],
            },
            {
                "name": "kafka",
                "endpoint": f"{self.kafka.flavor} {self.kafka.bootstrap}",
                "pid": self.kafka.pid,
                "kind": "kafka",
                "bootstrap": self.kafka.bootstrap,
                "log": str(self.kafka.log_file or ""),
                "idempotence": self.kafka.supports_idempotence,
            },
        ]
        if self.registry is not None:
            rows.append(
                {
                    "name": "registry",
                    "endpoint": self.registry.url,
                    "pid": self.registry.pid,
                    "kind": "http",
                    "url": f"{self.registry.url}/subjects",
                    "log": str(self.registry.log_file),
                }
            )
        return {
            "phase": self.phase,
            "error": self.error,
            "supervisor_pid": os.getpid(),
            "updated": time.time(),
            "components": rows,
        }

    def write_state(self) -> None:
        path = state_file(self.home)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, orjson.dumps(self.state(), option=orjson.OPT_INDENT_2))


def endpoints_env(
    mosquitto: Mosquitto, kafka: KafkaBroker, registry: RegistryProcess | None
) -> dict[str, str]:
    """The EDGELOOP_* variables (core/settings.py) for a set of running servers."""
    env = {
        "EDGELOOP_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "EDGELOOP_KAFKA_FLAVOR": kafka.flavor,
        "EDGELOOP_KAFKA_IDEMPOTENCE": str(kafka.supports_idempotence).lower(),
        "EDGELOOP_MQTT_HOST": mosquitto.host,
        "EDGELOOP_MQTT_PORT": str(mosquitto.port),
        "EDGELOOP_MQTT_TLS_PORT": str(mosquitto.tls_port),
        "EDGELOOP_MQTT_USERNAME": mosquitto.username,
        "EDGELOOP_MQTT_PASSWORD": mosquitto.password.get_secret_value(),
        "EDGELOOP_MQTT_CA_FILE": str(mosquitto.ca_file),
        # Where device certificates are issued (DevPki): MqttSettings.pki_dir.
        "EDGELOOP_PKI_DIR": str(mosquitto.pki.root),
    }
    if registry is not None:
        env["EDGELOOP_REGISTRY_URL"] = registry.url
    return env


def write_endpoints(home: Path, env: dict[str, str]) -> Path:
    """Write $home/infra.env, which every settings model reads (core/settings.py)."""
    path = endpoints_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{k}={v}\n" for k, v in env.items())
    # It holds the cloud MQTT password: owner only.
    _write_atomic(path, ("# Written by edgeloop infra.\n" + body).encode(), 0o600)
    return path


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def read_state(home: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = orjson.loads(state_file(home).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return doc
