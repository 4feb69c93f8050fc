"""docs/deploy.md and deploy/ name only commands, options and settings that exist.

- the systemd unit for the edge daemon parses as an INI file with the keys systemd needs,
  and its ExecStart is an `edgeloop edge run` command line the CLI accepts;
- every `edgeloop ...` command line in deploy.md's code blocks parses against the CLI
  (subcommands and options; required options present);
- every `EDGELOOP_*` variable named in deploy.md and the example environment file is a
  field of the settings model its prefix belongs to.
"""

from __future__ import annotations

import configparser
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from pydantic_settings import BaseSettings

from edgeloop.agents.control.settings import ControlSettings
from edgeloop.agents.settings import AgentsSettings
from edgeloop.cli.main import cli
from edgeloop.core.settings import KafkaSettings, MqttSettings, RegistrySettings
from edgeloop.edge.settings import EdgeSettings
from edgeloop.streams.settings import BridgeSettings
from edgeloop.trainer.serve_settings import TrainerServeSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY_MD = REPO / "docs" / "deploy.md"
UNIT = REPO / "deploy" / "systemd" / "edgeloop-edge.service"
ENV_FILE = REPO / "deploy" / "systemd" / "edge.env"

PREFIXES: dict[str, type[BaseSettings]] = {
    "EDGELOOP_KAFKA_": KafkaSettings,
    "EDGELOOP_REGISTRY_": RegistrySettings,
    "EDGELOOP_MQTT_": MqttSettings,
    "EDGELOOP_BRIDGE_": BridgeSettings,
    "EDGELOOP_AGENTS_": AgentsSettings,
    "EDGELOOP_CONTROL_": ControlSettings,
    "EDGELOOP_TRAINER_": TrainerServeSettings,
    "EDGELOOP_EDGE_": EdgeSettings,
}
# Read directly, not through a settings prefix: the home (edgeloop_home()), and the
# unit's own variable for --device-id (expanded by systemd, read by no settings model).
OTHER_NAMES = {"EDGELOOP_HOME", "EDGELOOP_DEVICE_ID"}


# ---- settings names --------------------------------------------------------------------


def _aliases(model: type[BaseSettings]) -> set[str]:
    return {
        str(f.validation_alias).upper()
        for f in model.model_fields.values()
        if isinstance(f.validation_alias, str)
    }


def setting_exists(name: str) -> bool:
    """Whether an `EDGELOOP_*` variable is read by some settings model (a name ending in
    `_` is a prefix: it must be one of the models')."""
    if name in OTHER_NAMES or name in PREFIXES:
        return True
    if any(name in _aliases(m) for m in PREFIXES.values()):
        return True
    for prefix, model in PREFIXES.items():
        if not name.startswith(prefix):
            continue
        field, _, nested = name[len(prefix) :].lower().partition("__")
        info = model.model_fields.get(field)
        if info is None:
            return False
        if not nested:
            return True
        sub: Any = info.annotation
        return hasattr(sub, "model_fields") and nested in sub.model_fields
    return False


def _names(text: str) -> set[str]:
    # `EDGELOOP_CONTROL_<PART>__<NAME>` is written as a pattern: take its literal prefix.
    return set(re.findall(r"\bEDGELOOP_[A-Z0-9_]*[A-Z0-9_]", text))


@pytest.mark.parametrize(
    ("name", "exists"),
    [
        ("EDGELOOP_KAFKA_BOOTSTRAP", True),
        ("EDGELOOP_CONTROL_THRESHOLD__CLOUD_CAPACITY_PER_S", True),
        ("EDGELOOP_CONTROL_JUDGE__CANARY_SHARE", True),
        ("EDGELOOP_PKI_DIR", True),  # an alias
        ("EDGELOOP_CONTROL_", True),
        ("EDGELOOP_KAFKA_SASL_USERNAME", False),
        ("EDGELOOP_CONTROL_THRESHOLD__NO_SUCH", False),
        ("EDGELOOP_BRIDGE_METRICS_HOST", False),
        ("EDGELOOP_NOPE_", False),
    ],
)
def test_setting_exists(name: str, exists: bool) -> None:
    assert setting_exists(name) is exists


@pytest.mark.parametrize("path", [DEPLOY_MD, ENV_FILE, UNIT], ids=lambda p: p.name)
def test_every_setting_named_exists(path: Path) -> None:
    unknown = sorted(n for n in _names(path.read_text()) if not setting_exists(n))
    assert not unknown, f"{path.name} names settings that no settings model reads: {unknown}"


# ---- command lines ---------------------------------------------------------------------


