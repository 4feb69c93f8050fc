"""Settings refuse what used to be taken without a word: a variable under a model's
prefix that no field reads (a typo left the default in force), and inf or nan for a
float setting (either passes a `gt=0` bound and switches a check off)."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from edgeloop.agents.control.settings import ControlSettings
from edgeloop.agents.settings import AgentsSettings
from edgeloop.core import settings as core_settings
from edgeloop.core.errors import ConfigError
from edgeloop.core.settings import (
    SETTINGS_PREFIXES,
    KafkaSettings,
    MqttSettings,
    RegistrySettings,
    _Base,
)
from edgeloop.edge.settings import EdgeSettings
from edgeloop.streams.settings import BridgeSettings
from edgeloop.trainer.serve_settings import TrainerServeSettings

MODELS: tuple[type[_Base], ...] = (
    KafkaSettings,
    RegistrySettings,
    MqttSettings,
    BridgeSettings,
    AgentsSettings,
    ControlSettings,
    TrainerServeSettings,
    EdgeSettings,
)


def _subclasses(cls: type[_Base]) -> set[type[_Base]]:
    direct = set(cls.__subclasses__())
    return direct.union(*(_subclasses(c) for c in direct))


def test_every_settings_model_prefix_is_known() -> None:
    # The unknown-variable check decides which model owns a variable from this list.
    assert {m.model_config.get("env_prefix") for m in _subclasses(_Base)} <= set(SETTINGS_PREFIXES)
    assert set(MODELS) >= _subclasses(_Base)


@pytest.mark.parametrize(
    ("model", "variable", "nearest"),
    [
        # The review's case: the part (THRESHOLD__) left out and a letter doubled.
        (ControlSettings, "EDGELOOP_CONTROL_LATENCY_SLO_MSS", "THRESHOLD__LATENCY_SLO_MS"),
        (
            ControlSettings,
            "EDGELOOP_CONTROL_THRESHOLD__LATENCY_SLO_MSS",
            "THRESHOLD__LATENCY_SLO_MS",
        ),
        (ControlSettings, "EDGELOOP_CONTROL_TRIGGER__PSI_BOUND", "TRIGGERS__PSI_BOUND"),
        (AgentsSettings, "EDGELOOP_AGENTS_APPID", "APP_ID"),
        (KafkaSettings, "edgeloop_kafka_bootstrapp", "BOOTSTRAP"),  # case-insensitive
    ],
)
def test_an_unknown_variable_under_a_prefix_is_refused_with_the_nearest_name(
    monkeypatch: pytest.MonkeyPatch, model: type[_Base], variable: str, nearest: str
) -> None:
    monkeypatch.setenv(variable, "3")
    with pytest.raises(ConfigError) as info:
        model.load()
    prefix = model.model_config.get("env_prefix", "")
    assert variable.upper() in str(info.value)
    assert f"did you mean {prefix}{nearest}?" in str(info.value)


def test_known_variables_and_other_models_variables_are_not_flagged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "EDGELOOP_CONTROL_THRESHOLD__DEADBAND": "0.1",
        "EDGELOOP_CONTROL_WIRING": '{"model_name": "m"}',  # a whole part as JSON
        "EDGELOOP_CONTROL_JUDGE__CANARY_SHARE": "0.1",  # also the trainer's alias
        "EDGELOOP_TRAINER_CANARY_SHARE": "0.1",  # populate_by_name: the field's own name
        "EDGELOOP_AGENTS_APP_ID": "a",
        "EDGELOOP_PKI_DIR": "/tmp",  # MqttSettings' alias, under no prefix
        "EDGELOOP_HOME": "/tmp",
        "EDGELOOP_TRAIN_THREADS": "2",  # read by the trainer's ranks, no model's prefix
    }
    for model in MODELS:
        model.check_env(env)


def test_a_variable_of_a_longer_prefix_belongs_to_that_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prefixes may nest: EDGELOOP_CONTROL_X_ would own its variables, not EDGELOOP_CONTROL_.
    monkeypatch.setattr(
        core_settings, "SETTINGS_PREFIXES", (*SETTINGS_PREFIXES, "EDGELOOP_CONTROL_X_")
    )
    ControlSettings.check_env({"EDGELOOP_CONTROL_X_ANYTHING": "1"})
    with pytest.raises(ConfigError, match="EDGELOOP_CONTROL_XANYTHING"):
        ControlSettings.check_env({"EDGELOOP_CONTROL_XANYTHING": "1"})


def _float_fields(model: type[BaseModel], env: str, loc: str) -> list[tuple[str, str]]:
    """(variable, error location) of every float field, nested parts included."""
    out = []
    for name, info in model.model_fields.items():
        kind: Any = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += _float_fields(kind, f"{env}{name.upper()}__", f"{loc}{name}.")
        elif kind is float or (
            typing.get_origin(kind) is not tuple and float in typing.get_args(kind)
        ):
            out.append((f"{env}{name.upper()}", f"{loc}{name}"))
    return out


FLOATS = [
    (model, variable, loc)
    for model in MODELS
    for variable, loc in _float_fields(model, model.model_config.get("env_prefix", ""), "")
]


def test_the_float_settings_are_found() -> None:
    variables = {v for _, v, _ in FLOATS}
    assert "EDGELOOP_CONTROL_THRESHOLD__LATENCY_SLO_MS" in variables
    assert "EDGELOOP_CONTROL_TRIGGERS__PSI_BOUND" in variables
    assert "EDGELOOP_AGENTS_STALL_S" in variables


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
@pytest.mark.parametrize(("model", "variable", "loc"), FLOATS, ids=[v for _, v, _ in FLOATS])
def test_a_non_finite_float_setting_is_refused_naming_field_and_value(
    monkeypatch: pytest.MonkeyPatch, model: type[_Base], variable: str, loc: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        model.load()
    # (EdgeSettings also names its required fields, unset here.)
    (err,) = [e for e in info.value.errors() if ".".join(str(p) for p in e["loc"]) == loc]
    assert err["type"] == "finite_number"
    assert err["input"] == value


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("EDGELOOP_CONTROL_THRESHOLD", '{"latency_slo_mss": 5}', "threshold.latency_slo_mss"),
        ("EDGELOOP_CONTROL_SIGNALS", '{"window": 3}', "signals.window"),
        ("EDGELOOP_CONTROL_WIRING", '{"enabled": true, "tick": 1}', "wiring.tick"),
    ],
)
def test_a_misspelled_key_inside_a_parts_json_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, variable: str, value: str, field: str
) -> None:
    """The JSON form of a part used to drop an unknown key silently (the default stayed)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as err:
        ControlSettings.load(tmp_path)
    assert field in {".".join(str(p) for p in e["loc"]) for e in err.value.errors()}
