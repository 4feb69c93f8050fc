"""Ctrl-C stops a worker whose Kafka went away.

Faust's stop flushed its producer and committed, waiting for a broker that no longer
answered: the process was still alive 70 s after SIGINT, and after SIGTERM, until
SIGKILL. The stop now has a deadline (EDGELOOP_AGENTS_STOP_TIMEOUT_S); past it the
process exits 1 with one error line. The worker gets a broker of its own, stopped under
it; the registry is the shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.streams.topic_admin import ensure_topics
from tests.integration.agents_support import AgentsProcess, workers
from tests.integration.bridge_support import prepare

pytestmark = pytest.mark.integration
__all__ = ["workers"]


async def test_sigint_stops_a_worker_whose_kafka_is_gone_within_its_deadline(
    infra_stack: InfraEndpoints,
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]],
    workers: list[AgentsProcess],
    tmp_path: Path,
) -> None:
    await prepare(infra_stack)
    broker = await kafka_factory(infra_stack.kafka.flavor)
    await ensure_topics(broker.bootstrap)
    worker = AgentsProcess(
        infra_stack.home, "stop-deadline", tmp_path / "w.log",
        EDGELOOP_KAFKA_BOOTSTRAP=broker.bootstrap, EDGELOOP_AGENTS_VERDICTS="false",
        EDGELOOP_AGENTS_STOP_TIMEOUT_S="5",
    )  # fmt: skip
    workers.append(worker)
    worker.start()
    await worker.ready()
    await broker.stop()
    await asyncio.sleep(3)  # the worker notices: its fetches and heartbeats fail
    assert worker.proc is not None and worker.proc.poll() is None, "it should still run"

    stopped_at = time.monotonic()
    worker.proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(worker.proc.wait, 60)
    took = time.monotonic() - stopped_at
    log = worker.log.read_text(errors="replace")
    assert worker.proc.poll() is not None, f"still running {took:.0f} s after SIGINT"
    # 5 s deadline; the margin is for a loaded machine, far below the old "never".
    assert took < 30, took
    if worker.proc.returncode != 0:  # the deadline ended it, and said so
        assert worker.proc.returncode == 1 and "exiting without a clean stop" in log, log[-3000:]
