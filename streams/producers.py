"""The uplink's Kafka producers: the main one, and a probe for records sent alone.

Why two: with idempotence on, aiokafka (0.14) keeps going after a batch the broker refused
for good (e.g. MESSAGE_TOO_LARGE) with that batch's sequence numbers spent, so every later
batch to the partition fails with OutOfOrderSequenceNumber (seen on Apache Kafka 4.1).
The Java client resets the sequence; here the main producer is replaced instead (a new
producer id starts fresh sequences), and the records under suspicion are re-sent one by
one through a probe producer without idempotence, whose refusals cost nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer

from edgeloop.core.logs import get_logger

log = get_logger(__name__)

Factory = Callable[[bool], AIOKafkaProducer]
Retry = Callable[..., Awaitable[Any]]


class Producers:
    """`main` sends the stream; `probe` sends single records; `generation` counts mains."""

    def __init__(self, factory: Factory, retry: Retry, *, idempotent: bool) -> None:
        self._factory = factory
        self._retry = retry
        self._idempotent = idempotent
        self.main = factory(idempotent)
        self.probe = factory(False)
        self.generation = 0

    async def start(self) -> None:
        """Start both, waiting out a Kafka that is not up yet (the shared retry policy)."""
        await self._retry("kafka", self.main.start)
        await self._retry("kafka", self.probe.start)

    async def stop(self) -> None:
        await self.main.stop()
        await self.probe.stop()

    async def renew_after_refusal(self, generation: int) -> None:
        """Replace the main producer if it is the one (`generation`) that had a batch
        refused and it is idempotent; a later refusal of the same producer is a no-op."""
        if not self._idempotent or generation != self.generation:
            return
        fresh = self._factory(True)
        await self._retry("kafka", fresh.start)
        old, self.main = self.main, fresh
        self.generation += 1
        log.warning(
            "kafka refused a batch; idempotent producer replaced",
            extra={"generation": self.generation},
        )
        # Its pending batches complete or fail here; their records are settled (and
        # re-sent if need be) by whoever is waiting for them.
        await old.stop()
