"""Settings shared by several services. Each service adds its own frozen model.

All models read `EDGELOOP_*` variables and the env file that `edgeloop infra up` writes,
so a command run after `infra up` finds the embedded endpoints without any flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

HOME_ENV = "EDGELOOP_HOME"


def edgeloop_home() -> Path:
    """Where infra state, logs, certificates and the endpoints file live.

    Read once by the CLI and passed down; this is the only place that reads the variable.
    """
    return Path(os.environ.get(HOME_ENV, ".edgeloop")).resolve()


def endpoints_file(home: Path) -> Path:
    return home / "infra.env"


class _Base(BaseSettings):
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        frozen=True, extra="ignore", env_file_encoding="utf-8"
    )

    @classmethod
    def load(cls, edgeloop_home_dir: Path | None = None, /, **overrides: Any) -> Any:
        """Environment first, then the endpoints file, then defaults; overrides win.

        Args:
            edgeloop_home_dir: where the endpoints file is ($EDGELOOP_HOME when None);
                positional only, so a settings field named `home` (the trainer's) can be
                passed as an override (it used to bind here, and `train serve --out DIR`
                silently used the default trainer home).
            overrides: field values that win over the environment and the file.
        """
        env_file = endpoints_file(edgeloop_home_dir or edgeloop_home())
        return cls(_env_file=env_file if env_file.exists() else None, **overrides)


class KafkaSettings(_Base):
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_KAFKA_", frozen=True, extra="ignore"
    )

    bootstrap: str = Field("127.0.0.1:9092", description="host:port[,host:port...]")
    flavor: str = Field("external", description="tansu | apache | external")
    # Detected by `infra up` (Tansu refuses InitProducerId); never assumed by a client.
    idempotence: bool = False

    @field_validator("bootstrap")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        """Each comma-separated entry is host:port with a port in 1..65535 (a malformed
        address otherwise surfaces as a traceback deep inside the Kafka client)."""
        for entry in value.split(","):
            host, sep, port = entry.strip().rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"expected host:port[,host:port...], got entry {entry!r}")
        return value


class RegistrySettings(_Base):
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_REGISTRY_", frozen=True, extra="ignore"
    )

    url: str = "http://127.0.0.1:8081"
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = 10.0


class MqttSettings(_Base):
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_MQTT_", frozen=True, extra="ignore"
    )

    host: str = "127.0.0.1"
    # The listener for cloud services (username/password).
    port: int = 1883
    # The mTLS listener devices use.
    tls_port: int = 8883
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None
    # The development PKI `infra up` made (device certificates for the simulator).
    pki_dir: Path | None = Field(None, validation_alias="EDGELOOP_PKI_DIR")
