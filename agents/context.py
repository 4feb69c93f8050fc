"""What the agents of one worker share: codec, registry, teacher, produce and retry.

`Context.produce` is the one way out to Kafka: it returns only once every record of the
batch was acknowledged (acks=all), retrying from the first failure; `Context.guarded` is
the one way a batch runs: nothing it raises reaches Faust (which would ack and skip it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from faust.types import TP

from edgeloop.agents.backfill import HoleUnreadableError, read_hole
from edgeloop.agents.batch_send import BatchSender, to_resend
from edgeloop.agents.codec import SchemaBook
from edgeloop.agents.dead_letter import dead_letter
from edgeloop.agents.enrich_stage import ENRICHED, ENRICHED_TOPIC, INFERENCE
from edgeloop.agents.metrics import AgentMetrics
from edgeloop.agents.offset_ledger import Hole
from edgeloop.agents.records import Out, Raw, StepResult
from edgeloop.agents.settings import AgentsSettings
from edgeloop.agents.teacher_rate import TeacherRate
from edgeloop.agents.verdict_stage import HARD_EXAMPLES, OFFLOAD, VERDICTS
from edgeloop.core.errors import DecodeError, EdgeloopError
from edgeloop.core.logs import get_logger
from edgeloop.core.settings import KafkaSettings, RegistrySettings
from edgeloop.schemas import catalog
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import dlq_topic

log = get_logger(__name__)

FLEET = "fleet.devices.v1"
STATUS = "edge.status.v1"


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class Teacher:
    """The running teacher (set once loaded; `batcher` swaps releases)."""

    batcher: Any  # agents.teacher.TeacherBatcher, imported lazily (onnxruntime)
    store: Any
    public_key: Any


@dataclass
class Context:
    """What the agents of one worker share; built by `make_app`, started by the app."""

    settings: AgentsSettings
    kafka: KafkaSettings
    registry_settings: RegistrySettings
    metrics: AgentMetrics
    app: Any = None
    book: SchemaBook | None = None
    teacher: Teacher | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # The verdict stage's offloads per busy second (the control step's measured capacity)
    teacher_rate: TeacherRate = field(default_factory=TeacherRate)
    _registry: RegistryClient | None = None
    _sender: BatchSender | None = None  # over Faust's aiokafka producer, made on first use
    _progress: dict[Any, tuple[int | None, float]] = field(default_factory=dict)

    async def start(self) -> None:
        """Open the registry, register the output schemas, load the teacher."""
        s = self.settings
        self._registry = RegistryClient.from_settings(self.registry_settings)
        book = SchemaBook(self._registry, DecodeLimits(max_message_bytes=s.max_message_bytes))
        outputs = {ENRICHED_TOPIC: ENRICHED, VERDICTS: catalog.get("CloudVerdict")}
        outputs[HARD_EXAMPLES] = catalog.get("HardExample")
        for source in (INFERENCE, OFFLOAD, FLEET, STATUS):
            outputs[dlq_topic(source)] = catalog.get("DeadLetter")
        for topic, schema in outputs.items():
            await self.retry("registry", book.register_output, topic, schema)
        self.book = book
        if s.verdicts:
            self.teacher = await asyncio.to_thread(self._load_teacher)
        self.ready.set()
        log.info("agents ready", extra={"verdicts": s.verdicts})

    def _load_teacher(self) -> Teacher:
        from edgeloop.agents.teacher import TeacherBatcher, load_teacher, teacher_store
        from edgeloop.artifacts.signing import load_public_key

        s = self.settings
        store = teacher_store(s.store)
        key = load_public_key(s.public_key)
        model = load_teacher(store, public_key=key, name=s.teacher_name)
        batcher = TeacherBatcher(
            model,
            max_batch=s.teacher_max_batch,
            max_wait_s=s.teacher_max_wait_s,
            queue_size=s.teacher_queue_size,
        )
        batcher.stats.on_batch = self.metrics.on_teacher_batch
        log.info("teacher loaded", extra={"teacher": model.name, "version": model.version})
        return Teacher(batcher, store, key)

    async def reload_teacher(self) -> None:
        """Swap in a newer verified teacher release, if the store has one."""
        teacher = self.teacher
        if teacher is None or not self.ready.is_set():
            return
        from edgeloop.agents.teacher import load_teacher

        current = teacher.batcher.model
        versions = await asyncio.to_thread(teacher.store.versions, current.name)
        newest = max(versions, default=current.version)
        if newest <= current.version:
            return
        model = await asyncio.to_thread(
            load_teacher,
            teacher.store,
            public_key=teacher.public_key,
            name=current.name,
            version=newest,
            min_version=current.version,
        )
        teacher.batcher.swap(model)
        log.info("teacher swapped", extra={"teacher": model.name, "version": model.version})

    async def watch_lag(self, sources: frozenset[str]) -> None:
        """`update_lag` and the re-seek of what it finds stalled, for a Faust timer: an
        exception in a timer crashes the whole app, so a failure here is logged and the
        next tick tries again."""
        try:
            stalled = self.update_lag(sources)
            for tp in stalled:
                await self._reseek(tp)
        except Exception:
            log.warning("consumer lag not updated", exc_info=True)

    def update_lag(self, sources: frozenset[str], now: float | None = None) -> list[Any]:
        """Consumer lag per assigned partition, and a watchdog for stalled ones.

        faust-streaming 0.15.3 can leave a partition assigned but never fetched after a
        rebalance (seen here after a worker was killed: the survivor held the dead
        worker's partitions and read nothing from them; compare faust-streaming#629 and
        #471). A source partition with lag whose read position has not moved for
        `stall_s` is logged with Faust's and aiokafka's view of it, counted, and put back
        into Faust's active set (`resume_partitions`); the caller then re-seeks it
        (`_reseek`), since in the stalls seen Faust had it active already.

        Returns:
            The stalled partitions.
        """
        consumer = self.app.consumer
        now = time.monotonic() if now is None else now
        stalled = []
        for tp in consumer.assignment():
            read = consumer._read_offset.get(tp)  # faust: no public read position
            high = consumer.highwater(tp)
            if high is None:
                continue
            lag = max(high - (read + 1 if read is not None else 0), 0)
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
            if tp.topic not in sources:
                continue
            last = self._progress.get(tp)
            if lag == 0 or last is None or last[0] != read:
                self._progress[tp] = (read, now)
                continue
            if now - last[1] >= self.settings.stall_s:
                self._unstall(consumer, tp, lag)
                self._progress[tp] = (read, now)
                stalled.append(tp)
        return stalled

    def _unstall(self, consumer: Any, tp: Any, lag: int) -> None:
        active = consumer._get_active_partitions()
        log.error(
            "partition stalled; re-seeking it",
            extra={
                "topic": tp.topic,
                "partition": tp.partition,
                "lag": lag,
                "active": tp in active,
                "paused": tp in consumer._paused_partitions,
                "buffered": tp in consumer._buffered_partitions,
                "flow_active": consumer.flow_active,
                **_aiokafka_view(consumer, tp),
            },
        )
        self.metrics.stalls.labels(tp.topic).inc()
        consumer._buffered_partitions.discard(tp)
        consumer.resume_partitions({tp})

    async def _reseek(self, tp: Any) -> None:
        """Seek a stalled partition to its committed offset (its start when the group
        never committed it: `consumer_auto_offset_reset` is earliest), from the consumer
        thread. That gives aiokafka a valid fetch position, drops any fetched-but-unread
        buffer it holds for the partition, wakes its fetcher and resets Faust's read
        offset (which drops records below it): every way found to leave a partition
        assigned but unread. At-least-once: records after the commit are read again, with
        the same output ids."""
        consumer = self.app.consumer
        part = TopicPartition(tp.topic, tp.partition)
        offset = await self._broker_committed(part)
        if offset is None:
            offset = (await consumer.earliest_offsets(part))[part]
        await consumer.seek_wait({part: offset})
        log.warning(
            "stalled partition re-seeked",
            extra={"topic": tp.topic, "partition": tp.partition, "offset": offset},
        )

    async def committed_offset(self, topic: str, partition: int) -> int | None:
        """The group's committed offset of a source partition (the next one to read), or
        None when it never committed one or it cannot be had now: Faust's view, else the
        broker's. Never raises (it runs outside `guarded`, where Faust would skip)."""
        consumer = self.app.consumer
        offset = consumer._committed_offset.get(TP(topic, partition))  # faust: no public view
        if offset is not None:
            return int(offset)
        try:
            committed = await self._broker_committed(TopicPartition(topic, partition))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # mid-rebalance the coordinator may refuse: learn instead
            log.warning(
                "committed offset unavailable; the offset ledger starts from the next record",
                extra={"topic": topic, "partition": partition, "error": repr(exc)},
            )
            return None
        return committed

    async def _broker_committed(self, part: TopicPartition) -> int | None:
        """The group's committed offset of `part` as the broker has it (None: never)."""
        thread = self.app.consumer._thread  # faust: aiokafka runs in its own thread
        aio = thread._ensure_consumer()
        offset = await thread.call_thread(aio.committed, part)
        return None if offset is None else int(offset)

    async def fill_holes(
        self,
        stage: str,
        holes: Sequence[Hole],
        body: Callable[[list[Raw]], Awaitable[None]],
    ) -> None:
        """Read each hole's records from the broker and run `body` on them (guarded).

        Called before the batch that revealed the holes is acknowledged, so Faust commits
        nothing past them before they are handled. Retries while the broker is down; never
        raises (it runs outside `guarded`): a hole it cannot read is logged as lost.
        """
        for hole in holes:
            try:
                await self._fill(stage, hole, body)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.holes_unread.labels(stage, hole.topic).inc()
                log.exception(
                    "could not read skipped source offsets; they are lost to this stage",
                    extra={"stage": stage, "topic": hole.topic, "partition": hole.partition,
                           "start": hole.start, "end": hole.end},
                )  # fmt: skip

    async def _fill(
        self, stage: str, hole: Hole, body: Callable[[list[Raw]], Awaitable[None]]
    ) -> None:
        log.warning(
            "source offsets skipped by Faust; reading them directly",
            extra={"stage": stage, "topic": hole.topic, "partition": hole.partition,
                   "start": hole.start, "end": hole.end},
        )  # fmt: skip
        self.metrics.holes.labels(stage, hole.topic).inc()
        try:
            missed: list[Raw] = await self.retry("kafka", self._read_hole, hole)
        except HoleUnreadableError as exc:
            # What came before the unservable offset is still handed over.
            self.metrics.holes_unread.labels(stage, hole.topic).inc()
            log.error(  # noqa: TRY400 - the message says it all; no traceback
                "could not read skipped source offsets; they are lost to this stage",
                extra={"stage": stage, "topic": hole.topic, "partition": hole.partition,
                       "start": exc.position, "end": hole.end, "error": str(exc)},
            )  # fmt: skip
            missed = exc.records
        self.metrics.hole_records.labels(stage).inc(len(missed))
        if missed:

            async def handle(m: list[Raw] = missed) -> None:
                await body(m)

            await self.guarded(stage, missed, handle)

    async def _read_hole(self, hole: Hole) -> list[Raw]:
        return await read_hole(
            self.kafka.bootstrap, hole, max_bytes=self.settings.max_message_bytes
        )

    async def stop(self) -> None:
        if self._registry is not None:
            await self._registry.aclose()

    async def retry(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Call `fn` until it succeeds while its failure is retriable (a service down)."""
        delay = 0.2
        while True:
            try:
                return await fn(*args)
            except (KafkaError, OSError, EdgeloopError) as exc:
                if isinstance(exc, EdgeloopError) and not exc.retriable:
                    raise
                self.metrics.retries.labels(what).inc()
                log.warning(f"{what} unavailable; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_backoff_max_s)

    async def learn(self, batch: Sequence[Raw]) -> None:
        """Fetch the writer schemas of `batch` the codec does not know yet (once per id)."""
        assert self.book is not None
        book = self.book
        for raw in batch:
            try:
                if not book.codec.knows(book.codec.schema_id(raw.value)):
                    await self.retry("registry", book.learn, raw.value)
            except DecodeError:
                pass  # the step dead-letters it with the reason

    async def produce(self, outputs: Sequence[Out]) -> None:
        """Produce `outputs` and wait until Kafka acknowledged every one (retrying, per
        partition, from the first failed record batch: a re-sent record has the same id,
        so a duplicate is harmless).

        Through aiokafka's producer under Faust's (started with the app, acks=all), one
        record batch per topic-partition (agents/batch_send.py): Faust's wrapper adds a
        sensor call and header handling per record that we do not use, and aiokafka's
        `send` a future per record."""
        producer = self.app.producer._ensure_producer()
        sender = self._sender
        if sender is None or sender.producer is not producer:  # Faust restarted it
            sender = self._sender = BatchSender(producer)
        pending = list(outputs)
        delay = 0.1
        while pending:
            try:
                sent = await sender.send(pending)
                results = await asyncio.gather(*(s.future for s in sent), return_exceptions=True)
                again = to_resend(sent, results)
                error = next((r for r in results if isinstance(r, BaseException)), None)
            except KafkaError as exc:
                again, error = pending, exc
            if not again:
                return
            self.metrics.retries.labels("kafka").inc()
            log.warning(
                "produce failed; retrying the batch's outputs",
                extra={"error": repr(error), "pending": len(again)},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.retry_backoff_max_s)
            pending = again

    async def guarded(
        self, stage: str, batch: Sequence[Raw], body: Callable[[], Awaitable[None]]
    ) -> None:
        """Run one batch's body; nothing escapes. An unexpected error (a bug) dead-letters
        the batch's records with reason `internal_error` instead of letting Faust ack and
        skip them silently."""
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch failed; dead-lettering it", extra={"stage": stage})
            await self._dead_batch(stage, batch, repr(exc))

    async def _dead_batch(self, stage: str, batch: Sequence[Raw], detail: str) -> None:
        assert self.book is not None
        result = StepResult()
        now = now_us()
        for raw in batch:
            topic = dlq_topic(raw.topic)
            record = dead_letter(
                stage=f"agents-{stage}",
                reason="internal_error",
                detail=detail,
                source=raw.source,
                payload=raw.value,
                device_id=raw.key.decode("utf-8", "replace") if raw.key else None,
                cap=self.settings.dlq_payload_bytes,
                now_us=now,
            )
            result.tally["dlq:internal_error"] += 1
            result.emit(Out(topic, raw.key, self.book.encode(topic, record)))
        try:
            await self.produce(result.outputs)
        except Exception:  # the last line of defence must not raise into Faust either
            log.exception("could not dead-letter a failed batch", extra={"stage": stage})
        self.metrics.record(stage, result)


def _aiokafka_view(consumer: Any, tp: Any) -> dict[str, Any]:
    """aiokafka's state of `tp` (private attributes; best effort, for the stall log)."""
    try:
        aio = consumer._thread._consumer
        assignment = aio._subscription.subscription.assignment
        state = assignment.state_value(tp)
        fetcher = aio._fetcher
        refresh = aio._coordinator._commit_refresh_task
        return {
            "valid_position": state.has_valid_position,
            "awaiting_reset": state.awaiting_reset,
            "kafka_paused": state.paused,
            "position": state._position,
            "awaiting_commit": bool(state._committed_futs),
            "fetched_unread": tp in fetcher._records,
            "nodes_in_flight": sorted(fetcher._in_flight),
            "commit_refresh_alive": refresh is not None and not refresh.done(),
        }
    except Exception as exc:  # a diagnostic must not stop the watchdog
        return {"aiokafka_view": repr(exc)}