def check_command(argv: list[str], *, complete: bool = True) -> None:
    """Parse `edgeloop ARGV...` against the CLI: every subcommand and option must exist
    (values are not converted: paths need not exist). A `complete` command line also
    names a leaf command and gives its required options; a mention in prose
    (`edgeloop fleet`, `edgeloop edge run`) need not.

    Raises:
        click.UsageError: an unknown command or option, a missing value or option.
    """
    cmd: click.Command = cli
    args = list(argv)
    path = ["edgeloop"]
    while True:
        ctx = click.Context(cmd, info_name=path[-1])
        opts, rest, _ = cmd.make_parser(ctx).parse_args(args)
        missing = [
            p.opts[0]
            for p in cmd.params
            if p.required and isinstance(p, click.Option) and p.name not in opts
        ]
        if missing and complete:
            raise click.UsageError(f"{' '.join(path)}: missing {missing}")
        if not isinstance(cmd, click.Group):
            return
        if not rest and not complete:
            return
        if not rest:
            raise click.UsageError(f"{' '.join(path)}: no subcommand")
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            raise click.UsageError(f"{' '.join(path)}: no command {rest[0]!r}")
        cmd, args = sub, rest[1:]
        path.append(rest[0])


def edgeloop_lines(markdown: str) -> Iterator[list[str]]:
    """`edgeloop` command lines in the fenced code blocks (continuations joined, comments
    and leading VAR=value assignments dropped), as argv without `edgeloop`."""
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                words.pop(0)
            if words and words[0] == "edgeloop":
                yield words[1:]


def edgeloop_mentions(markdown: str) -> Iterator[list[str]]:
    """`edgeloop ...` in inline code spans of the prose, as argv without `edgeloop`."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    for span in re.findall(r"`(edgeloop [^`]+)`", prose):
        yield shlex.split(span.replace("\n", " "))[1:]


def test_check_command_refuses_what_the_cli_does_not_have() -> None:
    check_command(["edge", "run", "--device-id", "d", "--metrics-port", "9"])
    with pytest.raises(click.UsageError, match=r"(?i)no such option"):
        check_command(["edge", "run", "--device-id", "d", "--metrics-host", "0.0.0.0"])
    with pytest.raises(click.UsageError, match="no command 'sign'"):
        check_command(["edge", "sign"])
    with pytest.raises(click.UsageError, match="missing"):
        check_command(["edge", "run", "--cohort", "x"])


def test_every_command_in_deploy_md_parses() -> None:
    lines = list(edgeloop_lines(DEPLOY_MD.read_text()))
    assert len(lines) >= 6, "the page's commands were not found"
    bad = []
    for argv in lines:
        try:
            check_command(argv)
        except click.UsageError as exc:
            bad.append(f"edgeloop {' '.join(argv)}: {exc}")
    for argv in edgeloop_mentions(DEPLOY_MD.read_text()):
        try:
            check_command(argv, complete=False)
        except click.UsageError as exc:
            bad.append(f"`edgeloop {' '.join(argv)}`: {exc}")
    assert not bad, "\n".join(bad)


# ---- the systemd unit ------------------------------------------------------------------


class _UnitFile(configparser.ConfigParser):
    """systemd's keys are case-sensitive; ConfigParser lowercases them by default."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def _unit() -> configparser.ConfigParser:
    parser = _UnitFile(interpolation=None, strict=True)
    parser.read_string(UNIT.read_text())
    return parser


def _env() -> dict[str, str]:
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_systemd_unit_has_what_systemd_needs() -> None:
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    assert unit["Unit"]["Description"]
    service = unit["Service"]
    for key in ("ExecStart", "User", "EnvironmentFile", "StateDirectory", "Restart"):
        assert service.get(key), key
    assert service["Restart"] in ("always", "on-failure")
    assert service["Type"] in ("simple", "exec")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # What the daemon keeps must live where the unit lets it write.
    state = f"/var/lib/{service['StateDirectory']}"
    assert f"EDGELOOP_HOME={state}" in service["Environment"]


def test_systemd_exec_start_is_an_edge_run_the_cli_accepts() -> None:
    service = _unit()["Service"]
    env = _env()
    line = service["ExecStart"].replace("\\\n", " ")
    # systemd expands ${VAR} from Environment=/EnvironmentFile=: each must be defined.
    for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", line):
        assert var in env, f"ExecStart uses ${{{var}}}, which edge.env does not define"
        line = line.replace(f"${{{var}}}", env[var])
    argv = shlex.split(line)
    assert argv[0].endswith("/bin/edgeloop")
    check_command(argv[1:])
    i = argv.index("edge")
    assert argv[i : i + 2] == ["edge", "run"]
    state_dir = argv[argv.index("--state-dir") + 1]
    assert state_dir.startswith(f"/var/lib/{service['StateDirectory']}/")
