"""One child server process: started with its output in a log file, stopped gracefully.

Every server the launcher runs (Mosquitto, Tansu, the Kafka JVM, the registry) goes
through `ChildProcess`, so they all stop the same way: SIGTERM, a deadline, then SIGKILL.
Fault tests use `kill()` (SIGKILL, no chance to flush) and a later `start()` again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from edgeloop.core.errors import InfraError
from edgeloop.core.logs import get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return prctl


# Resolved once here: between fork and exec (where _die_with_parent runs, possibly while
# other threads held locks at fork time) nothing may load libraries or take locks.
_PRCTL = _load_prctl()
_SIGTERM = int(signal.SIGTERM)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the parent dies.

    A test run that is killed, or a supervisor that is kill -9'd, must not leave a JVM
    holding 512 MiB on a shared machine. SIGTERM (not SIGKILL) lets Mosquitto save its
    persistence file on the way out. The kernel ties this to the forking *thread*: the
    thread running the event loop that started the child.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, _SIGTERM, 0, 0, 0)


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(text.splitlines()[-lines:])


class ChildProcess:
    """A long-running child whose stdout and stderr go to `log_file` (appended)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_file: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_file = log_file
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.stop_timeout_s = stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    async def start(self) -> None:
        if self.running:
            raise InfraError(f"{self.name} is already running (pid {self.pid})")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # A local log file: opening it does not block the loop in any way that matters.
        with open(self.log_file, "ab") as out:  # noqa: ASYNC230
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out.write(f"=== {stamp} starting: {' '.join(self.argv)}\n".encode())
            out.flush()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=self.cwd,
                    env=self.env,
                    # Its own process group: a Ctrl-C in the terminal reaches the owner,
                    # which then stops children in order instead of all dying at once.
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except FileNotFoundError as exc:
                raise InfraError(f"{self.name}: cannot run {self.argv[0]!r}: {exc}") from exc
        log.info("process started", extra={"child": self.name, "pid": self._proc.pid})

    async def wait(self) -> int:
        if self._proc is None:
            raise InfraError(f"{self.name} was never started")
        return await self._proc.wait()

    async def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait up to the timeout, then SIGKILL. Returns the exit status."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        deadline = self.stop_timeout_s if timeout_s is None else timeout_s
        with contextlib.suppress(ProcessLookupError):  # it may exit by itself meanwhile
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(deadline):
                code = await proc.wait()
        except TimeoutError:
            log.warning(
                "process ignored SIGTERM, killing", extra={"child": self.name, "pid": proc.pid}
            )
            return await self.kill()
        log.info("process stopped", extra={"child": self.name, "code": code})
        return code

    async def kill(self) -> int | None:
        """SIGKILL: the crash a fault test wants (no flush, no goodbye)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return await proc.wait()

    def signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.returncode is None:
            os.kill(self._proc.pid, sig)

    def exit_error(self) -> InfraError:
        return InfraError(
            f"{self.name} exited with status {self.returncode}; "
            f"last lines of {self.log_file}:\n{tail(self.log_file)}"
        )


async def wait_until_healthy(
    child: ChildProcess,
    probe: Callable[[], Awaitable[bool]],
    timeout_s: float,
    interval_s: float = 0.2,
) -> None:
    """Poll `probe` until it returns True; fail early when the child exits.

    Raises InfraError naming the process and quoting its log in both failure cases.
    """
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if not child.running:
                    raise child.exit_error()
                if await probe():
                    return
                await asyncio.sleep(interval_s)
    except TimeoutError:
        raise InfraError(
            f"{child.name} did not become healthy within {timeout_s:.0f}s; "
            f"last lines of {child.log_file}:\n{tail(child.log_file)}"
        ) from None


class ManagedServer:
    """The lifecycle every server of the launcher shares; subclasses write `start()`.

    `stop()` is graceful, `kill()` is SIGKILL (fault tests), `restart()` is both halves;
    as an async context manager the server is stopped however the block ends.
    """

    _child: ChildProcess | None = None

    async def start(self) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def process(self) -> ChildProcess | None:
        """The current server process (None before start, or for an external server)."""
        return self._child

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    async def stop(self) -> None:
        if self._child is not None:
            await self._child.stop()

    async def kill(self) -> None:
        if self._child is None:
            raise InfraError(f"{type(self).__name__} has no process to kill")
        await self._child.kill()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
