"""Settings shared by several services. Each service adds its own frozen model.

All models read `EDGELOOP_*` variables and the env file that `edgeloop infra up` writes,
so a command run after `infra up` finds the embedded endpoints without any flags.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgeloop.core.errors import ConfigError

HOME_ENV = "EDGELOOP_HOME"
# Every settings model's env prefix (tests/unit/test_settings_env.py checks that each
# `_Base` subclass's is here). A variable belongs to the longest prefix it starts with, so
# one model's unknown-variable check never flags a variable of another model whose prefix
# extends its own (EDGELOOP_CONTROL_ vs a future EDGELOOP_CONTROL_X_).
SETTINGS_PREFIXES = (
    "EDGELOOP_KAFKA_",
    "EDGELOOP_REGISTRY_",
    "EDGELOOP_MQTT_",
    "EDGELOOP_BRIDGE_",
    "EDGELOOP_AGENTS_",
    "EDGELOOP_CONTROL_",
    "EDGELOOP_TRAINER_",
    "EDGELOOP_EDGE_",
)


def edgeloop_home() -> Path:
    """Where infra state, logs, certificates and the endpoints file live.

    Read once by the CLI and passed down; this is the only place that reads the variable.
    """
    return Path(os.environ.get(HOME_ENV, ".edgeloop")).resolve()


def endpoints_file(home: Path) -> Path:
    return home / "infra.env"


def _model_env_names(model: type[BaseModel], stem: str, delimiter: str) -> set[str]:
    """`stem` + each field's name (upper case), and with a `delimiter` each nested model's
    fields below it (`EDGELOOP_CONTROL_THRESHOLD__DEADBAND`)."""
    names = set()
    for name, info in model.model_fields.items():
        names.add(f"{stem}{name}".upper())
        sub = info.annotation
        if delimiter and isinstance(sub, type) and issubclass(sub, BaseModel):
            names |= _model_env_names(sub, f"{stem}{name}{delimiter}", delimiter)
    return names


class _Base(BaseSettings):
    # allow_inf_nan=False: no setting means anything at inf or nan, and either one passes
    # a `gt=0` bound and silently switches a check off (a latency SLO of inf ms). Pydantic
    # merges this into every subclass's config.
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        frozen=True, extra="ignore", env_file_encoding="utf-8", allow_inf_nan=False
    )

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every environment variable this model reads (upper case): prefix + field, the
        nested fields below a model-typed field, and validation aliases."""
        prefix = cls.model_config.get("env_prefix", "")
        delimiter = cls.model_config.get("env_nested_delimiter") or ""
        names = _model_env_names(cls, prefix, delimiter)
        for name, info in cls.model_fields.items():
            if isinstance(info.validation_alias, str):
                names.add(info.validation_alias.upper())
                if not cls.model_config.get("populate_by_name"):
                    names.discard(f"{prefix}{name}".upper())
        return frozenset(names)

    @classmethod
    def check_env(cls, environ: Mapping[str, str]) -> None:
        """Refuse a variable under this model's prefix that no field reads.

        pydantic-settings ignores such a variable (its `extra="forbid"` covers dotenv
        files only, and there it refuses every other model's variables too), so a typo
        (EDGELOOP_CONTROL_LATENCY_SLO_MSS) silently left a default in force. A variable
        under a longer prefix of `SETTINGS_PREFIXES` belongs to that model, not this one.
        docs/architecture.md ("Settings are checked before anything runs") says why this
        is an error, not a warning.

        Args:
            environ: the process environment.

        Raises:
            ConfigError: naming each unknown variable and the nearest known name.
        """
        prefix = cls.model_config.get("env_prefix", "").upper()
        if not prefix:
            return
        known = cls.env_names()
        unknown = []
        for var in sorted(v.upper() for v in environ):
            owner = max((p for p in SETTINGS_PREFIXES if var.startswith(p)), key=len, default="")
            if owner != prefix or var in known:
                continue
            # Compare what follows the prefix: the shared prefix would make every known
            # name look close.
            near = difflib.get_close_matches(
                var[len(prefix) :], [k[len(prefix) :] for k in known if k.startswith(prefix)],
                n=1, cutoff=0.5,
            )  # fmt: skip
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            unknown.append(f"{var}{hint}")
        if unknown:
            raise ConfigError(
                f"unknown setting {', '.join(unknown)}: no {cls.__name__} field reads it; "
                "correct the name or unset it"
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

        Raises:
            ConfigError: a variable under this model's prefix that no field reads
                (`check_env`).
            ValidationError: a value that does not validate (names field and value).
        """
        cls.check_env(os.environ)
        env_file = endpoints_file(edgeloop_home_dir or edgeloop_home())
        return cls(_env_file=env_file if env_file.exists() else None, **overrides)


def variable_for(model_name: str, loc: tuple[int | str, ...]) -> str | None:
    """The environment variable that sets field `loc` of the settings model named
    `model_name` (a `ValidationError`'s `title` and an error's `loc`), or None when no
    such model or field exists.

    Example: ("AgentsSettings", ("web_port",)) -> "EDGELOOP_AGENTS_WEB_PORT";
    ("ControlSettings", ("judge", "wave_shares", 1)) -> "EDGELOOP_CONTROL_JUDGE__WAVE_SHARES".
    """
    pending: list[type[_Base]] = [_Base]
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if model.__name__ != model_name or not loc:
            continue
        info = model.model_fields.get(str(loc[0]))
        if info is None:
            return None
        if isinstance(info.validation_alias, str):
            return info.validation_alias.upper()
        prefix = model.model_config.get("env_prefix", "")
        delimiter = model.model_config.get("env_nested_delimiter") or ""
        name = f"{prefix}{loc[0]}"
        sub: Any = info.annotation
        for part in loc[1:]:
            if not (delimiter and isinstance(sub, type) and issubclass(sub, BaseModel)):
                break
            field = sub.model_fields.get(str(part))
            if field is None:
                break
            name, sub = f"{name}{delimiter}{part}", field.annotation
        return name.upper()
    return None


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
        several = "," in value
        for entry in value.split(","):
            host, sep, port = entry.strip().rpartition(":")
            # The whole value is printed beside the message: name the entry only when
            # there are several to tell apart.
            where = f" in entry {entry!r}" if several else ""
            if not (sep and host and port.isdigit()) or "/" in host:
                # "/" in the host: a URL (http://host:9092); Kafka addresses have no scheme.
                raise ValueError(f"expected host:port[,host:port...] without a scheme{where}")
            if not 0 < int(port) < 65536:
                raise ValueError(f"port {int(port)}{where} is outside 1..65535")
        return value


class RegistrySettings(_Base):
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_REGISTRY_", frozen=True, extra="ignore"
    )

    url: str = "http://127.0.0.1:8081"
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        """An http(s) URL with a host (and a port in 1..65535 if it names one): anything
        else used to fail only at the first request, as a connection error."""
        try:
            parts = urlsplit(value)
            port = parts.port  # raises ValueError when out of range or not a number
        except ValueError as exc:
            raise ValueError(f"not a usable URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected http://host[:port][/path] or https://...")
        if port == 0:
            raise ValueError("port 0 is not a server's port")
        return value


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
