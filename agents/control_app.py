"""The control plane's agents in the `edgeloop agents` worker (docs/architecture.md,
"Control plane", "Wiring").

    edge.inference.v1, edge.offload.v1, edge.status.v1,
    cloud.verdicts.v1, ml.hard-examples.v1,
    ml.model-releases.v1                    --control-forward-->  <app_id>-control-log
    timer (tick_s)                          ----------------->   <app_id>-control-log
    <app_id>-control-log  --control-->  ml.signals.v1, control.thresholds.v1,
                                        ml.training-triggers.v1, ml.model-releases.v1
                                        (table `control`)

The control log has one partition: COHORT and FLEET windows and the triggers' offset
ranges need every device's and every partition's records in one place, and one log gives
the control step one order, so a replay yields the same records (control_stage.py). Both
agents follow the worker's rules (app.py): `concurrency=1`, each batch fully handled
(outputs acknowledged by Kafka) before its body returns, nothing raised escapes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Gauge

from edgeloop.agents.codec import SchemaBook
from edgeloop.agents.context import Context, now_us
from edgeloop.agents.control.settings import ControlSettings
from edgeloop.agents.control_stage import (
    RELEASES_TOPIC,
    SIGNALS_TOPIC,
    THRESHOLDS_TOPIC,
    TRIGGERS_TOPIC,
    ControlState,
    ControlStep,
    Output,
    decode,
    encode,
    observation,
    pack,
    tick,
)
from edgeloop.agents.records import Out, Raw
from edgeloop.agents.verdict_stage import OFFLOAD
from edgeloop.core.errors import ConfigError, DecodeError
from edgeloop.core.logs import get_logger
from edgeloop.schemas import catalog

log = get_logger(__name__)

# The forwarder's sources. InferenceEvents, by far the most records, are observed by the
# enrich stage, which decodes them anyway (`ControlAgents.observer`): forwarding them here
# too cost a second Faust delivery and decode of every event.
SOURCES = (
    "edge.offload.v1",
    "edge.status.v1",
    "cloud.verdicts.v1",
    "ml.hard-examples.v1",
    "ml.model-releases.v1",
)
STATE_KEY = b"control"
# The control state's changelog record: zlib-compressed JSON (a state of 20,000 pending
# requests is ~1.3 MB as JSON, over Faust's 1,000,000-byte record limit; it compresses
# 2-3.5x). Larger than this the oldest pending requests are forgotten, and a state still
# larger is not written (see `control`).
STATE_MAX_BYTES = 900_000
_ZLIB = b"z"


def dump_state(doc: dict[str, Any]) -> bytes:
    """The control state's changelog value (`load_state` reads it)."""
    return _ZLIB + zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 1)


def load_state(value: bytes) -> Any:
    """A changelog value: compressed (`dump_state`) or plain JSON (older workers)."""
    if value[:1] == _ZLIB:
        value = zlib.decompress(value[1:])
    return json.loads(value)


LOG_KEY = b"control"
# Names this worker's teacher measurement in the control log (a restarted worker is a new
# one; the old entry goes stale).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
OUTPUT_SCHEMAS = {
    SIGNALS_TOPIC: "StreamSignal",
    THRESHOLDS_TOPIC: "ThresholdUpdate",
    TRIGGERS_TOPIC: "TrainingTrigger",
    RELEASES_TOPIC: "ModelRelease",
}


def control_log(app_id: str) -> str:
    """The control log's topic name (internal to the app, like Faust's changelogs)."""
    return f"{app_id}-control-log"


async def append_to_log(bootstrap: str, app_id: str, obs: dict[str, Any]) -> int:
    """Append an operator's observation (a MANUAL trigger request, a capacity) to the
    control log of `app_id`; returns once Kafka acknowledged it (acks=all).

    Args:
        bootstrap: the Kafka bootstrap servers.
        app_id: the agents' app id.
        obs: the observation (control_stage.manual, control_stage.capacity).

    Returns:
        The record's offset in the control log (one partition).

    Raises:
        KafkaError: the broker is unreachable or refused the record.
        ConfigError: the control log does not exist (no worker of `app_id` started).
    """
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    topic = control_log(app_id)
    try:
        # Inside the try: a start that fails (broker down) must still close the client.
        await producer.start()
        # A log no worker created yet would be auto-created with the broker's default
        # partitions (4 on Tansu: the control step needs one), and one of a mistyped app id
        # is read by nobody: refuse both. Metadata of all topics creates none.
        cluster = await producer.client.fetch_all_metadata()
        if topic not in cluster.topics():
            raise ConfigError(
                f"the control log {topic} does not exist: no agents worker with app id "
                f"{app_id!r} has started on this cluster (EDGELOOP_AGENTS_APP_ID, --app-id)"
            )
        meta = await producer.send_and_wait(topic, encode(obs), key=LOG_KEY)
        return int(meta.offset)
    finally:
        await producer.stop()


