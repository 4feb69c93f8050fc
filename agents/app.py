"""The Faust stream worker: fleet table, enrichment + dedupe, cloud verdicts, hard examples.

Topology (docs/architecture.md, "Agents"):

    fleet.devices.v1  --fleet-->  table `fleet`   (device -> enrichment tail)
    edge.status.v1    --status--> table `status`  (device -> tail from its latest status)
    edge.inference.v1 --enrich--> edge.inference.enriched.v1   (table `dedupe-inference`)
    edge.offload.v1   --verdicts--> cloud.verdicts.v1 + ml.hard-examples.v1
                                                     (table `dedupe-offload`, teacher)
    each stage's bad records --> <source>.dlq.v1 (DeadLetter with the reason)

Every agent is a thin `stream.take_events(n, within=...)` loop around a pure step
(`enrich_stage`, `verdict_stage`), with `concurrency=1`, and nothing raised escapes it:
faust-streaming 0.15.3 acks the event an agent raised on (the record would be skipped),
can commit past an in-flight event with concurrency > 1, and records a failed commit as
done. So each batch is fully handled before its body returns: outputs produced and
acknowledged by Kafka (retried until they are), only then the dedupe state written, and
anything unexpected dead-lettered. Output ids derive from input ids, so a redelivered
input (after a crash, a rebalance or a lost commit) yields the same ids and consumers
dedupe them.

Tables are in memory with changelog topics (`<app_id>-<table>-changelog`), keyed by
device id with `use_partitioner=True`: the changelog partition of a device is the one its
events use (same key, same partitioner, same partition count), so the worker that owns a
device's events recovers exactly that device's state after a rebalance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import KafkaError
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgeloop.agents.codec import SchemaBook
from edgeloop.agents.dead_letter import dead_letter
from edgeloop.agents.dedupe import BatchDedupe
from edgeloop.agents.enrich import from_device_record, from_status
from edgeloop.agents.enrich_stage import ENRICHED, ENRICHED_TOPIC, INFERENCE, EnrichStep
from edgeloop.agents.hardness import RouterConfig
from edgeloop.agents.metrics import AgentMetrics
from edgeloop.agents.records import Out, Raw, StepResult
from edgeloop.agents.settings import AgentsSettings
from edgeloop.agents.verdict_stage import (
    HARD_EXAMPLES,
    OFFLOAD,
    VERDICTS,
    RouterPolicy,
    VerdictStep,
)
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
DEVICE_RECORD = "edgeloop.v1.DeviceRecord"
DEVICE_STATUS = "edgeloop.v1.DeviceStatus"


def _now_us() -> int:
    return time.time_ns() // 1000


def _raws(events: Iterable[Any]) -> list[Raw]:
    return [
        Raw(m.value, m.key, m.topic, m.partition, m.offset) for m in (e.message for e in events)
    ]


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
    _registry: RegistryClient | None = None

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
        from edgeloop.agents.teacher import TeacherBatcher, load_teacher
        from edgeloop.artifacts.signing import load_public_key
        from edgeloop.artifacts.store import DirectoryStore, HttpArtifactStore

        s = self.settings
        store: Any = (
            HttpArtifactStore(s.store)
            if s.store.startswith(("http://", "https://"))
            else DirectoryStore(Path(s.store))
        )
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
        if teacher is None:
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
        """Produce `outputs` and wait until Kafka acknowledged every one (retrying from the
        first failure: a re-sent record has the same id, so a duplicate is harmless)."""
        producer = self.app.producer
        pending = list(outputs)
        delay = 0.1
        while pending:
            futures: list[Awaitable[Any]] = []
            try:
                for out in pending:
                    futures.append(
                        await producer.send(out.topic, out.key, out.value, None, None, None)
                    )
                results = await asyncio.gather(*futures, return_exceptions=True)
            except KafkaError as exc:
                results = [exc] * len(pending)
            failed = next((i for i, r in enumerate(results) if isinstance(r, BaseException)), None)
            if failed is None:
                return
            self.metrics.retries.labels("kafka").inc()
            log.warning(
                "produce failed; retrying the batch's outputs",
                extra={"error": repr(results[failed]), "pending": len(pending) - failed},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.retry_backoff_max_s)
            pending = pending[failed:]

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
        now = _now_us()
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


def _bootstrap(kafka: KafkaSettings) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in kafka.bootstrap.split(",") if h.strip())


def make_app(
    settings: AgentsSettings,
    kafka: KafkaSettings,
    registry: RegistrySettings,
    *,
    metrics: AgentMetrics | None = None,
) -> Any:
    """Build the Faust app (no module-level app: each worker, test and bench builds its own).

    Args:
        settings: the agents' settings.
        kafka: the broker.
        registry: the schema registry.
        metrics: collectors to count into (a new registry by default).

    Returns:
        A `faust.App`; `app.edgeloop` is the shared `Context` (metrics, readiness).
    """
    s = settings
    metrics = metrics or AgentMetrics()
    ctx = Context(s, kafka, registry, metrics)
    app = faust.App(
        s.app_id,
        broker=_bootstrap(kafka),
        store="memory://",
        autodiscover=False,
        processing_guarantee="at_least_once",
        topic_partitions=s.partitions,
        topic_disable_leader=True,
        datadir=str(s.data_dir),
        web_host=s.web_host,
        web_port=s.web_port,
        stream_buffer_maxsize=s.stream_buffer_maxsize,
        broker_max_poll_records=s.max_poll_records,
        producer_linger_ms=s.producer_linger_ms,
        producer_max_batch_size=s.producer_max_batch_bytes,
        consumer_auto_offset_reset="earliest",
    )
    ctx.app = app
    app.edgeloop = ctx

    def raw_topic(name: str) -> Any:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=s.partitions,
        )

    def table(name: str, help_: str) -> Any:
        return app.Table(
            name,
            default=None,
            key_type=bytes,
            value_type=bytes,
            partitions=s.partitions,
            use_partitioner=True,
            help=help_,
        )

    fleet_table = table("fleet", "device id -> enrichment tail from its DeviceRecord")
    status_table = table("status", "device id -> enrichment tail from its latest DeviceStatus")
    dedupe_inference = table("dedupe-inference", "device id -> seen seq window (inference)")
    dedupe_offload = table("dedupe-offload", "device id -> seen seq window (offload)")
    take = (s.batch_max, s.batch_within_s)

    def lookup(t: Any) -> Callable[[str], bytes | None]:
        get = t.get
        return lambda device_id: get(device_id.encode())

    def write_back(t: Any, dedupe: BatchDedupe) -> None:
        for device_id, state in dedupe.changed():
            t[device_id.encode()] = state

    @app.task
    async def start() -> None:
        await ctx.start()
        if ctx.teacher is not None:
            await ctx.teacher.batcher.run()

    @app.agent(raw_topic(FLEET), concurrency=1)
    async def fleet(stream: Any) -> None:
        await ctx.ready.wait()
        async for events in stream.take_events(*take):
            batch = _raws(events)
            await ctx.guarded("fleet", batch, lambda b=batch: _devices(b, fleet_table))

    @app.agent(raw_topic(STATUS), concurrency=1)
    async def status(stream: Any) -> None:
        await ctx.ready.wait()
        async for events in stream.take_events(*take):
            batch = _raws(events)
            await ctx.guarded("status", batch, lambda b=batch: _devices(b, status_table))

    async def _devices(batch: Sequence[Raw], target: Any) -> None:
        """Fleet records and statuses -> their tails in `target` (latest wins)."""
        assert ctx.book is not None
        await ctx.learn(batch)
        result, stage = StepResult(), "fleet" if target is fleet_table else "status"
        expected = DEVICE_RECORD if target is fleet_table else DEVICE_STATUS
        tails: dict[bytes, bytes | None] = {}
        for raw in batch:
            result.tally["in"] += 1
            if raw.value is None:  # a tombstone: the device is gone from the table
                if raw.key:
                    tails[raw.key] = None
                continue
            try:
                schema, rec = ctx.book.decode(raw.value)
                if schema.name != expected:
                    raise DecodeError(  # noqa: TRY301
                        f"{raw.topic} carries {schema.name}, expected {expected}",
                        reason="wrong_schema",
                    )
                key = str(rec["device_id"]).encode()
                tails[key] = (
                    from_device_record(rec) if target is fleet_table else from_status(rec)
                ).tail()
            except DecodeError as exc:
                topic = dlq_topic(raw.topic)
                record = dead_letter(
                    stage=f"agents-{stage}", reason=exc.reason, detail=str(exc),
                    source=raw.source, payload=raw.value,
                    device_id=raw.key.decode("utf-8", "replace") if raw.key else None,
                    cap=s.dlq_payload_bytes, now_us=_now_us(),
                )  # fmt: skip
                result.tally[f"dlq:{exc.reason}"] += 1
                result.emit(Out(topic, raw.key, ctx.book.encode(topic, record)))
        await ctx.produce(result.outputs)
        for key, tail in tails.items():
            if tail is None:
                target.pop(key, None)
            elif target.get(key) != tail:  # an unchanged status costs no changelog write
                target[key] = tail
        metrics.record(stage, result)

    enrich_step: list[EnrichStep] = []

    @app.agent(raw_topic(INFERENCE), concurrency=1)
    async def enrich(stream: Any) -> None:
        await ctx.ready.wait()
        assert ctx.book is not None
        step = EnrichStep(ctx.book, dlq_payload_bytes=s.dlq_payload_bytes)
        enrich_step.append(step)
        fleet_get, status_get = lookup(fleet_table), lookup(status_table)
        seen_get = lookup(dedupe_inference)

        async def handle(batch: list[Raw]) -> None:
            await ctx.learn(batch)
            dedupe = BatchDedupe(s.dedupe_window, seen_get)
            result = step.run(batch, dedupe, fleet_get, status_get, _now_us())
            await ctx.produce(result.outputs)
            write_back(dedupe_inference, dedupe)
            metrics.record("enrich", result)

        async for events in stream.take_events(*take):
            batch = _raws(events)
            await ctx.guarded("enrich", batch, lambda b=batch: handle(b))

    if s.verdicts:

        @app.agent(raw_topic(OFFLOAD), concurrency=1)
        async def verdicts(stream: Any) -> None:
            await ctx.ready.wait()
            assert ctx.book is not None and ctx.teacher is not None
            from edgeloop.tasks.digits import DigitsTask

            policy = RouterPolicy(
                RouterConfig(
                    confidence_threshold=s.confidence_threshold,
                    margin_threshold=s.margin_threshold,
                    entropy_threshold=s.entropy_threshold,
                    per_device_cap=s.per_device_cap,
                    global_cap=s.global_cap,
                    window_s=s.budget_window_s,
                    near_dup_hamming=s.near_dup_hamming,
                ),
                near_duplicates=s.near_duplicates,
                drifting_cohorts=s.drifting_cohorts,
            )
            step = VerdictStep(
                ctx.book,
                policy,
                preprocess=DigitsTask().preprocess,
                max_decoded_bytes=s.max_decoded_input_bytes,
                dlq_payload_bytes=s.dlq_payload_bytes,
            )
            batcher = ctx.teacher.batcher
            seen_get = lookup(dedupe_offload)

            async def handle(batch: list[Raw]) -> None:
                await ctx.learn(batch)
                dedupe = BatchDedupe(s.dedupe_window, seen_get)
                model = batcher.model
                ready, result = step.prepare(batch, dedupe, model.input_shape, _now_us())
                outs = await ctx.retry("teacher", batcher.infer_many, [r.x for r in ready])
                step.finish(
                    ready, outs, teacher_name=model.name, teacher_version=model.version,
                    now_us=_now_us(), result=result,
                )  # fmt: skip
                await ctx.produce(result.outputs)
                write_back(dedupe_offload, dedupe)
                metrics.record("verdicts", result)

            async for events in stream.take_events(*take):
                batch = _raws(events)
                await ctx.guarded("verdicts", batch, lambda b=batch: handle(b))

        @app.timer(s.teacher_reload_s)
        async def reload_teacher() -> None:
            if not ctx.ready.is_set():
                return
            try:
                await ctx.reload_teacher()
            except Exception:  # a bad release keeps the running teacher; say why
                log.exception("teacher reload refused; keeping the running teacher")

    @app.timer(5.0)
    async def consumer_lag() -> None:
        consumer = app.consumer
        for tp in consumer.assignment():
            read = consumer._read_offset.get(tp)  # faust: no public read position
            high = consumer.highwater(tp)
            if high is not None:
                lag = high - (read + 1 if read is not None else 0)
                metrics.lag.labels(tp.topic, str(tp.partition)).set(max(lag, 0))

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside `content_type`; the header carries it whole.
        body = generate_latest(metrics.registry)
        return web.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app
