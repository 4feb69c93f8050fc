"""The operator's control commands (`edgeloop control capacity|status`, `edgeloop train
trigger`), run through click with the Kafka append and the status read replaced (what is
checked is what the command decides and prints, not the broker: the append itself is
covered by tests/integration/test_control_failover.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from edgeloop.cli.main import cli


@pytest.fixture
def appended(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """(app id, observation) of every record a command appends to a control log."""
    records: list[tuple[str, dict[str, Any]]] = []

    async def append(bootstrap: str, app_id: str, obs: dict[str, Any]) -> int:
        records.append((app_id, obs))
        return 41 + len(records)

    monkeypatch.setattr("edgeloop.agents.control_app.append_to_log", append)
    return records


def _run(tmp_path: Path, *args: str, **env: str) -> Result:
    """`edgeloop ARGS` in a fresh home, with no EDGELOOP_* variable but `env`."""
    import os

    clean = {k: None for k in os.environ if k.startswith("EDGELOOP_")}
    return CliRunner().invoke(cli, list(args), env={**clean, "EDGELOOP_HOME": str(tmp_path), **env})


@pytest.mark.parametrize(
    "args", [("control", "capacity", "5"), ("control", "capacity", "--clear"), ("train", "trigger")]
)
def test_the_app_id_defaults_to_the_agents_setting(
    tmp_path: Path, appended: list[tuple[str, dict[str, Any]]], args: tuple[str, ...]
) -> None:
    """These commands used to write to edgeloop-agents-control-log whatever
    EDGELOOP_AGENTS_APP_ID said: a log no worker of another app id reads."""
    result = _run(tmp_path, *args, EDGELOOP_AGENTS_APP_ID="plant-7")
    assert result.exit_code == 0, result.output
    assert [app for app, _ in appended] == ["plant-7"]
    assert "plant-7-control-log at offset 42" in result.stdout
    # The option still wins.
    result = _run(tmp_path, *args, "--app-id", "other", EDGELOOP_AGENTS_APP_ID="plant-7")
    assert result.exit_code == 0, result.output
    assert appended[-1][0] == "other"


def test_status_reads_the_model_the_agents_trigger_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`control status --model` defaulted to digits-student, not the workers' setting."""
    asked: list[str] = []

    async def read_status(bootstrap: str, registry: str, model: str, tail: int) -> str:
        asked.append(model)
        return "view"

    monkeypatch.setattr("edgeloop.agents.control_status.read_status", read_status)
    monkeypatch.setattr("edgeloop.agents.control_status.render", str)
    env = {"EDGELOOP_CONTROL_WIRING__MODEL_NAME": "plant-model"}
    assert _run(tmp_path, "control", "status", **env).exit_code == 0
    assert _run(tmp_path, "control", "status", "--model", "x", **env).exit_code == 0
    assert asked == ["plant-model", "x"]


@pytest.mark.parametrize(
    ("command", "option", "variable"),
    [
        (("control", "capacity"), "--app-id", "EDGELOOP_AGENTS_APP_ID"),
        (("train", "trigger"), "--app-id", "EDGELOOP_AGENTS_APP_ID"),
        (("control", "status"), "--model", "EDGELOOP_CONTROL_WIRING__MODEL_NAME"),
        (("agents",), "--app-id", "EDGELOOP_AGENTS_APP_ID"),
        (("agents",), "--store", "EDGELOOP_AGENTS_STORE"),
        (("agents",), "--public-key", "EDGELOOP_AGENTS_PUBLIC_KEY"),
        (("agents",), "--data-dir", "EDGELOOP_AGENTS_DATA_DIR"),
        (("agents",), "--verdicts", "EDGELOOP_AGENTS_VERDICTS"),
        *[
            (("train", "serve"), f"--{name.replace('_', '-')}", f"EDGELOOP_TRAINER_{name.upper()}")
            for name in (
                "epochs",
                "nproc",
                "threads",
                "canary_cohort",
                "artifact_base_url",
                "metrics_port",
            )
        ],
    ],
)
def test_an_option_that_mirrors_a_setting_names_its_variable(
    command: tuple[str, ...], option: str, variable: str
) -> None:
    cmd: Any = cli
    ctx = click.Context(cli)
    for name in command:
        cmd = cmd.get_command(ctx, name)
    (param,) = [p for p in cmd.params if option in p.opts]
    assert variable in (param.help or "")
    # Not given: None, so the settings (and their variable) decide, not a click default.
    assert cmd.make_context(command[-1], []).params[param.name] is None


def test_trigger_says_what_it_did_and_when_the_agents_act(
    tmp_path: Path, appended: list[tuple[str, dict[str, Any]]]
) -> None:
    """It used to print "manual trigger requested" also for a request the agents drop."""
    result = _run(
        tmp_path, "train", "trigger", "--request-id", "r-1",
        EDGELOOP_CONTROL_TRIGGERS__MIN_EXAMPLES="25",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "requested" not in out
    assert "r-1 appended to edgeloop-agents-control-log at offset 42" in out
    assert "at least 25 hard example(s) are uncovered" in out
    assert "last 256" in out
    assert "edgeloop_control_trigger_requests_dropped_total" in out
    help_text = _run(tmp_path, "train", "trigger", "--help").stdout
    assert "256" in help_text and "MIN_EXAMPLES" in help_text


@pytest.mark.parametrize("value", ["-1", "-0.5", "0", "inf", "nan", "-inf", "many", "1e-320"])
def test_a_capacity_that_is_not_a_positive_number_is_refused_naming_it(
    tmp_path: Path, appended: list[tuple[str, dict[str, Any]]], value: str
) -> None:
    """`control capacity -1` used to fail as "No such option: -1"."""
    result = _run(tmp_path, "control", "capacity", value)
    assert result.exit_code == 2
    assert f"'{value}': the capacity must be a positive number" in result.stderr
    assert "--clear" in result.stderr
    assert appended == []


def test_a_capacity_above_the_ceiling_is_used_with_a_warning_naming_both(
    tmp_path: Path, appended: list[tuple[str, dict[str, Any]]]
) -> None:
    env = {"EDGELOOP_CONTROL_THRESHOLD__CLOUD_CAPACITY_PER_S": "50"}
    result = _run(tmp_path, "control", "capacity", "80", **env)
    assert result.exit_code == 0, result.output
    assert "warning: 80 offloads/s is above cloud_capacity_per_s 50" in result.stderr
    assert appended[-1][1]["per_s"] == 80.0  # not clamped
    result = _run(tmp_path, "control", "capacity", "50", **env)
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_an_unknown_option_of_capacity_is_still_reported_as_an_option(
    tmp_path: Path, appended: list[tuple[str, dict[str, Any]]]
) -> None:
    # PER_S takes what looks like an option (for `-1`); a misspelled option is not a value.
    result = _run(tmp_path, "control", "capacity", "--clearr")
    assert result.exit_code == 2
    assert "No such option: --clearr" in result.stderr
    assert appended == []
