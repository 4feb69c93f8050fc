"""A batch's outputs handed to aiokafka as record batches, one per topic-partition.

`AIOKafkaProducer.send` costs, per record, a future, an `await` of the accumulator, the
partitioner (murmur2 in pure Python) and a set of the topic's partitions; the caller then
gathers one future per record. py-spy put that at about a ninth of the agents worker's
CPU. aiokafka's batch API (`create_batch`, `send_batch`) takes a `BatchBuilder` of many
records for one partition and returns one future for all of them, so a batch of outputs
costs a future per topic-partition instead.

The partition of a keyed record is the one `send` would choose: the producer's own
partitioner (aiokafka's `DefaultPartitioner`, murmur2 as the Java client's, unless
configured otherwise) over the topic's partitions as `send` lists them, cached per key
and partition count. That matters beyond placement: the worker's tables use the same
partitioner (`use_partitioner=True`), and a device's outputs stay in one partition, in
order. A record without a key goes through `send`, which picks a partition as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeloop.agents.records import Out

# Keys remembered per producer before the cache starts over (a fleet's devices times the
# output topics fit many times over; a flood of distinct keys cannot grow it unbounded).
CACHE_MAX_KEYS = 200_000


@dataclass
class Sent:
    """Outputs handed to the producer together and the future of their acknowledgement
    (a record batch's, or one record's for an unkeyed one)."""

    topic: str
    partition: int | None  # None: an unkeyed record; `send` chose the partition
    outputs: list[Out]
    future: Awaitable[Any]


@dataclass
class BatchSender:
    """Sends outputs through one `AIOKafkaProducer` as per-partition record batches."""

    producer: Any  # aiokafka.AIOKafkaProducer (untyped)
    _partition_of: dict[tuple[str, int, bytes], int] = field(default_factory=dict)

    async def send(self, outputs: Sequence[Out]) -> list[Sent]:
        """Hand `outputs` to the producer; nothing is acknowledged yet.

        Args:
            outputs: records in the order they should land (kept per partition).

        Returns:
            What was handed over, in order per partition: await each `future` for its
            outputs' acknowledgement (it raises the producer's error for all of them).

        Raises:
            KafkaError: the producer refused before anything was sent for some of them
                (metadata not available in time, producer closed); some outputs may
                already be on their way.
        """
        groups: dict[tuple[str, int], list[Out]] = {}
        sent: list[Sent] = []
        partitions: dict[str, list[int]] = {}
        for out in outputs:
            if out.key is None:
                future = await self.producer.send(out.topic, out.value, key=None)
                sent.append(Sent(out.topic, None, [out], future))
                continue
            parts = partitions.get(out.topic)
            if parts is None:
                # As `send` lists them (a set's order; it waits for the topic's metadata).
                parts = partitions[out.topic] = list(await self.producer.partitions_for(out.topic))
            place = (out.topic, self._partition(out.topic, parts, out.key))
            groups.setdefault(place, []).append(out)
        for (topic, partition), outs in groups.items():
            sent.extend(await self._send_partition(topic, partition, outs))
        return sent

    def _partition(self, topic: str, parts: list[int], key: bytes) -> int:
        cache_key = (topic, len(parts), key)
        partition = self._partition_of.get(cache_key)
        if partition is None:
            if len(self._partition_of) >= CACHE_MAX_KEYS:
                self._partition_of.clear()
            # The producer's partitioner, as `send` calls it (aiokafka keeps it private).
            partition = self.producer._partitioner(key, parts, parts)
            self._partition_of[cache_key] = partition
        return partition

    async def _send_partition(self, topic: str, partition: int, outs: list[Out]) -> list[Sent]:
        sent: list[Sent] = []
        batch, members = self.producer.create_batch(), list[Out]()
        for out in outs:
            # timestamp None: the time of appending (CreateTime), as `send` sets it.
            if batch.append(key=out.key, value=out.value, timestamp=None) is None:
                # Full (the producer's max batch size): send it, start the next. The
                # first record always fits an empty batch.
                future = await self.producer.send_batch(batch, topic, partition=partition)
                sent.append(Sent(topic, partition, members, future))
                batch, members = self.producer.create_batch(), list[Out]()
                if batch.append(key=out.key, value=out.value, timestamp=None) is None:
                    # Never: an empty batch takes any record. Were it refused, the record
                    # would count as acknowledged unsent; the caller dead-letters instead.
                    raise RuntimeError(f"an empty record batch refused a record for {topic}")
            members.append(out)
        future = await self.producer.send_batch(batch, topic, partition=partition)
        sent.append(Sent(topic, partition, members, future))
        return sent


def to_resend(sent: Sequence[Sent], results: Sequence[Any]) -> list[Out]:
    """The outputs to send again after some batches failed: in each partition, every
    output from its first failed batch on (later ones again too, so a partition's order
    holds; their duplicates share ids and downstream dedupe drops them), in order.

    Args:
        sent: what `BatchSender.send` returned.
        results: each one's awaited result or exception (as `gather(...,
            return_exceptions=True)` returns them).

    Returns:
        The outputs to send again (empty: all acknowledged).
    """
    failed_from: set[tuple[str, int | None]] = set()
    again: list[Out] = []
    for item, result in zip(sent, results, strict=True):
        place = (item.topic, item.partition)
        if item.partition is not None and place in failed_from:
            again.extend(item.outputs)
        elif isinstance(result, BaseException):
            failed_from.add(place)
            again.extend(item.outputs)
    return again
