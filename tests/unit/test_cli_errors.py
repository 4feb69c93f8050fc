"""A newcomer's first mistakes end in one line that names the command that fixes them.

Each case runs the real `edgeloop` entry point (`python -m edgeloop`) in a subprocess on
a fresh $EDGELOOP_HOME, with every endpoint pointed at a closed 127.0.0.1 port, and
checks what the user reads: a non-zero exit, the fix (`edgeloop keys init`, `edgeloop
infra up`, ...), the host:port or path at fault, and no Python traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeloop.artifacts.signing import generate_keypair
from edgeloop.infra.ports import free_port


def _closed_port() -> int:
    """A loopback port nothing listens on (and no later server in this run is given)."""
    return free_port()


@pytest.fixture
def port() -> int:
    return _closed_port()


def _edgeloop(
    home: Path, port: int, *args: str, pki_dir: Path | None = None, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """Run `edgeloop ARGS` as a user would, every endpoint at the closed `port` (and the
    development CA in `pki_dir`, as `infra up` would have written it to infra.env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env.update(
        EDGELOOP_HOME=str(home),
        EDGELOOP_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}",
        EDGELOOP_REGISTRY_URL=f"http://127.0.0.1:{port}",
        EDGELOOP_MQTT_HOST="127.0.0.1",
        EDGELOOP_MQTT_PORT=str(port),
    )
    if pki_dir is not None:
        env["EDGELOOP_PKI_DIR"] = str(pki_dir)
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "edgeloop", "--log-level", "error", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The `error: ...` line the entry point prints, after asserting the failure was clean:
    non-zero exit, and no traceback printed by Python (log records are single lines
    starting with `ts=`; a raw traceback starts a line with `Traceback`)."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert not any(line.startswith("Traceback") for line in lines), result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_models_bootstrap_before_keys_init_names_keys_init(tmp_path: Path, port: int) -> None:
    """The issue's case: it used to say only "cannot load private key ...: No such file"."""
    line = _error_line(_edgeloop(tmp_path, port, "models", "bootstrap"))
    assert "`edgeloop keys init`" in line, line
    assert str(tmp_path / "keys" / "release.key") in line, line


def test_models_verify_without_public_key_names_keys_init(tmp_path: Path, port: int) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    line = _error_line(_edgeloop(tmp_path, port, "models", "verify", str(artifact)))
    assert "`edgeloop keys init`" in line, line
    assert "--pubkey" in line, line


def test_train_run_without_keys_names_keys_init(tmp_path: Path, port: int) -> None:
    hard = tmp_path / "hard.npz"
    hard.write_bytes(b"")
    result = _edgeloop(
        tmp_path, port, "train", "run", "--hard-examples", str(hard), "--trigger-id", "t1"
    )
    assert "`edgeloop keys init`" in _error_line(result)


def test_train_mine_on_an_empty_store_names_models_bootstrap(tmp_path: Path, port: int) -> None:
    """An empty model store used to end in `ValueError: max() arg is an empty sequence`."""
    result = _edgeloop(tmp_path, port, "train", "mine", "--hard-out", str(tmp_path / "h.npz"))
    line = _error_line(result)
    assert "`edgeloop models bootstrap`" in line, line
    assert str(tmp_path / "trainer" / "store") in line, line


@pytest.mark.parametrize(
    "args",
    [
        ("fleet", "list"),
        ("control", "status"),
        ("topics", "create"),
        ("train", "trigger"),
        # Services: their crash used to name only the exception, not the fix.
        ("registry", "--port", "0"),
        ("train", "serve"),
        # The Faust worker logged aiokafka's traceback and exited 1 without a message.
        ("agents", "--no-verdicts"),
    ],
    ids=" ".join,
)
def test_kafka_not_reachable_names_the_address_and_infra_up(
    tmp_path: Path, port: int, args: tuple[str, ...]
) -> None:
    """One-shot commands used to print aiokafka's KafkaConnectionError traceback."""
    generate_keypair(tmp_path / "keys")  # `train serve` checks its keys before Kafka
    line = _error_line(_edgeloop(tmp_path, port, *args))
    assert f"Kafka at 127.0.0.1:{port} is not reachable" in line, line
    # A home where `infra up` never ran: say so, and the command that does it.
    assert "infra.env does not exist" in line, line
    assert "`edgeloop infra up`" in line, line


def test_kafka_not_reachable_after_infra_up_names_infra_status(tmp_path: Path, port: int) -> None:
    """With infra.env written (the stack was brought up once), the stack is down: check it."""
    (tmp_path / "infra.env").write_text(f"EDGELOOP_KAFKA_BOOTSTRAP=127.0.0.1:{port}\n")
    line = _error_line(_edgeloop(tmp_path, port, "topics", "create"))
    assert "`edgeloop infra status`" in line, line
    assert "`edgeloop infra up`" in line, line