class ControlMetrics:
    """`edgeloop_control_*` on the app's registry."""

    def __init__(self, registry: Any) -> None:
        r = registry
        self.tau = Gauge("edgeloop_control_tau", "Offload threshold", ["cohort"], registry=r)
        self.version = Gauge(
            "edgeloop_control_threshold_version", "Threshold version", ["cohort"], registry=r
        )
        self.offload_rate = Gauge(
            "edgeloop_control_offloads_per_s", "Offloads/s of the last window", ["scope_id"],
            registry=r,
        )  # fmt: skip
        self.budget = Gauge(
            "edgeloop_control_budget_per_s", "Effective cloud budget, offloads/s", registry=r
        )
        self.capacity = Gauge(
            "edgeloop_control_capacity_per_s", "Cloud capacity in force, offloads/s", registry=r
        )
        self.capacity_override = Gauge(
            "edgeloop_control_capacity_override",
            "1 while an operator's capacity (edgeloop control capacity) is in force",
            registry=r,
        )
        self.psi = Gauge("edgeloop_control_psi", "Confidence PSI", ["cohort"], registry=r)
        self.teacher_rate = Gauge(
            "edgeloop_control_teacher_rate_per_s",
            "The workers' teacher rate, offloads per busy second (summed)",
            registry=r,
        )
        self.teacher_busy = Gauge(
            "edgeloop_control_teacher_busy_share",
            "Share of the span the least busy worker's verdict stage was busy",
            registry=r,
        )
        self.capacity_measured = Gauge(
            "edgeloop_control_capacity_measured",
            "1 while the capacity in force is the teacher's measured one",
            registry=r,
        )
        self.hard = Gauge(
            "edgeloop_control_hard_examples_since_trigger",
            "Hard examples not yet covered by a trigger",
            registry=r,
        )
        self.release = Gauge(
            "edgeloop_control_release_version",
            "Model version of the newest rollout step the judge took, per cohort and stage",
            ["cohort", "stage"],
            registry=r,
        )
        self.outputs = Counter(
            "edgeloop_control_outputs_total", "Control records produced", ["topic"], registry=r
        )
        self.requests_dropped = Counter(
            "edgeloop_control_trigger_requests_dropped",
            "Manual training trigger requests (edgeloop train trigger) that fired nothing",
            ["reason"],
            registry=r,
        )
        self.state_too_large = Counter(
            "edgeloop_control_state_too_large_total",
            "Control state writes skipped: the state was over its changelog record limit",
            registry=r,
        )
        self.skipped = Counter(
            "edgeloop_control_skipped_total",
            "Records the control plane could not use",
            ["stage", "reason"],
            registry=r,
        )

    def observe(self, outputs: Sequence[Output], state: ControlState) -> None:
        """Update the gauges from a batch's outputs and the state after it."""
        for topic, _key, rec in outputs:
            self.outputs.labels(topic).inc()
            if topic == SIGNALS_TOPIC and rec["scope"] in ("COHORT", "FLEET"):
                values = rec["values"]
                self.offload_rate.labels(rec["scope_id"]).set(values.get("offloads_per_s", 0.0))
                if rec["scope"] == "COHORT" and "confidence_psi" in values:
                    self.psi.labels(rec["scope_id"]).set(values["confidence_psi"])
                if rec["scope"] == "FLEET" and "capacity_per_s" in values:
                    self.capacity.set(values["capacity_per_s"])
                    self.capacity_override.set("capacity_override_per_s" in values)
                    self.capacity_measured.set(
                        "capacity_override_per_s" not in values
                        and "teacher_capacity_per_s" in values
                    )
                if rec["scope"] == "FLEET" and "teacher_rate_per_s" in values:
                    self.teacher_rate.set(values["teacher_rate_per_s"])
                    self.teacher_busy.set(values["teacher_busy"])
            elif topic == THRESHOLDS_TOPIC and rec["scope"] == "COHORT":
                self.tau.labels(rec["scope_id"]).set(rec["tau"])
                self.version.labels(rec["scope_id"]).set(rec["threshold_version"])
                budget = rec["signals"].get("effective_capacity_per_s")
                if budget is not None:
                    self.budget.set(budget)
            elif topic == RELEASES_TOPIC:
                self.release.labels(rec["cohort"], rec["stage"]).set(rec["model_version"])
        # The FULL release each cohort runs, also when an operator published it (the
        # bootstrap model's) and the judge has taken no step yet: without it a release
        # panel stays empty until the first rollout completes.
        for cohort, rel in state.full.items():
            self.release.labels(cohort, "FULL").set(rel["model_version"])
        self.hard.set(state.triggers.uncovered if state.triggers is not None else 0)


