"""The failures a newcomer meets first, each turned into one line naming the fix.

Rule (docs/architecture.md, "CLI errors"): a missing prerequisite (no key, no
infra.env, a broker that does not answer, an empty model store) ends the command with
an `EdgeloopError` whose message says what is wrong, where (path, host:port, option and
value) and the exact `edgeloop ...` command that fixes it; `cli.main` prints it as one
line, without a traceback.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeloop.core.errors import ConfigError, EndpointUnreachableError, RegistryUnavailableError
from edgeloop.core.settings import endpoints_file

KEYS_INIT = "edgeloop keys init"


def start_hint(home: Path, variable: str) -> str:
    """How to get an endpoint that answers.

    Args:
        home: $EDGELOOP_HOME, whose infra.env `edgeloop infra up` writes.
        variable: the EDGELOOP_* variable that points at an external service instead.

    Returns:
        "run `edgeloop infra up`" when this home was never brought up (the address then
        is only the built-in default), else the commands that check and restart the stack.
    """
    env = endpoints_file(home)
    if not env.exists():
        return f"{env} does not exist: start the stack with `edgeloop infra up` (or set {variable})"
    return (
        f"check the stack with `edgeloop infra status` and start it with `edgeloop infra up` "
        f"(or set {variable})"
    )


def require_key(path: Path, elsewhere: str) -> Path:
    """Fail before any work when a release key file is missing.

    Args:
        path: the private or public key the command is about to load.
        elsewhere: how to point the command at another key ("pass --key").

    Returns:
        `path`, unchanged.

    Raises:
        ConfigError: `path` is not a file; the message names `edgeloop keys init`.
    """
    if not path.is_file():
        raise ConfigError(f"no release key {path}: run `{KEYS_INIT}` first (or {elsewhere})")
    return path


def require_kafka_listening(bootstrap: str, home: Path, *, timeout_s: float = 2.0) -> None:
    """Fail before start-up when no bootstrap server accepts a TCP connection.

    For commands whose own error handling hides the cause: the Faust worker catches
    aiokafka's KafkaConnectionError itself, logs it and exits 1 without a message of ours.
    It would stop at once anyway, so checking first changes no outcome, only the words.

    Args:
        bootstrap: host:port[,host:port...].
        home: $EDGELOOP_HOME.
        timeout_s: how long one connection attempt may take.

    Raises:
        EndpointUnreachableError: not one of the servers accepted a connection.
    """
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError):
            continue
    raise EndpointUnreachableError(
        f"Kafka at {bootstrap} is not reachable; {start_hint(home, 'EDGELOOP_KAFKA_BOOTSTRAP')}"
    )


def require_kafka_answering(
    bootstrap: str, home: Path, *, timeout_s: float = 10.0
) -> dict[str, int]:
    """Fail before start-up unless a bootstrap server answers a Kafka metadata request.

    A TCP check alone passes a port where something else listens (a registry, an MQTT
    broker): aiokafka then waits its request timeout (40 s) per attempt, and the Faust
    worker sat silent. Metadata of all topics creates none.

    Args:
        bootstrap: host:port[,host:port...].
        home: $EDGELOOP_HOME.
        timeout_s: how long the connection and the answer may take, in seconds.

    Returns:
        Every topic of the cluster -> its partition count.

    Raises:
        EndpointUnreachableError: no server accepted a connection, or none answered
            within `timeout_s` (the message says which).
    """
    import asyncio

    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    require_kafka_listening(bootstrap, home, timeout_s=min(timeout_s, 2.0))

    async def metadata() -> dict[str, int]:
        client = AIOKafkaClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
            client_id="edgeloop-preflight",
        )
        try:
            async with asyncio.timeout(timeout_s):
                await client.bootstrap()
                cluster = await client.fetch_all_metadata()
        finally:
            await client.close()
        return {t: len(cluster.partitions_for_topic(t) or ()) for t in cluster.topics()}

    # aiokafka logs each failed attempt at ERROR; the one line below says it all.
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(metadata())
    except TimeoutError as exc:
        what = f"gave no Kafka metadata answer within {timeout_s:g} s"
        cause: BaseException = exc
    except (KafkaError, OSError) as exc:
        what = f"did not answer a Kafka metadata request ({type(exc).__name__})"
        cause = exc
    finally:
        aiokafka_log.setLevel(level)
    raise EndpointUnreachableError(
        f"Kafka at {bootstrap} accepted a connection but {what}: is it a Kafka broker? "
        f"{start_hint(home, 'EDGELOOP_KAFKA_BOOTSTRAP')}"
    ) from cause


def _chain(exc: BaseException, seen: set[int] | None = None) -> Iterator[BaseException]:
    """`exc` and everything it was raised from or during (a service crash wraps the cause;
    aiomqtt raises `from None`, which hides but keeps `__context__`), and the members of
    every exception group on the way (a TaskGroup's tasks fail as one group)."""
    seen = set() if seen is None else seen
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            for member in current.exceptions:
                yield from _chain(member, seen)
        current = current.__cause__ or current.__context__


@contextmanager
def reachable(
    home: Path,
    *,
    kafka: str | None = None,
    mqtt: tuple[str, int] | None = None,
    registry: bool = False,
    registry_option: str | None = None,
) -> Iterator[None]:
    """Turn "an endpoint did not answer" inside the block into one line naming the fix.

    The exception and its causes are read outermost first and the first match wins: a
    registry error caused by a refused connection is about the registry, not MQTT.

    Args:
        home: $EDGELOOP_HOME (whether `infra up` ran there decides the hint).
        kafka: the bootstrap servers the block uses, if it talks to Kafka.
        mqtt: the MQTT broker's (host, port), if the block connects to it.
        registry: whether the block talks to the schema registry.
        registry_option: the command's option that points at another registry, if any.

    Raises:
        EndpointUnreachableError: aiokafka could not bootstrap, or the MQTT connection was
            refused; directly or as the cause of a crashed service.
        RegistryUnavailableError: the registry did not answer; its message completed.
    """
    try:
        yield
    except Exception as exc:
        fixed = _unreachable(
            exc, home, kafka=kafka, mqtt=mqtt, registry=registry, registry_option=registry_option
        )
        if fixed is None:
            raise
        raise fixed from exc


def _unreachable(
    exc: BaseException,
    home: Path,
    *,
    kafka: str | None,
    mqtt: tuple[str, int] | None,
    registry: bool,
    registry_option: str | None,
) -> Exception | None:
    """The one-line error for `exc`, or None when it is not about an endpoint."""
    kafka_error: type[BaseException] | None = None
    if kafka is not None:
        # aiokafka loads only in the commands that talk to Kafka (`edgeloop edge` never does).
        from aiokafka.errors import KafkaConnectionError

        kafka_error = KafkaConnectionError
    for cause in _chain(exc):
        if registry and isinstance(cause, RegistryUnavailableError):
            variable = "EDGELOOP_REGISTRY_URL"
            if registry_option:
                variable = f"{registry_option} or {variable}"
            return RegistryUnavailableError(f"{cause}; {start_hint(home, variable)}")
        if kafka_error is not None and isinstance(cause, kafka_error):
            hint = start_hint(home, "EDGELOOP_KAFKA_BOOTSTRAP")
            return EndpointUnreachableError(f"Kafka at {kafka} is not reachable; {hint}")
        # Refused, reset, or the paho intake's "did not accept the connection within 30 s".
        if mqtt is not None and isinstance(cause, ConnectionError):
            hint = start_hint(home, "EDGELOOP_MQTT_HOST / EDGELOOP_MQTT_PORT")
            return EndpointUnreachableError(
                f"MQTT broker at {mqtt[0]}:{mqtt[1]} is not reachable; {hint}"
            )
    return None
