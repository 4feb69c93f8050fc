"""The demo's child processes: started with their own logs, restarted, stopped in order.

Every service of the loop runs as the operator runs it, `python -m edgeloop <command>`,
in its own process and process group (`ChildProcess`): a Ctrl-C in the terminal reaches
only the demo, which then stops the children newest first (the fleet before the bridge
it publishes through, the bridge before the brokers), each with SIGTERM and a deadline,
then SIGKILL. After a child exits, anything still in its process group (a training
run's torchrun workers) is killed too, so nothing outlives the demo.

A child that exits on its own while the demo runs is restarted (at most `max_restarts`
times, with a growing pause) and the restart is reported; one that keeps failing is
left stopped and named in `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from edgeloop.core.errors import EdgeloopError
from edgeloop.core.logs import get_logger
from edgeloop.infra.process import ChildProcess, tail

log = get_logger(__name__)


class DemoError(EdgeloopError):
    """A step of the demo failed; the message names the step and its log."""


@dataclass(frozen=True)
class ChildSpec:
    """One long-running `edgeloop` command."""

    name: str  # also the log file's stem
    args: tuple[str, ...]  # after `edgeloop`, e.g. ("bridge", "--client-id", "demo-bridge-1")
    env: Mapping[str, str] = field(default_factory=dict)
    stop_timeout_s: float = 30.0
    restart: bool = True


@dataclass
class _Running:
    spec: ChildSpec
    child: ChildProcess
    restarts: int = 0
    watcher: asyncio.Task[None] | None = None


class Supervisor:
    """Starts `edgeloop` children for one $EDGELOOP_HOME; stops them all on exit.

    Args:
        home: the demo's EDGELOOP_HOME (every child gets it).
        log_dir: one `<name>.log` per child (appended across restarts).
        on_event: called with (kind, text) for "start", "restart", "exit", "failed".
        max_restarts: restarts of one child before it is left stopped.
    """

    def __init__(
        self,
        home: Path,
        log_dir: Path,
        *,
        on_event: Callable[[str, str], None] = lambda kind, text: None,
        max_restarts: int = 3,
    ) -> None:
        self.home = home
        self.log_dir = log_dir
        self.on_event = on_event
        self.max_restarts = max_restarts
        self.failed: dict[str, str] = {}
        self.exit_codes: dict[str, int | None] = {}
        self._running: dict[str, _Running] = {}
        self._stopping: set[str] = set()

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "EDGELOOP_HOME": str(self.home), **(extra or {})}

    def argv(self, args: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "edgeloop", *args]

    def log_of(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    async def run_once(
        self, name: str, args: Sequence[str], *, env: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
    ) -> None:  # fmt: skip
        """Run a one-shot command (`topics create`, ...) to completion.

        Raises:
            DemoError: it exited non-zero or overran `timeout_s`; names the command and
                quotes the end of its log.
        """
        child = ChildProcess(
            name, self.argv(args), self.log_of(name), env=self.env(env), stop_timeout_s=10
        )
        await child.start()
        try:
            async with asyncio.timeout(timeout_s):
                code = await child.wait()
        except TimeoutError:
            await child.stop()
            raise DemoError(
                f"`edgeloop {' '.join(args)}` did not finish within {timeout_s:.0f} s; "
                f"last lines of {child.log_file}:\n{tail(child.log_file)}"
            ) from None
        finally:
            _sweep_group(child)
        if code != 0:
            raise DemoError(
                f"`edgeloop {' '.join(args)}` failed (exit {code}); "
                f"last lines of {child.log_file}:\n{tail(child.log_file)}"
            )

    async def start(self, spec: ChildSpec) -> ChildProcess:
        """Start a long-running child and watch it (restart on an unexpected exit)."""
        if spec.name in self._running:
            raise DemoError(f"child {spec.name} is already running")
        child = ChildProcess(
            spec.name, self.argv(spec.args), self.log_of(spec.name), env=self.env(spec.env),
            stop_timeout_s=spec.stop_timeout_s,
        )  # fmt: skip
        await child.start()
        running = _Running(spec, child)
        self._running[spec.name] = running
        running.watcher = asyncio.create_task(self._watch(running), name=f"watch-{spec.name}")
        self.on_event("start", f"{spec.name} (pid {child.pid}), log {child.log_file}")
        return child

    def child(self, name: str) -> ChildProcess:
        return self._running[name].child

    def running(self) -> list[str]:
        return [name for name, r in self._running.items() if r.child.running]

    async def stop(self, name: str) -> int | None:
        """SIGTERM (SIGKILL after the spec's deadline); returns the exit status."""
        running = self._running.get(name)
        if running is None:
            return self.exit_codes.get(name)
        self._stopping.add(name)
        if running.watcher is not None:
            running.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running.watcher
        code = await running.child.stop()
        _sweep_group(running.child)
        self.exit_codes[name] = code
        del self._running[name]
        self.on_event("exit", f"{name} stopped (exit {code})")
        return code

    async def stop_all(self) -> dict[str, int | None]:
        """Stop every child, newest first (each after the ones that depend on it)."""
        for name in reversed(list(self._running)):
            await self.stop(name)
        return dict(self.exit_codes)

    async def _watch(self, running: _Running) -> None:
        spec = running.spec
        while True:
            code = await running.child.wait()
            _sweep_group(running.child)
            if spec.name in self._stopping:
                return
            if not spec.restart or running.restarts >= self.max_restarts:
                self.failed[spec.name] = (
                    f"exited with status {code}; {last_error(running.child.log_file)}"
                )
                self.on_event("failed", f"{spec.name} exited (status {code}), not restarted")
                return
            running.restarts += 1
            pause = min(2.0**running.restarts, 10.0)
            self.on_event(
                "restart", f"{spec.name} exited (status {code}); restart {running.restarts} "
                f"in {pause:.0f} s",
            )  # fmt: skip
            await asyncio.sleep(pause)
            await running.child.start()

    async def __aenter__(self) -> Supervisor:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a second Ctrl-C (or a cancelled demo) must still stop every child.
        await asyncio.shield(self.stop_all())


def last_error(log_file: Path, limit: int = 600) -> str:
    """The newest error line of a child's log (or its last lines), for a message."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"no log at {log_file}"
    for line in reversed(lines):
        if "level=error" in line or line.startswith("error:"):
            return f"last error in {log_file}: {line[:limit]}"
    return f"last lines of {log_file}:\n{tail(log_file)}"


def _sweep_group(child: ChildProcess) -> None:
    """Kill what is left of the child's process group (it led its own session)."""
    pid = child.pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
