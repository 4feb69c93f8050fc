"""The `_schemas` topic: the log every registry instance replays, tails and writes.

The log is the arbiter (see state.py). An instance serves only after it has applied the
log up to the high watermark it found at start; a write is produced with acks=all and
counts only once this instance's own tail has applied it, so the outcome a caller sees is
the one every other instance computes from the same log.
"""

from __future__ import annotations

import asyncio
import uuid
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from edgeloop.core.errors import RegistryError
from edgeloop.core.logs import get_logger
from edgeloop.schemas.registry import api, compat
from edgeloop.schemas.registry.state import Outcome, RegistryState, encode

log = get_logger(__name__)

TOPIC_ALREADY_EXISTS = 36
FETCH_WAIT_MS = 50
MAX_SWEEP = 10_000


class SchemaLog:
    """Owns the Kafka clients for the `_schemas` topic and the state they build.

    Use as `async with SchemaLog(...) as store:` and run `store.tail()` in a task; wait
    for `store.ready` before serving reads.
    """

    def __init__(self, bootstrap: str, topic: str = "_schemas", *, timeout_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self.state = RegistryState(identity=compat.stored_identity)
        self.ready = asyncio.Event()
        # One write at a time per instance: concurrent proposals from one instance would
        # only void each other. Other instances are arbitrated by the log.
        self.write_lock = asyncio.Lock()
        self._tp = TopicPartition(topic, 0)
        self._applied = 0  # offset of the next record to apply
        self._advanced = asyncio.Condition()
        # Only proposals in flight from this instance; bounded by write_lock to one or two.
        self._pending: dict[str, asyncio.Future[Outcome]] = {}
        # Keys of void proposals met during the replay: left by a writer that died before
        # its cleanup tombstone. Bounded; `sweep()` tombstones them.
        self.void_keys: dict[bytes, None] = {}  # ordered set
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> SchemaLog:
        try:
            async with asyncio.timeout(self.timeout_s * 3):
                await self._ensure_topic()
                self._producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap,
                    acks="all",
                    enable_idempotence=False,
                    request_timeout_ms=int(self.timeout_s * 1000),
                )
                await self._producer.start()
                self._consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    # A write waits for its own record to come back through this tail;
                    # brokers that hold an empty fetch for the full wait (Tansu) would add
                    # that wait to every write, so keep it short.
                    fetch_max_wait_ms=FETCH_WAIT_MS,
                    request_timeout_ms=int(self.timeout_s * 1000),
                )
                await self._consumer.start()
                self._consumer.assign([self._tp])
                await self._consumer.seek_to_beginning(self._tp)
        except (KafkaError, TimeoutError, OSError) as exc:
            await self._close()
            raise api.store_error(
                f"cannot open topic {self.topic!r} on {self.bootstrap}: {exc!r}"
            ) from exc
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        for client in (self._producer, self._consumer):
            if client is not None:
                await client.stop()
        self._producer = self._consumer = None

    async def _ensure_topic(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, request_timeout_ms=int(self.timeout_s * 1000)
        )
        await admin.start()
        try:
            if self.topic in await admin.list_topics():
                described = await admin.describe_topics([self.topic])
                partitions = len(described[0].get("partitions", [])) if described else 0
                if partitions != 1:
                    # Order across partitions is undefined: instances could disagree.
                    raise api.store_error(
                        f"topic {self.topic!r} has {partitions} partitions; the registry "
                        "needs exactly 1 (it is one totally ordered log)"
                    )
                return
            brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
            # One partition: the whole registry is one totally ordered log.
            new = NewTopic(
                self.topic,
                num_partitions=1,
                replication_factor=min(3, brokers),
                topic_configs={"cleanup.policy": "compact"},
            )
            response = await admin.create_topics([new])
            for _topic, code, *rest in response.topic_errors:
                # Another instance may have created it a moment ago: that is fine.
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    raise api.store_error(f"creating {self.topic!r} failed: code {code} {rest}")
            log.info(
                "created registry topic",
                extra={"topic": self.topic, "replication_factor": min(3, brokers)},
            )
        finally:
            await admin.close()

    # ---- reading ------------------------------------------------------------------

    async def tail(self) -> None:
        """Apply the log forever; sets `ready` once the start-up high watermark is reached."""
        consumer = self._require(self._consumer)
        target = (await consumer.end_offsets([self._tp]))[self._tp]
        log.info("replaying registry log", extra={"topic": self.topic, "records": target})
        while True:
            if not self.ready.is_set() and self._applied >= target:
                self.ready.set()
                log.info(
                    "registry log replayed",
                    extra={"topic": self.topic, "schemas": self.state.schema_count()},
                )
            batches = await consumer.getmany(self._tp, timeout_ms=500)
            for record in batches.get(self._tp, []):
                outcome = self.state.apply(record.key, record.value)
                if outcome is None:
                    log.warning(
                        "skipped a malformed registry record", extra={"offset": record.offset}
                    )
                elif not self.ready.is_set() and record.key is not None:
                    self._note_void(record.key, record.value, outcome)
                elif outcome.proposal is not None:
                    future = self._pending.pop(outcome.proposal, None)
                    if future is not None and not future.done():
                        future.set_result(outcome)
            # position() steps over offsets that compaction removed.
            position = await consumer.position(self._tp)
            if position != self._applied:
                async with self._advanced:
                    self._applied = position
                    self._advanced.notify_all()

    def _note_void(self, key: bytes, value: bytes | None, outcome: Outcome) -> None:
        if value is None:
            self.void_keys.pop(key, None)  # its writer cleaned it up already
        elif not outcome.accepted and len(self.void_keys) < MAX_SWEEP:
            self.void_keys[key] = None

    async def _wait_applied(self, offset: int) -> None:
        """Wait until this instance has applied everything before `offset`."""
        async with self._advanced:
            await self._advanced.wait_for(lambda: self._applied >= offset)

    async def sync(self) -> None:
        """Read barrier: apply everything written anywhere before this call."""
        consumer = self._require(self._consumer)
        try:
            async with asyncio.timeout(self.timeout_s):
                end = (await consumer.end_offsets([self._tp]))[self._tp]
                await self._wait_applied(end)
        except TimeoutError:
            raise api.timed_out(f"catching up with topic {self.topic!r}") from None
        except KafkaError as exc:
            raise api.store_error(repr(exc)) from exc

    # ---- writing ------------------------------------------------------------------

    async def sweep(self) -> int:
        """Tombstone the void proposals found in the replay, so that compaction drops them.

        A void record can never take effect while the record that beat it is in the log;
        after that one is deleted and compacted away, a replay would see the void one as
        valid. Its writer tombstones it on the spot; this catches writers that died first.
        Tombstoning a void key is harmless (state.py ignores it), so racing sweeps are fine.
        """
        keys, self.void_keys = list(self.void_keys), {}
        async with self.write_lock:
            for key in keys:
                await self.write(key, None)
        return len(keys)

    async def write(self, key: bytes, value: dict[str, Any] | None) -> None:
        """Produce one record (acks=all) and return once this instance has applied it.

        `key` is raw bytes so that a delete reuses the exact key of the record it supersedes.
        """
        await self._produce_applied(key, value)

    async def propose(self, key: dict[str, Any], value: dict[str, Any]) -> Outcome:
        """Write a proposal and return the verdict the log gave it."""
        proposal = str(key.setdefault("proposal", uuid.uuid4().hex))
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending[proposal] = future
        try:
            await self._produce_applied(encode(key) or b"", value)
            # Applied means the tail has already resolved the future.
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise api.timed_out(f"waiting for proposal {proposal}") from None
        finally:
            self._pending.pop(proposal, None)

    async def _produce_applied(self, key: bytes, value: dict[str, Any] | None) -> None:
        producer = self._require(self._producer)
        try:
            async with asyncio.timeout(self.timeout_s):
                meta = await producer.send_and_wait(
                    self.topic, key=key, value=encode(value), partition=0
                )
                await self._wait_applied(meta.offset + 1)
        except TimeoutError:
            raise api.timed_out(f"writing to topic {self.topic!r}") from None
        except KafkaError as exc:
            raise api.store_error(repr(exc)) from exc

    @staticmethod
    def _require(client: Any) -> Any:
        if client is None:
            raise RegistryError(
                "the registry store is not open", status=500, error_code=api.BACKEND_STORE_ERROR
            )
        return client
