"""The one error tree. Each class says whether retrying the same operation can succeed.

Callers decide on `err.retriable`, never on the class name or the message text.
"""

from __future__ import annotations


class EdgeloopError(Exception):
    """Root of every error edgeloop raises on purpose."""

    retriable: bool = False


class ConfigError(EdgeloopError):
    """A setting or an argument is wrong; the message names it and the bad value."""


class SchemaError(EdgeloopError):
    """An Avro schema is invalid, unknown or incompatible."""


class DecodeError(EdgeloopError):
    """Bytes could not be decoded: bad framing, unknown schema, truncated or hostile body.

    `schema` and `path` locate the problem, `reason` is a short machine-readable tag
    (used as the dead-letter reason and as a metric label).
    """

    def __init__(
        self, message: str, *, reason: str, schema: str | None = None, path: str | None = None
    ) -> None:
        where = " ".join(
            part
            for part in (f"schema={schema}" if schema else "", f"path={path}" if path else "")
            if part
        )
        super().__init__(f"{message} ({where})" if where else message)
        self.reason = reason
        self.schema = schema
        self.path = path


class EncodeError(EdgeloopError):
    """A record does not match its schema; the message names the field and the value."""


class RegistryError(EdgeloopError):
    """The schema registry answered with an error (`status`, Confluent `error_code`)."""

    def __init__(self, message: str, *, status: int, error_code: int) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        # 5xx and 408/429 can pass; a 4xx about our request will fail the same way again.
        self.retriable = status >= 500 or status in (408, 429)


class RegistryUnavailableError(EdgeloopError):
    """The registry could not be reached."""

    retriable = True


class EndpointUnreachableError(EdgeloopError):
    """A broker (Kafka, MQTT) refused or dropped the connection; the message names its
    host:port and the command that starts it."""

    retriable = True


class InfraError(EdgeloopError):
    """A piece of the embedded infrastructure could not be installed or started."""


class ServiceCrashedError(EdgeloopError):
    """A supervised service stopped with an exception."""
