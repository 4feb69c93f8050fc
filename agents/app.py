"""The Faust stream worker: fleet table, enrichment + dedupe, cloud verdicts, hard examples.

Topology (docs/architecture.md, "Agents"):

    fleet.devices.v1  --fleet-->    table `fleet`   (device -> enrichment tail)
    edge.status.v1    --status-->   table `status`  (device -> tail from its latest status)
    edge.inference.v1 --enrich-->   edge.inference.enriched.v1   (table `dedupe-inference`)
    edge.offload.v1   --verdicts--> cloud.verdicts.v1 + ml.hard-examples.v1
                                                     (table `dedupe-offload`, the teacher)
    each stage's bad records -> <source>.dlq.v1 (DeadLetter with the reason)

Every agent is a thin `stream.take_events(n, within=...)` loop around a pure step
(`enrich_stage`, `verdict_stage`), with `concurrency=1`, and nothing raised escapes it:
faust-streaming 0.15.3 acks the event an agent raised on (the record would be skipped),
can commit past an in-flight event with concurrency > 1, and records a failed commit as
done. So each batch is fully handled before its body returns: outputs produced and
acknowledged by Kafka (retried until they are), only then the dedupe state written, and
anything unexpected dead-lettered. Output ids derive from input ids, so a redelivered
input (after a crash, a rebalance or a lost commit) yields the same ids.

Tables are in memory with changelog topics (`<app_id>-<table>-changelog`), keyed by
device id with `use_partitioner=True`: a device's changelog partition is the one its
events use (same key, same partitioner, same partition count), so the worker that owns a
device's events recovers exactly that device's state after a rebalance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgeloop.agents.changelog_tracking import ChangelogTracking
from edgeloop.agents.context import FLEET, STATUS, Context, now_us
from edgeloop.agents.control.settings import ControlSettings
from edgeloop.agents.dead_letter import dead_letter
from edgeloop.agents.dedupe import DedupeState
from edgeloop.agents.eager_drain import EagerDrainConsumer
from edgeloop.agents.enrich import from_device_record, from_status
from edgeloop.agents.enrich_stage import INFERENCE, EnrichStep
from edgeloop.agents.hardness import RouterConfig
from edgeloop.agents.lean_faust import LeanProducer, RawSchema
from edgeloop.agents.metrics import AgentMetrics
from edgeloop.agents.offset_ledger import OffsetLedger
from edgeloop.agents.records import Observer, Out, Raw, StepResult
from edgeloop.agents.settings import AgentsSettings
from edgeloop.agents.verdict_stage import OFFLOAD, Prepared, RouterPolicy, VerdictStep
from edgeloop.core.errors import DecodeError, EdgeloopError
from edgeloop.core.logs import get_logger
from edgeloop.core.settings import KafkaSettings, RegistrySettings
from edgeloop.schemas.topics import TOPICS, dlq_topic

log = get_logger(__name__)

DEVICE_RECORD = "edgeloop.v1.DeviceRecord"
DEVICE_STATUS = "edgeloop.v1.DeviceStatus"


# Gaps in a compacted topic's offsets are normal: the offset ledger does not watch them.
COMPACTED = frozenset(name for name, spec in TOPICS.items() if spec.compacted)


def _raws(events: Iterable[Any]) -> list[Raw]:
    # A tombstone (value None) becomes b"": the fleet stage reads it as "device removed",
    # every other stage dead-letters it (shorter than the Confluent header).
    return [
        Raw(m.value or b"", m.key, m.topic, m.partition, m.offset)
        for m in (e.message for e in events)
    ]


def _table_get(table: Any) -> Callable[[str], bytes | None]:
    get = table.get
    return lambda device_id: get(device_id.encode())


def _lookup(table: Any) -> Callable[[str], bytes | None]:
    # The memory store's own dict when there is one (`store="memory://"`): `Table.get`
    # goes through Mapping.get, the table's __getitem__ and a sensor hook per key, ~5% of
    # the enrich stage's CPU in the agents bench. Read per batch, so a store rebuilt by a
    # recovery is seen by the next batch.
    data = getattr(getattr(table, "data", None), "data", None)
    get = data.get if isinstance(data, dict) else table.get
    return lambda device_id: get(device_id.encode())


def _write_back(table: Any, dedupe: DedupeState, *, force: bool = False) -> None:
    """Write the due dedupe windows; never raises. Faust's changelog send can fail while a
    rebalance is under way (measured: TypeError from its eager partitioning); the windows
    are kept for the next flush, and a raise here would dead-letter a batch whose outputs
    are already in Kafka (in a timer it crashes the whole app)."""
    items = dedupe.due(force=force)
    for i, (device_id, state) in enumerate(items):
        try:
            table[device_id.encode()] = state
        except Exception:
            log.warning("dedupe window write failed; retried at the next flush", exc_info=True)
            dedupe.requeue(items[i:])
            return


def router_policy(s: AgentsSettings) -> RouterPolicy:
    """The hard-example router's parameters from the settings."""
    return RouterPolicy(
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


class Stages:
    """One method per agent: the batch body around the stage's pure step."""

    def __init__(self, ctx: Context, tables: dict[str, Any]) -> None:
        self.ctx = ctx
        self.s = ctx.settings
        self.metrics = ctx.metrics
        self.tables = tables
        self._enrich: EnrichStep | None = None
        # The control plane's observer factory (None: control off); see `enrich`.
        self.observer: Callable[[], Observer] | None = None
        self._verdicts: VerdictStep | None = None
        self.dedupe = {
            name: DedupeState(
                self.s.dedupe_window, _table_get(tables[name]), flush_s=self.s.dedupe_flush_s
            )
            for name in ("dedupe-inference", "dedupe-offload")
        }

    async def _infer(
        self, ready: list[Prepared], result: StepResult
    ) -> tuple[list[Prepared], list[Any]]:
        """The teacher's outputs for `ready`, waiting out an unavailable teacher. When the
        batch fails for good, each sample is retried alone and only those that fail alone
        are dead-lettered (`teacher_rejected`): one bad sample never costs its batch."""
        ctx = self.ctx
        assert ctx.teacher is not None
        assert self._verdicts is not None
        batcher = ctx.teacher.batcher
        try:
            return ready, await ctx.retry("teacher", batcher.infer_many, [r.x for r in ready])
        except EdgeloopError:
            log.warning("teacher refused a batch; answering its samples one by one")
        kept, outs = [], []
        for item in ready:
            try:
                outs.append(await ctx.retry("teacher", batcher.infer, item.x))
                kept.append(item)
            except EdgeloopError as exc:
                self._verdicts.dead(result, item.raw, "teacher_rejected", str(exc), now_us())
        return kept, outs

    def flush_dedupe(self) -> None:
        """Write the acknowledged dedupe windows (a timer calls this between batches:
        windows of a batch still in flight are not written, see DedupeState)."""
        for name, state in self.dedupe.items():
            _write_back(self.tables[name], state, force=True)

    def forget(self) -> None:
        """Partitions moved: cached dedupe windows may now belong to another worker."""
        for state in self.dedupe.values():
            state.clear()

    async def devices(self, batch: Sequence[Raw], stage: str) -> None:
        """DeviceRecords (stage `fleet`) or DeviceStatuses (`status`) -> their enrichment
        tails in the stage's table; a tombstone removes the device; latest wins."""
        ctx, book = self.ctx, self.ctx.book
        assert book is not None
        await ctx.learn(batch)
        expected = DEVICE_RECORD if stage == "fleet" else DEVICE_STATUS
        result = StepResult()
        tails: dict[bytes, bytes | None] = {}
        for raw in batch:
            result.tally["in"] += 1
            if not raw.value:  # a tombstone: the device left the table
                if raw.key:
                    tails[raw.key] = None
                continue
            try:
                schema, rec = book.decode(raw.value)
                if schema.name != expected:
                    raise DecodeError(  # noqa: TRY301 - one dead-letter path per record
                        f"{raw.topic} carries {schema.name}, expected {expected}",
                        reason="wrong_schema",
                    )
                enrichment = from_device_record(rec) if stage == "fleet" else from_status(rec)  # type: ignore[arg-type]
                tails[str(rec["device_id"]).encode()] = enrichment.tail()
            except DecodeError as exc:
                topic = dlq_topic(raw.topic)
                record = dead_letter(
                    stage=f"agents-{stage}", reason=exc.reason, detail=str(exc),
                    source=raw.source, payload=raw.value,
                    device_id=raw.key.decode("utf-8", "replace") if raw.key else None,
                    cap=self.s.dlq_payload_bytes, now_us=now_us(),
                )  # fmt: skip
                result.tally[f"dlq:{exc.reason}"] += 1
                result.emit(Out(topic, raw.key, book.encode(topic, record)))
        await ctx.produce(result.outputs)
        table = self.tables[stage]
        for key, tail in tails.items():
            if tail is None:
                table.pop(key, None)
            elif table.get(key) != tail:  # an unchanged status costs no changelog write
                table[key] = tail
        self.metrics.record(stage, result)

    async def enrich(self, batch: list[Raw]) -> None:
        """InferenceEvents -> dedupe -> EnrichedInferenceEvents (see `enrich_stage`)."""
        ctx = self.ctx
        assert ctx.book is not None
        if self._enrich is None:
            self._enrich = EnrichStep(ctx.book, dlq_payload_bytes=self.s.dlq_payload_bytes)
        await ctx.learn(batch)
        seen = self.tables["dedupe-inference"]
        dedupe = self.dedupe["dedupe-inference"]
        # The control log's observations of this batch's events go out with its outputs
        # (acknowledged together, so the same at-least-once; duplicates dropped by dedupe
        # are not observed).
        observer = self.observer() if self.observer is not None else None
        result = self._enrich.run(
            batch, dedupe, _lookup(self.tables["fleet"]), _lookup(self.tables["status"]),
            now_us(), observe=observer.add if observer is not None else None,
        )  # fmt: skip
        outputs = result.outputs if observer is None else result.outputs + observer.records()
        await ctx.produce(outputs)
        dedupe.acked()  # only now may its windows reach the table
        _write_back(seen, dedupe)
        self.metrics.record("enrich", result)

    async def verdicts(self, batch: list[Raw]) -> None:
        """OffloadRequests -> teacher (micro-batched) -> CloudVerdicts + HardExamples."""
        ctx = self.ctx
        assert ctx.book is not None
        assert ctx.teacher is not None
        if self._verdicts is None:
            from edgeloop.tasks.digits import DigitsTask

            self._verdicts = VerdictStep(
                ctx.book, router_policy(self.s), preprocess=DigitsTask().preprocess,
                max_decoded_bytes=self.s.max_decoded_input_bytes,
                dlq_payload_bytes=self.s.dlq_payload_bytes,
            )  # fmt: skip
        step, batcher = self._verdicts, ctx.teacher.batcher
        started = time.monotonic()
        await ctx.learn(batch)
        seen = self.tables["dedupe-offload"]
        dedupe = self.dedupe["dedupe-offload"]
        model = batcher.model
        ready, result = step.prepare(batch, dedupe, model.input_shape, now_us())
        ready, outs = await self._infer(ready, result)
        step.finish(
            ready, outs, teacher_name=model.name, teacher_version=model.version,
            now_us=now_us(), result=result,
        )  # fmt: skip
        await ctx.produce(result.outputs)
        dedupe.acked()
        _write_back(seen, dedupe)
        # Busy from taking the batch to its outputs acknowledged: what one more offload
        # costs this stage (the wait for the next batch is idle time, not counted).
        ctx.teacher_rate.record(len(batch), started, time.monotonic())
        self.metrics.record("verdicts", result)


def _bootstrap(kafka: KafkaSettings) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in kafka.bootstrap.split(",") if h.strip())


