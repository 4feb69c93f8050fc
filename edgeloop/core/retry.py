"""The one retry policy: which failures are worth retrying, and how long to wait.

Every hand-written retry loop in edgeloop goes through here, so "is this transient?" is
answered the same way everywhere:

- our errors say it themselves (`EdgeloopError.retriable`, see `core/errors.py`);
- aiokafka's errors say it too (`KafkaError.retriable`, the class attribute aiokafka's
  own sender consults); a few that aiokafka marks non-retriable only mean "the broker did
  not answer in time" and are transient for a caller that waits longer (`_KAFKA_TRANSIENT`);
- an `OSError` (connection refused, reset, unreachable) and a `TimeoutError` are
  transient: the other side may come back.

Anything else is a bug or a permanent refusal and is re-raised at once.

Waits grow exponentially from `initial_s` by `multiplier`, capped at `max_s`, with
"equal jitter" (a uniform draw between half and all of the step: never zero, so a fleet
of clients that failed together does not retry in lockstep, yet the wait still grows),
as in the AWS Architecture Blog's "Exponential Backoff And Jitter".
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from edgeloop.core.errors import EdgeloopError

T = TypeVar("T")

# aiokafka marks these non-retriable because *its own* request already waited its full
# timeout; for a caller that waits for the broker to come back they are transient.
_KAFKA_TRANSIENT = frozenset({"KafkaTimeoutError", "KafkaUnavailableError", "RequestTimedOutError"})


def is_retriable(exc: BaseException) -> bool:
    """Whether retrying the same operation can succeed.

    Args:
        exc: the failure.

    Returns:
        True for our `retriable` errors, aiokafka's `retriable` errors (and its
        timeouts), OS-level connection failures and timeouts; False for everything
        else, including every non-retriable `EdgeloopError` and aiokafka error.
    """
    if isinstance(exc, EdgeloopError):
        return exc.retriable
    if type(exc).__name__ in _KAFKA_TRANSIENT:
        return True
    flag = getattr(exc, "retriable", None)
    if isinstance(flag, bool):  # aiokafka's KafkaError and its subclasses
        return flag
    return isinstance(exc, OSError | TimeoutError)


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with equal jitter.

    Args:
        initial_s: the first step.
        max_s: the cap on any step.
        multiplier: growth per attempt.
        rng: the randomness (seed it in tests).
    """

    initial_s: float = 0.2
    max_s: float = 5.0
    multiplier: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int) -> float:
        """The wait before retry number `attempt` (0 for the first retry).

        Returns:
            A value in [step / 2, step], step = min(max_s, initial_s * multiplier**attempt).
        """
        step = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return step / 2 + self.rng.uniform(0, step / 2)


OnRetry = Callable[[BaseException, int, float], None]


async def retry(
    fn: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    attempts: int | None = None,
    on_retry: OnRetry | None = None,
) -> T:
    """Await `fn()` until it succeeds, waiting between tries while failures are retriable.

    Args:
        fn: makes one attempt (called again for every try).
        backoff: how long to wait between tries.
        attempts: the most tries in all; None retries for as long as failures are
            retriable (the caller's cancellation ends it).
        on_retry: called with (error, attempt, delay) before each wait: log and count here.

    Returns:
        What the first successful `fn()` returned.

    Raises:
        The first non-retriable failure (see `is_retriable`), or the last failure when
        `attempts` ran out. Cancellation propagates at once.
    """
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not is_retriable(exc) or (attempts is not None and attempt + 1 >= attempts):
                raise
            delay = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            attempt += 1
        await asyncio.sleep(delay)