def test_bridge_with_mqtt_not_reachable_names_the_broker_and_infra_up(
    tmp_path: Path, port: int
) -> None:
    line = _error_line(_edgeloop(tmp_path, port, "bridge"))
    assert f"MQTT broker at 127.0.0.1:{port} is not reachable" in line, line
    assert "`edgeloop infra up`" in line, line


# `fleet` commands check Kafka first now (a metadata request before any work), so with
# both down they name Kafka (test_fleet_commands_with_kafka_down_...).
@pytest.mark.parametrize("args", [("schemas", "check")], ids=" ".join)
def test_registry_not_reachable_names_infra_up(
    tmp_path: Path, port: int, args: tuple[str, ...]
) -> None:
    """The registry's own message named the URL but not how to start it."""
    line = _error_line(_edgeloop(tmp_path, port, *args))
    assert f"http://127.0.0.1:{port}" in line, line
    assert "`edgeloop infra up`" in line, line


def test_edge_run_with_unusable_tls_files_names_enroll(tmp_path: Path, port: int) -> None:
    """Files that exist but are no certificate used to end in an ssl.SSLError traceback."""
    generate_keypair(tmp_path / "keys")
    not_a_cert = tmp_path / "ca.crt"
    not_a_cert.write_text("not a certificate\n")
    result = _edgeloop(
        tmp_path, port, "edge", "run", "--device-id", "pi-3",
        "--cert", str(not_a_cert), "--key", str(not_a_cert), "--ca", str(not_a_cert),
    )  # fmt: skip
    line = _error_line(result)
    assert "`edgeloop edge enroll pi-3`" in line, line
    assert f"--ca {not_a_cert}" in line, line


def test_a_crash_is_blamed_on_the_endpoint_that_failed_first(tmp_path: Path) -> None:
    """The bridge talks to MQTT, Kafka and the registry; a registry that refused the
    connection is reported as the registry, not as the MQTT broker whose check also
    matches the ConnectionRefusedError underneath."""
    # Imported here, so the subprocess cases above also run on a tree without this module.
    from edgeloop.cli.fixes import reachable
    from edgeloop.core.errors import RegistryUnavailableError, ServiceCrashedError

    unavailable = RegistryUnavailableError("schema registry http://r:1 unreachable")
    unavailable.__cause__ = ConnectionRefusedError(111, "Connection refused")
    crashed = ServiceCrashedError("service 'bridge-uplink' crashed")
    crashed.__cause__ = unavailable
    with (
        pytest.raises(RegistryUnavailableError) as caught,
        reachable(tmp_path, mqtt=("127.0.0.1", 1), registry=True),
    ):
        raise crashed
    assert "schema registry http://r:1 unreachable" in str(caught.value)
    assert "`edgeloop infra up`" in str(caught.value)
    assert "MQTT" not in str(caught.value)


def test_a_crash_inside_a_task_group_is_still_named(tmp_path: Path) -> None:
    """The bridge's downlink fails as a TaskGroup: Kafka's refusal sits inside an
    ExceptionGroup, which the cause chain alone does not reach (a newcomer got
    "crashed: ExceptionGroup(... KafkaConnectionError ...)" with no fix). The paho
    intake's own "did not accept the connection within 30 s" is a plain ConnectionError."""
    from aiokafka.errors import KafkaConnectionError

    from edgeloop.cli.fixes import reachable
    from edgeloop.core.errors import EndpointUnreachableError, ServiceCrashedError

    crashed = ServiceCrashedError("service 'bridge-downlink' crashed")
    crashed.__cause__ = ExceptionGroup("unhandled errors in a TaskGroup", [
        KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")
    ])  # fmt: skip
    with (
        pytest.raises(EndpointUnreachableError) as caught,
        reachable(tmp_path, kafka="127.0.0.1:1", mqtt=("127.0.0.1", 2)),
    ):
        raise crashed
    assert "Kafka at 127.0.0.1:1 is not reachable" in str(caught.value)
    assert "`edgeloop infra up`" in str(caught.value)

    timed_out = ServiceCrashedError("service 'bridge-uplink' crashed")
    timed_out.__cause__ = ConnectionError(
        "MQTT broker 127.0.0.1:2 did not accept the connection within 30 s"
    )
    with (
        pytest.raises(EndpointUnreachableError) as caught,
        reachable(tmp_path, kafka="127.0.0.1:1", mqtt=("127.0.0.1", 2)),
    ):
        raise timed_out
    assert "MQTT broker at 127.0.0.1:2 is not reachable" in str(caught.value)