class LogObserver:
    """One batch's observations for the control log (`agents.records.Observer`)."""

    def __init__(self, log_topic: str, metrics: ControlMetrics) -> None:
        self.log_topic = log_topic
        self.metrics = metrics
        self.observations: list[dict[str, Any]] = []

    def add(self, schema_name: str, rec: Mapping[str, Any], raw: Raw) -> None:
        try:
            obs = observation(schema_name, rec, raw)
        except (KeyError, TypeError, ValueError):
            self.metrics.skipped.labels("control-forward", "malformed").inc()
            return
        if obs is not None:
            self.observations.append(obs)

    def records(self) -> list[Out]:
        return [Out(self.log_topic, LOG_KEY, value) for value in pack(self.observations)]


def report_dropped(dropped: Sequence[dict[str, Any]], metrics: ControlMetrics) -> None:
    """Log (one structured line each) and count the manual trigger requests the control
    step dropped (`ControlStep.take_dropped`): `edgeloop train trigger` only appends a
    request, so this is where an operator learns why nothing fired. A batch replayed after
    a crash reports its drops again (the counter counts applications, not requests)."""
    for item in dropped:
        log.warning("manual trigger request dropped", extra=item)
        metrics.requests_dropped.labels(item["reason"]).inc()


class ControlAgents:
    """The batch bodies of the control agents."""

    def __init__(self, ctx: Context, settings: ControlSettings, table: Any) -> None:
        self.ctx = ctx
        self.s = settings
        self.table = table
        self.step = ControlStep(settings)
        self.metrics = ControlMetrics(ctx.metrics.registry)
        self.log_topic = control_log(ctx.settings.app_id)
        self._state: ControlState | None = None
        self.ready = asyncio.Event()  # set once the output schemas are registered

    async def register_outputs(self, book: SchemaBook) -> None:
        """Register the output schemas (once, at start)."""
        for topic, name in OUTPUT_SCHEMAS.items():
            await self.ctx.retry("registry", book.register_output, topic, catalog.get(name))
        self.ready.set()

    def forget(self) -> None:
        """Partitions moved: the cached state may be stale (re-read from the table)."""
        self._state = None

    def observer(self) -> LogObserver:
        """A new batch's observer (the enrich stage's and the forwarder's)."""
        return LogObserver(self.log_topic, self.metrics)

    async def forward(self, batch: list[Raw]) -> None:
        """Source records -> observations on the control log, packed (`pack`). A record
        that does not decode is counted here and dead-lettered by its data-plane stage."""
        ctx = self.ctx
        book = ctx.book
        assert book is not None
        await ctx.learn(batch)
        observer = self.observer()
        for raw in batch:
            try:
                schema, rec = book.decode(raw.value)
            except DecodeError as exc:
                self.metrics.skipped.labels("control-forward", exc.reason).inc()
                continue
            observer.add(schema.name, rec, raw)
        await ctx.produce(observer.records())

    async def tick(self) -> None:
        """Append a clock tick (never raises: an exception in a Faust timer stops the app)."""
        if not self.ctx.ready.is_set():
            return
        try:
            # Service time over one window: the controller judges the latency SLO per window.
            teacher = self.ctx.teacher_rate.measure(
                time.monotonic(), service_span_s=self.s.signals.window_s
            )
            obs = tick(now_us(), behind=self.offload_behind(), worker=WORKER_ID, teacher=teacher)
            await self.ctx.produce([Out(self.log_topic, LOG_KEY, encode(obs))])
        except Exception:
            log.warning("control tick not appended", exc_info=True)

    def offload_behind(self) -> int | None:
        """The offload backlog this worker holds: messages behind on its
        `edge.offload.v1` partitions; None when it runs no verdict stage. The control step
        turns it into seconds at the capacity in force (an operator's override included).
        Each worker sees only its partitions: the FLEET window keeps the largest tick's
        value, a lower bound of the fleet's backlog."""
        if not self.ctx.settings.verdicts:
            return None
        consumer = self.ctx.app.consumer
        behind = 0
        for tp in consumer.assignment():
            if tp.topic != OFFLOAD:
                continue
            high = consumer.highwater(tp)
            read = consumer._read_offset.get(tp)  # faust: no public read position
            if high is not None:
                behind += max(high - (read + 1 if read is not None else 0), 0)
        return behind

    def _load(self) -> ControlState:
        if self._state is None:
            raw = self.table.get(STATE_KEY)
            self._state = ControlState() if raw is None else ControlState.from_json(load_state(raw))
        return self._state

    async def control(self, batch: list[Raw]) -> None:
        """Control-log records -> signals, threshold updates, triggers; then the state."""
        ctx = self.ctx
        await self.ready.wait()
        book = ctx.book
        assert book is not None
        state = self._load()
        produced: list[Output] = []
        for raw in batch:
            try:
                outputs, malformed = self.step.apply_record(decode(raw.value), raw.offset, state)
                produced.extend(outputs)
                if malformed:
                    self.metrics.skipped.labels("control", "malformed").inc(malformed)
            except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
                # Our own log's record is malformed (a bug): counted, logged, skipped.
                log.exception(
                    "control record skipped", extra={"offset": raw.offset, "error": repr(exc)}
                )
                self.metrics.skipped.labels("control", "malformed").inc()
        report_dropped(self.step.take_dropped(), self.metrics)
        outs = [Out(topic, key.encode(), book.encode(topic, rec)) for topic, key, rec in produced]
        await ctx.produce(outs)
        # Only after Kafka acknowledged the outputs: a crash before this line replays the
        # batch from the previous state and yields the same records (same ids, versions).
        try:
            value = dump_state(state.to_json())
            while len(value) > STATE_MAX_BYTES and state.pending:
                # The pending requests are the part of the state that may be forgotten
                # (a verdict whose request was forgotten only adds no weight): the oldest
                # half goes, counted as forgotten, until the state fits.
                drop = max(1, len(state.pending) // 2)
                for request in list(state.pending)[:drop]:
                    del state.pending[request]
                state.pending_forgotten += drop
                value = dump_state(state.to_json())
            if len(value) > STATE_MAX_BYTES:
                # Faust's producer refuses a record over 1,000,000 bytes by crashing the
                # worker (data plane included). Not writing is the smaller harm, but while
                # the state stays this large the changelog does not move: a restart then
                # resumes from the last state written and the records applied since are
                # lost to the state (docs/architecture.md, "Table `control`").
                self.metrics.state_too_large.inc()
                log.error(
                    "control state too large for its changelog; not written",
                    extra={"bytes": len(value), "limit": STATE_MAX_BYTES,
                           "pending": len(state.pending), "devices": len(state.devices)},
                )  # fmt: skip
            else:
                self.table[STATE_KEY] = value
        except Exception:
            # Faust's changelog send can fail during a rebalance (app.py `_write_back`); the
            # next batch writes the state again.
            log.warning("control state write failed; written with the next batch", exc_info=True)
        self.metrics.observe(produced, state)


def register(app: Any, ctx: Context, settings: ControlSettings, agent: Any) -> ControlAgents:
    """Add the control agents to `app` (called by `make_app`).

    Args:
        app: the Faust app.
        ctx: the worker's context.
        settings: the control plane's settings.
        agent: `make_app`'s agent registrar (source, stage, body, take).

    Returns:
        The `ControlAgents`.
    """
    s = ctx.settings
    # use_partitioner: the state is written after a `take_events` batch, outside Faust's
    # current-event context (without it the write raises "Cannot modify table key from
    # outside of stream iteration" and the changelog never gets the state).
    table = app.Table(
        "control", default=None, key_type=bytes, value_type=bytes, partitions=1,
        use_partitioner=True,
        help="the control plane's state (signals windows, controller, triggers)",
    )  # fmt: skip
    control = ControlAgents(ctx, settings, table)
    log_topic = app.topic(
        control.log_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
        value_serializer="raw", partitions=1, internal=True,
    )  # fmt: skip
    take = (settings.wiring.batch_max, settings.wiring.batch_within_s)
    sources = app.topic(
        *SOURCES, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    agent(sources, "control-forward", control.forward, (s.batch_max, s.batch_within_s))
    agent(log_topic, "control", control.control, take)
    app.timer(settings.wiring.tick_s)(control.tick)

    async def start() -> None:
        await ctx.ready.wait()
        assert ctx.book is not None
        await control.register_outputs(ctx.book)

    async def partitions_moved(*_: Any, **__: Any) -> None:
        control.forget()

    # The stall watchdog (Context.update_lag) for the topics only the control plane reads.
    watched = frozenset({"cloud.verdicts.v1", "ml.hard-examples.v1", control.log_topic})

    async def watch() -> None:
        await ctx.watch_lag(watched)

    app.task(start)
    app.timer(5.0)(watch)
    app.on_partitions_revoked.connect(partitions_moved)
    app.on_partitions_assigned.connect(partitions_moved)
    return control