def _faust_app(s: AgentsSettings, kafka: KafkaSettings) -> Any:
    app = _faust_app_with_settings(s, kafka)
    # The fetch loop hands each message to its streams without four tasks per message
    # (agents/eager_drain.py), and its producer buffer is measured without a settings
    # lookup per event (agents/lean_faust.py); instance attributes, so no other app is
    # touched.
    app.transport.Consumer = EagerDrainConsumer
    app.transport.Producer = LeanProducer
    return app


def _faust_app_with_settings(s: AgentsSettings, kafka: KafkaSettings) -> Any:
    return faust.App(
        s.app_id,
        broker=_bootstrap(kafka),
        store="memory://",
        autodiscover=False,
        processing_guarantee="at_least_once",
        topic_partitions=s.partitions,
        topic_disable_leader=True,
        datadir=str(s.data_dir),
        # `web_bind` is the address the server listens on (Faust's default: every
        # interface); `web_host` only the name it advertises to other workers.
        web_bind=s.web_host,
        web_host=s.web_host,
        web_port=s.web_port,
        stream_buffer_maxsize=s.stream_buffer_maxsize,
        broker_max_poll_records=s.max_poll_records,
        broker_session_timeout=s.session_timeout_s,
        consumer_metadata_max_age_ms=int(s.metadata_max_age_s * 1000),
        broker_heartbeat_interval=s.heartbeat_interval_s,
        producer_linger_ms=s.producer_linger_ms,
        producer_max_batch_size=s.producer_max_batch_bytes,
        consumer_auto_offset_reset="earliest",
        # On a stop or a rebalance Faust 0.15.3 waits (`wait_empty`) until every event it
        # handed to a stream is acknowledged. Events buffered in a `take_events` batch
        # that is still filling are never acknowledged once the fetcher stopped (the
        # batch waits for an event that no longer comes), so the wait lasted until the
        # worker was killed (a 45 s stop in the demo, SIGKILL). Not waiting is safe here:
        # nothing is committed past an unacknowledged event, every batch is fully handled
        # before its events are acknowledged, and outputs derive their ids from inputs,
        # so the events of an unfinished batch are redelivered and deduplicated.
        stream_wait_empty=False,
    )