@pytest.mark.parametrize(
    "args", [("edge", "run", "--device-id", "pi-4"), ("edge", "simulate", "-n", "2")], ids=" ".join
)
def test_edge_without_release_public_key_names_keys_init(
    tmp_path: Path, port: int, args: tuple[str, ...]
) -> None:
    """Devices used to start and then crash, `edge simulate` with one ArtifactError per
    device in an ExceptionGroup, instead of saying the key is missing before start-up."""
    pki = tmp_path / "pki"
    enrolled = _edgeloop(tmp_path, port, "edge", "enroll", "pi-4", pki_dir=pki)
    assert enrolled.returncode == 0, enrolled.stderr
    line = _error_line(_edgeloop(tmp_path, port, *args, pki_dir=pki))
    assert str(tmp_path / "keys" / "release.pub") in line, line
    assert "`edgeloop keys init`" in line, line
    assert "--pubkey" in line, line


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("EDGELOOP_KAFKA_BOOTSTRAP", "127.0.0.1:abc", "bootstrap"),
        ("EDGELOOP_KAFKA_BOOTSTRAP", "", "bootstrap"),
        ("EDGELOOP_KAFKA_BOOTSTRAP", "127.0.0.1:9092,kafka2", "bootstrap"),
        ("EDGELOOP_KAFKA_IDEMPOTENCE", "maybe", "idempotence"),
    ],
)
def test_a_setting_that_does_not_validate_names_the_field_and_the_value(
    tmp_path: Path, port: int, variable: str, value: str, field: str
) -> None:
    # Before: a pydantic traceback, or aiokafka's `int('abc')` deep in its connect.
    result = _edgeloop(tmp_path / "home", port, "control", "status", **{variable: value})
    line = _error_line(result)
    assert "invalid settings" in line
    # The variable the user set comes first, then the field it fills.
    assert f"  {variable} ({field}):" in result.stderr and repr(value) in result.stderr


def test_a_control_command_with_kafka_down_leaves_no_unclosed_client(
    tmp_path: Path, port: int
) -> None:
    for args in (("control", "capacity", "5"), ("control", "status")):
        result = _edgeloop(tmp_path / "home", port, *args)
        assert "not reachable" in _error_line(result)
        assert "Unclosed" not in result.stderr, result.stderr[-2000:]


CONTROL_COMMANDS = [
    ("agents", "--no-verdicts"),
    ("control", "capacity", "5"),
    ("control", "status"),
    ("train", "trigger"),
]


