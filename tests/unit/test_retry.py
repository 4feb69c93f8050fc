"""The one retry policy: what is transient, how long to wait, when to give up."""

from __future__ import annotations

import random

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)

from edgeloop.core.errors import ConfigError, DecodeError, RegistryError, RegistryUnavailableError
from edgeloop.core.retry import Backoff, is_retriable, retry


@pytest.mark.parametrize(
    ("error", "retriable"),
    [
        (RegistryUnavailableError("down"), True),
        (RegistryError("busy", status=503, error_code=50301), True),
        (RegistryError("throttled", status=429, error_code=429), True),
        (RegistryError("no such subject", status=404, error_code=40401), False),
        (DecodeError("bad bytes", reason="truncated"), False),
        (ConfigError("bad setting"), False),
        (KafkaConnectionError(), True),
        (NotLeaderForPartitionError(), True),
        (KafkaTimeoutError(), True),  # aiokafka: its own wait ran out; ours goes on
        (MessageSizeTooLargeError(), False),
        (TopicAuthorizationFailedError(), False),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (ValueError("a bug"), False),
    ],
)
def test_every_error_family_says_whether_retrying_can_succeed(
    error: Exception, retriable: bool
) -> None:
    assert is_retriable(error) is retriable


def test_backoff_grows_is_capped_and_jittered() -> None:
    backoff = Backoff(initial_s=0.1, max_s=1.0, rng=random.Random(7))
    delays = [backoff.delay(n) for n in range(12)]
    for n, delay in enumerate(delays):
        step = min(1.0, 0.1 * 2**n)
        assert step / 2 <= delay <= step
    assert len(set(delays[5:])) > 1  # capped steps still differ: no lockstep


async def test_retry_waits_out_transient_failures_and_returns() -> None:
    calls: list[int] = []
    seen: list[tuple[str, int]] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RegistryUnavailableError("down")
        return "ok"

    result = await retry(
        flaky,
        Backoff(initial_s=0.001, max_s=0.002),
        on_retry=lambda exc, attempt, _delay: seen.append((type(exc).__name__, attempt)),
    )
    assert result == "ok"
    assert seen == [("RegistryUnavailableError", 0), ("RegistryUnavailableError", 1)]


async def test_retry_raises_a_permanent_failure_at_once() -> None:
    calls: list[int] = []

    async def refused() -> None:
        calls.append(1)
        raise MessageSizeTooLargeError()

    with pytest.raises(MessageSizeTooLargeError):
        await retry(refused, Backoff(initial_s=0.001))
    assert len(calls) == 1


async def test_retry_gives_up_after_its_attempts() -> None:
    calls: list[int] = []

    async def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError()

    with pytest.raises(ConnectionRefusedError):
        await retry(down, Backoff(initial_s=0.001), attempts=3)
    assert len(calls) == 3