def _controls(app: Any, ctx: Context, control: ControlSettings, agent: Any, stages: Stages) -> None:
    """Add the control plane's agents (agents/control_app.py) when enabled; the enrich
    stage then observes its InferenceEvents for the control log."""
    if control.wiring.enabled:
        from edgeloop.agents.control_app import register

        stages.observer = register(app, ctx, control, agent).observer


class _AgentFactory:
    """Registers one stage as a Faust agent: a `take_events` loop around its batch body,
    with the stage's offset ledger (agents/offset_ledger.py)."""

    def __init__(self, app: Any, ctx: Context, topic: Callable[[str], Any]) -> None:
        self.app, self.ctx, self.topic = app, ctx, topic
        # One offset ledger per stage (several stages read the same topics).
        self.ledgers: list[OffsetLedger] = []
        self._stages: list[_Stage] = []

    def __call__(
        self,
        source: Any,
        stage: str,
        body: Callable[[list[Raw]], Awaitable[None]],
        take: tuple[int, float] | None = None,
    ) -> None:
        ctx = self.ctx
        size = take or (ctx.settings.batch_max, ctx.settings.batch_within_s)
        ledger = OffsetLedger(exempt=COMPACTED)
        self.ledgers.append(ledger)
        # `source`: a topic name, or a channel built by the caller (several topics).
        channel = self.topic(source) if isinstance(source, str) else source
        topics = getattr(channel, "topics", None) or (source,)  # a test passes plain names
        entry = _Stage(stage, body, ledger, frozenset(topics))
        self._stages.append(entry)

        async def loop(stream: Any) -> None:
            await ctx.ready.wait()
            async for events in stream.take_events(*size):
                batch = _raws(events)
                # One batch at a time per stage, the tail sweep's included (the bodies
                # keep per-stage state, like the dedupe windows).
                async with entry.lock:
                    holes = await ledger.observe(batch, ctx.committed_offset)
                    # In offset order: the batch's records up to each hole, the hole's
                    # records, then the rest (a stage that skips what is at or below the
                    # last offset it applied, the control step, would drop a run handed
                    # out of order). All before the batch is acknowledged, since Faust may
                    # count a hole as done.
                    start = 0
                    for hole in holes:
                        if hole.at > start:
                            await self._run(stage, body, batch[start : hole.at])
                            start = hole.at
                        await ctx.fill_holes(stage, [hole], body)
                    if start < len(batch):
                        await self._run(stage, body, batch[start:])

        loop.__name__ = loop.__qualname__ = stage
        self.app.agent(channel, name=stage, concurrency=1)(loop)

    async def _run(
        self, stage: str, body: Callable[[list[Raw]], Awaitable[None]], part: list[Raw]
    ) -> None:
        async def handle() -> None:
            await body(part)

        await self.ctx.guarded(stage, part, handle)

    async def sweep_tails(self) -> None:
        """Hand each stage the records Faust read but dropped at a partition's tail
        (`OffsetLedger.tail_holes`), for a timer: never raises (an exception in a Faust
        timer stops the app)."""
        ctx = self.ctx
        try:
            consumer = self.app.consumer
            read = [
                (tp.topic, tp.partition, offset + 1)
                for tp in consumer.assignment()
                if (offset := consumer._read_offset.get(tp)) is not None  # faust: private
            ]
            for entry in self._stages:
                mine = [r for r in read if r[0] in entry.topics]
                if not mine or entry.lock.locked():
                    continue  # a batch in flight: its records may be the "hole"
                async with entry.lock:
                    holes = await entry.ledger.tail_holes(
                        mine, ctx.committed_offset, time.monotonic(), ctx.settings.stall_s
                    )
                    await ctx.fill_holes(entry.name, holes, entry.body)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("tail sweep failed; the next tick tries again", exc_info=True)