@pytest.mark.parametrize(
    ("args", "variable", "value", "field"),
    [
        # A latency SLO of inf ms, a PSI bound of nan: accepted, and the check was off.
        (
            CONTROL_COMMANDS[0],
            "EDGELOOP_CONTROL_THRESHOLD__LATENCY_SLO_MS",
            "inf",
            "threshold.latency_slo_ms",
        ),
        (CONTROL_COMMANDS[1], "EDGELOOP_CONTROL_TRIGGERS__PSI_BOUND", "nan", "triggers.psi_bound"),
        (CONTROL_COMMANDS[2], "EDGELOOP_CONTROL_SIGNALS__WINDOW_S", "-1", "signals.window_s"),
        (
            CONTROL_COMMANDS[3],
            "EDGELOOP_CONTROL_THRESHOLD__LATENCY_SLO_MS",
            "inf",
            "threshold.latency_slo_ms",
        ),
        # The agents' own settings, validated before the broker check as well.
        (CONTROL_COMMANDS[0], "EDGELOOP_AGENTS_STALL_S", "inf", "stall_s"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_a_bad_control_setting_fails_before_any_network(
    tmp_path: Path, port: int, *, args: tuple[str, ...], variable: str, value: str, field: str
) -> None:
    """`edgeloop agents` checked Kafka first (the user read "Kafka ... not reachable" and
    fixed that, to meet the bad setting next); `control capacity` and `train trigger` did
    not read the control settings at all. Kafka is down here: the setting must be named."""
    result = _edgeloop(tmp_path / "home", port, *args, **{variable: value})
    line = _error_line(result)
    assert "invalid settings" in line, line
    assert f"  {variable} ({field}):" in result.stderr, result.stderr
    assert repr(value) in result.stderr, result.stderr


@pytest.mark.parametrize("args", CONTROL_COMMANDS, ids=" ".join)
def test_a_misspelled_control_setting_is_refused_naming_the_nearest(
    tmp_path: Path, port: int, args: tuple[str, ...]
) -> None:
    """It used to be ignored without a word, the default (2 s) left in force."""
    result = _edgeloop(tmp_path / "home", port, *args, EDGELOOP_CONTROL_LATENCY_SLO_MSS="500")
    line = _error_line(result)
    assert "unknown setting EDGELOOP_CONTROL_LATENCY_SLO_MSS" in line, line
    assert "did you mean EDGELOOP_CONTROL_THRESHOLD__LATENCY_SLO_MS?" in line, line


def test_a_nested_setting_that_is_not_json_is_one_error_line(tmp_path: Path, port: int) -> None:
    # Before: pydantic-settings' SettingsError traceback.
    result = _edgeloop(
        tmp_path / "home", port, "control", "status",
        EDGELOOP_CONTROL_JUDGE__WAVE_SHARES="[0.5,",
    )  # fmt: skip
    line = _error_line(result)
    assert "invalid settings" in line and '"judge"' in line, line


# ---- `edgeloop agents` and `edgeloop fleet`: what a newcomer met next ----------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("agents", "--workers-web-port", "0"), "'--workers-web-port'"),
        (("agents", "--workers-web-port", "70000"), "'--workers-web-port'"),
        (("agents", "--app-id", "my agents"), "'--app-id'"),
        (("agents", "--app-id", "a/b"), "'--app-id'"),
        (("fleet", "register", "pi-1", "--cohort", ""), "'--cohort'"),
        (("fleet", "register", "pi/1"), "'DEVICE_ID'"),
        (("fleet", "set-cohort", "pi-1", ""), "'COHORT'"),
        (("fleet", "set-cohort", "pi-1", "a+b"), "'COHORT'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_a_bad_option_value_names_the_option_before_any_network(
    tmp_path: Path, port: int, args: tuple[str, ...], option: str
) -> None:
    """Port 0 passed our settings and crashed Faust's web server after start-up; an app id
    with a space made illegal topic names; an empty cohort was written to the fleet (the
    bridge then dead-letters every release and threshold for it). Kafka is down here:
    each must be refused as a usage error naming the option, not as a broker error."""
    result = _edgeloop(tmp_path, port, *args)
    assert result.returncode == 2, result.stderr
    assert f"Invalid value for {option}" in result.stderr, result.stderr
    assert repr(args[-1]) in result.stderr or f"(got {args[-1]})" in result.stderr
    assert "Traceback" not in result.stderr and "not reachable" not in result.stderr


def test_a_bad_web_port_variable_names_the_variable(tmp_path: Path, port: int) -> None:
    result = _edgeloop(tmp_path, port, "agents", EDGELOOP_AGENTS_WEB_PORT="0")
    assert "invalid settings" in _error_line(result)
    assert "EDGELOOP_AGENTS_WEB_PORT (web_port): " in result.stderr, result.stderr


def test_agents_without_a_release_key_name_keys_init_and_no_verdicts(
    tmp_path: Path, port: int
) -> None:
    """Verdicts are on by default; the missing key used to crash a start-up task after the
    worker had joined Kafka, with no hint. Kafka is down here: the key is named first."""
    line = _error_line(_edgeloop(tmp_path, port, "agents"))
    assert str(tmp_path / "keys" / "release.pub") in line, line
    assert "`edgeloop keys init`" in line and "--no-verdicts" in line, line


def test_agents_with_no_teacher_in_the_store_name_models_bootstrap(
    tmp_path: Path, port: int
) -> None:
    generate_keypair(tmp_path / "keys")
    line = _error_line(_edgeloop(tmp_path, port, "agents"))
    assert "no release of digits-teacher" in line, line
    assert str(tmp_path / "trainer" / "store") in line, line
    assert "`edgeloop models bootstrap`" in line and "--no-verdicts" in line, line


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never answers (not Kafka)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield int(server.getsockname()[1])


@pytest.mark.parametrize("args", [("fleet", "list"), ("agents", "--no-verdicts")], ids=" ".join)
def test_a_port_that_is_not_kafka_is_named_within_seconds(
    tmp_path: Path, silent_server: int, args: tuple[str, ...]
) -> None:
    """`edgeloop agents` hung without a word on such a port; `fleet list` failed after
    aiokafka's 40 s request timeout. Now: a metadata request with a 10 s limit."""
    started = time.monotonic()
    line = _error_line(_edgeloop(tmp_path, silent_server, *args))
    assert f"Kafka at 127.0.0.1:{silent_server} accepted a connection" in line, line
    assert "is it a Kafka broker?" in line, line
    assert time.monotonic() - started < 35  # aiokafka's own timeout alone is 40 s


@pytest.mark.parametrize(
    "args",
    [("fleet", "list"), ("fleet", "register", "pi-1"), ("fleet", "decommission", "pi-1")],
    ids=" ".join,
)
def test_fleet_commands_with_kafka_down_name_it_and_leave_no_unclosed_client(
    tmp_path: Path, port: int, args: tuple[str, ...]
) -> None:
    result = _edgeloop(tmp_path, port, *args)
    assert f"Kafka at 127.0.0.1:{port} is not reachable" in _error_line(result)
    assert "Unclosed" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        # The port was reported without saying what was wrong with it.
        ("EDGELOOP_KAFKA_BOOTSTRAP", "127.0.0.1:70000", "port 70000 is outside 1..65535"),
        (
            "EDGELOOP_KAFKA_BOOTSTRAP",
            "127.0.0.1:9092,k2:0",
            "port 0 in entry 'k2:0' is outside 1..65535",
        ),
        # Accepted, and every registry call failed later as a connection error.
        ("EDGELOOP_REGISTRY_URL", "127.0.0.1:8081", "expected http://host[:port]"),
        ("EDGELOOP_REGISTRY_URL", "http://:8081", "expected http://host[:port]"),
        ("EDGELOOP_REGISTRY_URL", "http://127.0.0.1:99999", "not a usable URL"),
        ("EDGELOOP_AGENTS_DRIFTING_COHORTS", '["a",', "not a JSON list"),
        ("EDGELOOP_AGENTS_DRIFTING_COHORTS", "a,b/c", "cohort 'b/c' contains '/'"),
        # Taken whole as one cohort's name.
        ("EDGELOOP_AGENTS_DRIFTING_COHORTS", '{"a":1}', "expected a comma-separated list"),
        # Reported as "not reachable", where the address itself was wrong.
        ("EDGELOOP_KAFKA_BOOTSTRAP", "http://127.0.0.1:9092", "without a scheme"),
    ],
)
def test_an_endpoint_or_list_setting_says_what_is_wrong_once(
    tmp_path: Path, port: int, variable: str, value: str, message: str
) -> None:
    result = _edgeloop(tmp_path, port, "agents", "--no-verdicts", **{variable: value})
    assert "invalid settings" in _error_line(result)
    lines = [line for line in result.stderr.splitlines() if variable in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].count(value) == 1, lines[0]  # the value shown once, not twice


def test_a_web_port_in_use_is_named_with_the_option(tmp_path: Path, port: int) -> None:
    """Faust failed after start-up with an OSError traceback among ~40 log lines."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        used = taken.getsockname()[1]
        line = _error_line(
            _edgeloop(tmp_path, port, "agents", "--no-verdicts", "--workers-web-port", str(used))
        )
    assert f"cannot listen on 127.0.0.1:{used}" in line and "--workers-web-port" in line, line


def test_an_unusable_data_dir_is_named_with_the_option(tmp_path: Path, port: int) -> None:
    """Faust said only FileNotFoundError(2, 'No such file or directory'), with a traceback."""
    result = _edgeloop(tmp_path, port, "agents", "--no-verdicts", "--data-dir", "/proc/x")
    line = _error_line(result)
    assert "data folder /proc/x is not usable" in line and "--data-dir" in line, line


def test_a_nested_list_that_is_not_json_names_the_variable_and_the_format(
    tmp_path: Path, port: int
) -> None:
    """The line named the field ("judge") and pydantic-settings' source, nothing else."""
    result = _edgeloop(
        tmp_path, port, "control", "status", EDGELOOP_CONTROL_JUDGE__WAVE_SHARES="0.1,0.5"
    )
    line = _error_line(result)
    assert "EDGELOOP_CONTROL_JUDGE__WAVE_SHARES='0.1,0.5'" in line, line
    assert "takes JSON, e.g. [0.1,0.5]" in line, line


@pytest.mark.parametrize(
    "how",
    [
        {"args": ("--no-uplink", "--no-downlink")},
        {"env": {"EDGELOOP_BRIDGE_UPLINK": "false", "EDGELOOP_BRIDGE_DOWNLINK": "false"}},
    ],
    ids=["options", "variables"],
)
def test_a_bridge_with_both_sides_off_is_a_usage_error(
    tmp_path: Path, port: int, how: dict[str, Any]
) -> None:
    """It exited 0 at once without a word."""
    result = _edgeloop(
        tmp_path, port, "bridge", "--client-id", "b9", *how.get("args", ()), **how.get("env", {})
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "nothing to run" in result.stderr and "--no-uplink" in result.stderr, result.stderr
    assert "not reachable" not in result.stderr
