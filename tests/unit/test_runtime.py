"""The shared runtime: the service runner, settings, logs, metrics and the CLI shell."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from edgeloop.core.errors import ServiceCrashedError
from edgeloop.core.logs import JsonFormatter, KeyValueFormatter
from edgeloop.core.metrics import serve_metrics
from edgeloop.core.runner import (
    EXIT_SECOND_SIGNAL,
    EXIT_SHUTDOWN_TIMEOUT,
    ShutdownTimeoutError,
    run_services,
)
from edgeloop.core.settings import KafkaSettings, RegistrySettings


class Worker:
    def __init__(self, name: str, fail_after: float | None = None) -> None:
        self.name = name
        self.fail_after = fail_after
        self.cleaned_up = False

    async def run(self) -> None:
        try:
            if self.fail_after is not None:
                await asyncio.sleep(self.fail_after)
                raise RuntimeError(f"{self.name} broke")
            await asyncio.Event().wait()
        finally:
            self.cleaned_up = True


async def test_a_crashing_service_stops_the_others_and_surfaces_the_error() -> None:
    steady, broken = Worker("steady"), Worker("broken", fail_after=0.01)
    with pytest.raises(ServiceCrashedError, match="broken"):
        await run_services([steady, broken])
    assert steady.cleaned_up and broken.cleaned_up


async def test_sigterm_stops_every_service_cleanly() -> None:
    workers = [Worker("a"), Worker("b")]
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    await run_services(workers, shutdown_timeout_s=5)
    assert all(w.cleaned_up for w in workers)


async def test_services_that_finish_by_themselves_end_the_run() -> None:
    class Once:
        name = "once"
        ran = False

        async def run(self) -> None:
            self.ran = True

    job = Once()
    await asyncio.wait_for(run_services([job]), timeout=5)
    assert job.ran


async def test_a_service_that_ignores_shutdown_is_reported() -> None:
    class Stubborn:
        name = "stubborn"

        async def run(self) -> None:
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    await asyncio.sleep(0.3)  # misbehaves once, then gives up
                    raise

    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
    with pytest.raises(ServiceCrashedError, match="did not stop within"):
        await run_services([Stubborn()], shutdown_timeout_s=0.1, force_exit=None)


class Swallower:
    """A stubborn service: catches its cancellation and keeps sleeping (3 s), as a service
    blocked in a loop that ignores CancelledError would."""

    def __init__(self, name: str = "stubborn", stuck_for_s: float = 3.0) -> None:
        self.name = name
        self.stuck_for_s = stuck_for_s
        self.cancelled = asyncio.Event()
        self.finished = False

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            await asyncio.sleep(self.stuck_for_s)  # swallows the cancellation
        finally:
            self.finished = True


async def test_the_shutdown_timeout_holds_against_a_service_that_swallows_cancellation() -> None:
    stubborn, polite = Swallower(), Worker("polite")
    exits: list[int] = []
    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
    with pytest.raises(ShutdownTimeoutError, match=r"did not stop within 0\.2s") as err:
        await run_services([stubborn, polite], shutdown_timeout_s=0.2, force_exit=exits.append)
    # The runner gave up on it: it was still inside its 3 s sleep when the run ended.
    assert stubborn.cancelled.is_set() and not stubborn.finished
    assert err.value.stuck == ["stubborn"]
    assert polite.cleaned_up
    assert exits == [EXIT_SHUTDOWN_TIMEOUT]  # in a CLI process: exit status 1, at once


async def test_a_second_signal_ends_the_shutdown_at_once() -> None:
    stubborn = Swallower(stuck_for_s=30.0)
    exits: list[int] = []
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)

    async def second_ctrl_c() -> None:
        await stubborn.cancelled.wait()
        os.kill(os.getpid(), signal.SIGINT)

    second = asyncio.create_task(second_ctrl_c())
    with pytest.raises(ShutdownTimeoutError, match="a second signal came") as err:
        await run_services([stubborn], shutdown_timeout_s=60, force_exit=exits.append)
    await second
    assert err.value.stuck == ["stubborn"] and not stubborn.finished
    assert exits == [EXIT_SECOND_SIGNAL]


class Draining:
    """A service with a drain hook: `drain()` finishes the work in hand (`work_s`), and
    `run` notes whether its cancellation came before that work was done."""

    def __init__(self, work_s: float = 0.05) -> None:
        self.name = "draining"
        self.work_s = work_s
        self.work_done = False
        self.cancelled_mid_work = False
        self.cleaned_up = False

    async def drain(self) -> None:
        await asyncio.sleep(self.work_s)
        self.work_done = True

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled_mid_work = not self.work_done
            raise
        finally:
            self.cleaned_up = True


async def test_a_service_with_a_drain_is_drained_before_it_is_cancelled() -> None:
    service, plain = Draining(), Worker("plain")
    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(run_services([service, plain], shutdown_timeout_s=5), timeout=10)
    assert service.work_done and not service.cancelled_mid_work
    assert service.cleaned_up and plain.cleaned_up


async def test_a_drain_that_overruns_the_deadline_is_abandoned_and_the_service_named() -> None:
    service = Draining(work_s=30.0)
    exits: list[int] = []
    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    with pytest.raises(ShutdownTimeoutError) as err:
        await asyncio.wait_for(
            run_services([service], shutdown_timeout_s=0.2, force_exit=exits.append), timeout=10
        )
    assert not service.work_done
    assert err.value.stuck == ["draining"] and exits == [EXIT_SHUTDOWN_TIMEOUT]


async def test_a_second_signal_ends_a_drain_at_once() -> None:
    service = Draining(work_s=30.0)
    exits: list[int] = []
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
    with pytest.raises(ShutdownTimeoutError, match="a second signal came"):
        await asyncio.wait_for(
            run_services([service], shutdown_timeout_s=60, force_exit=exits.append), timeout=10
        )
    assert not service.work_done and exits == [EXIT_SECOND_SIGNAL]


STUBBORN_PROCESS = """
import asyncio
from edgeloop.core.runner import run_services