@dataclass
class _Stage:
    """One registered stage, for the tail sweep."""

    name: str
    body: Callable[[list[Raw]], Awaitable[None]]
    ledger: OffsetLedger
    topics: frozenset[str]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def make_app(
    settings: AgentsSettings,
    kafka: KafkaSettings,
    registry: RegistrySettings,
    *,
    metrics: AgentMetrics | None = None,
    control: ControlSettings | None = None,
) -> Any:
    """Build the Faust app (no module-level app: each worker, test and bench builds its own).

    Args:
        settings: the agents' settings.
        kafka: the broker.
        registry: the schema registry.
        metrics: collectors to count into (a new registry by default).
        control: the control plane's settings (defaults when None; its
            `wiring.enabled` runs the control agents, agents/control_app.py).

    Returns:
        A `faust.App`; `app.edgeloop` is the shared `Context` (metrics, readiness).
    """
    s = settings
    ctx = Context(s, kafka, registry, metrics or AgentMetrics())
    app = _faust_app(s, kafka)
    ctx.app = app
    app.edgeloop = ctx

    def topic(name: str) -> Any:
        return app.topic(name, schema=RawSchema(), partitions=s.partitions)

    tables = {
        name: app.Table(
            name,
            default=None,
            key_type=bytes,
            value_type=bytes,
            partitions=s.partitions,
            use_partitioner=True,
            help=what,
        )
        for name, what in (
            ("fleet", "device id -> enrichment tail from its DeviceRecord"),
            ("status", "device id -> enrichment tail from its latest DeviceStatus"),
            ("dedupe-inference", "device id -> seen seq window of its InferenceEvents"),
            ("dedupe-offload", "device id -> seen seq window of its OffloadRequests"),
        )
    }
    stages = Stages(ctx, tables)

    agent = _AgentFactory(app, ctx, topic)

    agent(FLEET, "fleet", lambda b: stages.devices(b, "fleet"))
    agent(STATUS, "status", lambda b: stages.devices(b, "status"))
    agent(INFERENCE, "enrich", stages.enrich)
    if s.verdicts:
        take = (s.verdict_batch_max, s.verdict_batch_within_s)
        agent(OFFLOAD, "verdicts", stages.verdicts, take)

    _controls(app, ctx, control or ControlSettings(), agent, stages)

    changelogs = ChangelogTracking(app)

    async def start() -> None:
        await ctx.retry("kafka", changelogs.track)  # the tables declared them by now
        await ctx.start()
        if ctx.teacher is not None:
            await ctx.teacher.batcher.run()

    async def reload_teacher() -> None:
        try:
            await ctx.reload_teacher()
        except Exception:  # a bad release keeps the running teacher; say why
            log.exception("teacher reload refused; keeping the running teacher")

    sources = frozenset({FLEET, STATUS, INFERENCE, OFFLOAD})

    async def consumer_lag() -> None:
        await ctx.watch_lag(sources)

    async def flush_dedupe() -> None:
        stages.flush_dedupe()

    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside `content_type`; the header carries it whole.
        body = generate_latest(ctx.metrics.registry)
        return web.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def partitions_moved(*_: Any, **__: Any) -> None:
        stages.forget()
        for ledger in agent.ledgers:
            ledger.forget()

    # Registered by call, not as decorators: Faust's decorators are untyped.
    app.on_partitions_revoked.connect(partitions_moved)
    app.on_partitions_assigned.connect(partitions_moved)
    app.task(start)
    app.timer(s.teacher_reload_s)(reload_teacher)
    app.timer(5.0)(consumer_lag)
    app.timer(5.0)(changelogs.track_again)
    app.timer(max(s.stall_s / 3, 0.5))(agent.sweep_tails)
    app.timer(max(s.dedupe_flush_s, 0.1))(flush_dedupe)
    app.page("/metrics")(metrics_page)

    return app