class Stubborn:
    name = "stubborn"
    async def run(self):
        print("running", flush=True)  # the runner's signal handlers are in place
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                print("cancelled, ignoring it", flush=True)

asyncio.run(run_services([Stubborn()], shutdown_timeout_s=600))
"""


def test_a_second_ctrl_c_exits_the_process_at_once() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN_PROCESS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "cancelled, ignoring it"
        proc.send_signal(signal.SIGINT)
        # Far inside the 600 s deadline: only the second Ctrl-C can end it.
        rest, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_SECOND_SIGNAL, rest
    assert "a second signal came" in rest and "stubborn" in rest


def test_settings_read_the_environment_and_the_endpoints_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "infra.env").write_text(
        "EDGELOOP_KAFKA_BOOTSTRAP=127.0.0.1:19092\nEDGELOOP_REGISTRY_URL=http://127.0.0.1:18081\n"
    )
    monkeypatch.setenv("EDGELOOP_REGISTRY_URL", "http://registry.example:8081")
    kafka = KafkaSettings.load(tmp_path)
    registry = RegistrySettings.load(tmp_path)
    assert kafka.bootstrap == "127.0.0.1:19092"
    assert registry.url == "http://registry.example:8081"  # the environment wins
    with pytest.raises(Exception, match="frozen"):
        kafka.bootstrap = "x"  # type: ignore[misc]


def test_secrets_are_masked_in_settings_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGELOOP_REGISTRY_PASSWORD", "hunter2")
    settings = RegistrySettings.load(tmp_path)
    assert "hunter2" not in repr(settings)
    assert settings.password is not None and settings.password.get_secret_value() == "hunter2"


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "edgeloop.test", logging.INFO, __file__, 1, "event happened", (), None
    )
    record.__dict__.update(extra)
    return record


def test_logs_are_one_structured_event_per_line() -> None:
    kv = KeyValueFormatter().format(_record(device="pi 1", count=3))
    assert "\n" not in kv
    assert 'event="event happened"' in kv and 'device="pi 1"' in kv and "count=3" in kv
    doc = orjson.loads(JsonFormatter().format(_record(count=3)))
    assert doc["event"] == "event happened" and doc["count"] == 3 and doc["level"] == "info"


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    registry = CollectorRegistry()
    Counter("edgeloop_test_things_total", "things", registry=registry).inc(5)
    async with serve_metrics(registry) as port, httpx.AsyncClient() as client:
        ok = await client.get(f"http://127.0.0.1:{port}/metrics")
        missing = await client.get(f"http://127.0.0.1:{port}/other")
    assert ok.status_code == 200
    assert "edgeloop_test_things_total 5.0" in ok.text
    assert missing.status_code == 404


def test_cli_help_lists_commands_without_importing_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from edgeloop.cli.main import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'faust', 'aiokafka', 'onnxruntime') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "infra" in out and "schemas" in out
    assert "HEAVY []" in out


def test_cli_reports_expected_errors_in_one_line_and_exits_non_zero() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeloop", "bench", "no-such-suite"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "no-such-suite" in proc.stderr
    assert "Traceback" not in proc.stderr
