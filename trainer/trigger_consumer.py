"""The trigger consumer (`edgeloop train serve`): TrainingTrigger -> retrain -> ModelRelease.

For each `TrainingTrigger` on `ml.training-triggers.v1`, in order:

1. decode it (Confluent framing, writer schema from the registry); skip it with a log
   line when the ledger says its `trigger_id` was handled already;
2. check it: known model, path-safe trigger id, non-empty, non-overlapping ranges within
   the size limit. A bad trigger becomes a `DeadLetter` on `ml.training-triggers.dlq.v1`
   with a reason tag (unknown_model, empty_range, range_unavailable, ...), and the
   consumer goes on with the next one;
3. read exactly the named offset ranges of the hard-example topic (`RangeReader`);
4. write `started` to the ledger, then retrain in a child process (`retrain_job`; the base
   training set is replayed there), with a timeout; a cancelled consumer stops the run;
5. publish the outcome to `ml.model-releases.v1` (key = cohort): a CANARY release to the
   canary cohort, or a REFUSED event with the gate's reasons; wait for Kafka's ack;
6. write `done` to the ledger, then commit the trigger's offset.

At most once: the ledger (trigger_ledger.py) is the source of truth, the committed offset
only saves re-reading. A redelivered trigger (lost commit, a producer's retry, a restart)
finds its id and is skipped. A run interrupted between 4 and 6 is not trained again: the
restart publishes the release if the store holds the run's artifact (the same event id, so
consumers drop the duplicate) and dead-letters the trigger as `interrupted` otherwise.

Partitions are assigned manually (all partitions of the trigger topic), with the group id
used only for committed offsets: a retrain may take hours, and a group member that does
not poll for `max.poll.interval.ms` is evicted and its partitions handed over mid-run.
One `train serve` process per trigger topic and trainer home is the deployment unit (it
trains with every GPU of its node through torchrun).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from edgeloop.artifacts.manifest import MANIFEST_NAME, Manifest
from edgeloop.artifacts.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
from edgeloop.core.errors import ConfigError, DecodeError, EdgeloopError
from edgeloop.core.logs import get_logger
from edgeloop.core.metrics import serve_metrics
from edgeloop.core.retry import Backoff, retry
from edgeloop.core.settings import KafkaSettings
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import dlq_topic
from edgeloop.tasks.digits import get_task
from edgeloop.trainer.hard_example_source import (
    OffsetRange,
    RangeReader,
    TriggerRejectedError,
    check_ranges,
    to_example_set,
)
from edgeloop.trainer.hard_examples import HardExampleSet
from edgeloop.trainer.home import TrainerHome
from edgeloop.trainer.release_events import (
    EventPublisher,
    ReleaseFacts,
    artifact_location,
    dead_letter_record,
    release_record,
)
from edgeloop.trainer.retrain_job import RetrainJob, TrainingFailedError, log_tail, run_child
from edgeloop.trainer.serve_metrics import TrainerMetrics
from edgeloop.trainer.serve_settings import TrainerServeSettings
from edgeloop.trainer.trigger_ledger import TriggerLedger

log = get_logger(__name__)

TRAINING_TRIGGER = "edgeloop.v1.TrainingTrigger"
# Trigger ids name run folders: letters, digits, '.', '_', '-' only (UUIDs fit).
# Kafka or the registry away: wait from 0.5 s up to 30 s between tries of one trigger.
_BACKOFF = Backoff(initial_s=0.5, max_s=30.0)
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def serve_topics(settings: TrainerServeSettings) -> set[str]:
    """The topics `train serve` reads or writes: its triggers, their dead letters and the
    releases. `edgeloop train serve` refuses to start before they exist: the first release
    or dead letter would otherwise have the broker auto-create its topic with the broker's
    defaults (the releases topic not compacted). The hard-example topic a trigger names
    is not among them: its partitions are looked up in the metadata of all topics (which
    creates none), and a trigger naming a missing one is dead-lettered."""
    return {settings.triggers_topic, dlq_topic(settings.triggers_topic), settings.releases_topic}


class TriggerConsumer:
    name = "trainer-trigger-consumer"

    def __init__(
        self,
        settings: TrainerServeSettings,
        kafka: KafkaSettings,
        registry: RegistryClient,
        *,
        home: TrainerHome,
        keys_dir: Path,
        metrics: TrainerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.registry = registry
        self.home = home
        self.keys_dir = keys_dir
        self.metrics = metrics or TrainerMetrics()
        self.ledger = TriggerLedger(
            home.root / "triggers" / "ledger.json", settings.ledger_max_entries
        )
        self._codec = ConfluentCodec()
        self._task = get_task("digits")
        self.ready = asyncio.Event()  # set once partitions are assigned and positioned

    # ---- the service -------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            if s.metrics_port is not None:
                await stack.enter_async_context(
                    serve_metrics(self.metrics.registry, port=s.metrics_port)
                )
            producer = AIOKafkaProducer(
                bootstrap_servers=self.kafka.bootstrap,
                acks="all",
                enable_idempotence=self.kafka.idempotence,
                request_timeout_ms=15_000,
                client_id=f"{s.client_id}-producer",
            )
            # stop() before start() finished is safe, and closes what a failed start opened.
            stack.push_async_callback(producer.stop)
            await producer.start()
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.kafka.bootstrap,
                group_id=s.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                client_id=f"{s.client_id}-triggers",
            )
            stack.push_async_callback(consumer.stop)
            await consumer.start()
            await self._assign(consumer)
            publisher = EventPublisher(producer, self.registry)
            self.ready.set()
            while True:
                # One trigger at a time: each is a long job, and Kafka (not memory) is the
                # queue of the ones waiting.
                batches = await consumer.getmany(timeout_ms=1000, max_records=1)
                for tp, msgs in batches.items():
                    for msg in msgs:
                        await self._handle_retrying(publisher, msg)
                        await self._commit(consumer, tp, msg.offset + 1)

    async def _assign(self, consumer: AIOKafkaConsumer) -> None:
        topic = self.settings.triggers_topic
        cluster = await consumer._client.fetch_all_metadata()  # aiokafka: no public refresh
        parts = cluster.partitions_for_topic(topic)
        if not parts:
            raise ConfigError(
                f"trigger topic {topic} does not exist on {self.kafka.bootstrap}; "
                "create it with `edgeloop topics create`"
            )
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        log.info(
            "trigger consumer assigned",
            extra={"topic": topic, "partitions": len(parts), "ledger": len(self.ledger)},
        )

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        try:
            await consumer.commit({tp: offset})
        except KafkaError as exc:
            # Safe to go on: the ledger already holds the trigger, so a redelivery after a
            # lost commit is skipped; the commit only saves re-reading it.
            log.warning(
                "trigger offset commit failed",
                extra={"partition": tp.partition, "offset": offset, "error": repr(exc)},
            )

    # ---- one trigger -------------------------------------------------------------

    async def _handle_retrying(
        self, publisher: EventPublisher, msg: ConsumerRecord[Any, Any]
    ) -> None:
        """Handle `msg`, waiting out outages of Kafka or the registry (never skipping it).

        A retry after training started finds the trigger `started` in the ledger and
        finishes it from the store instead of training again.
        """

        def on_retry(exc: BaseException, _attempt: int, delay: float) -> None:
            self.metrics.retries.inc()
            log.warning(
                "kafka or registry unavailable; retrying the trigger",
                extra={"offset": msg.offset, "error": repr(exc), "delay_s": round(delay, 3)},
            )

        # The shared policy (core/retry.py) decides what is transient; a permanent failure
        # propagates (the trigger's own bad input was dead-lettered inside _handle).
        await retry(lambda: self._handle(publisher, msg), _BACKOFF, on_retry=on_retry)

    async def _handle(self, publisher: EventPublisher, msg: ConsumerRecord[Any, Any]) -> None:
        source = f"kafka:{msg.topic}/{msg.partition}@{msg.offset}"
        raw: bytes = msg.value or b""
        trigger_id: str | None = None
        try:
            trigger = await self._decode(raw)
            trigger_id = str(trigger["trigger_id"])
            entry = self.ledger.get(trigger_id)
            if entry is not None and entry.state == "done":
                self.metrics.triggers.labels("skipped").inc()
                log.info(
                    "trigger already handled; skipped",
                    extra={"trigger_id": trigger_id, "outcome": entry.outcome, "source": source},
                )
                return
            if entry is not None:  # started, never finished: the run was interrupted
                await self._finish_interrupted(publisher, trigger, source, raw)
                return
            await self._train_and_release(publisher, trigger, source)
        except (TriggerRejectedError, DecodeError, TrainingFailedError) as exc:
            await self._dead_letter(
                publisher,
                reason=exc.reason,
                detail=str(exc),
                source=source,
                raw=raw,
                trigger_id=trigger_id,
            )

    async def _decode(self, raw: bytes) -> dict[str, Any]:
        schema_id = self._codec.schema_id(raw)
        if not self._codec.knows(schema_id):
            try:
                text = await self.registry.schema(schema_id)
            except EdgeloopError as exc:
                if exc.retriable:
                    raise  # registry down: the caller waits and retries this trigger
                raise DecodeError(
                    f"schema id {schema_id} unknown to the registry: {exc}",
                    reason="unknown_schema_id",
                ) from exc
            self._codec.add(schema_id, EventSchema.from_text(text))
        _, schema, record = self._codec.decode(raw)
        if schema.name != TRAINING_TRIGGER:
            raise DecodeError(
                f"trigger topic carries {schema.name}, expected {TRAINING_TRIGGER}",
                reason="wrong_schema",
                schema=schema.name,
            )
        return record

    def _check(self, trigger: dict[str, Any]) -> list[OffsetRange]:
        trigger_id = str(trigger["trigger_id"])
        if not _SAFE_ID.fullmatch(trigger_id):
            raise TriggerRejectedError(
                f"trigger_id {trigger_id!r} must be 1-128 of [A-Za-z0-9._-] (it names a run "
                "folder)",
                reason="bad_trigger_id",
            )
        if trigger["model_name"] not in self.settings.models:
            raise TriggerRejectedError(
                f"trigger {trigger_id}: unknown model {trigger['model_name']!r}; this trainer "
                f"retrains {', '.join(self.settings.models)}",
                reason="unknown_model",
            )
        ranges = [OffsetRange.from_record(r) for r in trigger["ranges"]]
        check_ranges(ranges, max_examples=self.settings.max_hard_examples)
        return ranges

    async def _train_and_release(
        self, publisher: EventPublisher, trigger: dict[str, Any], source: str
    ) -> None:
        trigger_id = str(trigger["trigger_id"])
        # A rejection raises from here and is recorded once its dead letter is acknowledged.
        ranges = self._check(trigger)
        examples = await self._read(ranges)
        run = self.home.run_dir(f"trigger-{trigger_id}")
        await asyncio.to_thread(run.mkdir, parents=True, exist_ok=True)
        hard_path = run / "hard-examples.npz"
        await asyncio.to_thread(examples.save, hard_path)
        lineage_ranges = {r.lineage_key(): [r.start, r.end - 1] for r in ranges}
        if len(examples) != trigger["hard_example_count"]:
            log.warning(
                "trigger's hard_example_count differs from the records in its ranges",
                extra={
                    "trigger_id": trigger_id,
                    "claimed": trigger["hard_example_count"],
                    "read": len(examples),
                },
            )
        await asyncio.to_thread(
            self.ledger.start, trigger_id, source=source, hard_examples=len(examples)
        )
        log.info(
            "retrain starting",
            extra={"trigger_id": trigger_id, "hard_examples": len(examples), "source": source},
        )
        self.metrics.hard_examples.inc(len(examples))
        report = await self._retrain(run, hard_path, trigger_id, lineage_ranges)
        facts = self._facts(trigger, report, len(examples), lineage_ranges)
        await self._publish_release(publisher, facts)

    async def _read(self, ranges: list[OffsetRange]) -> HardExampleSet:
        reader = RangeReader(
            self.kafka.bootstrap,
            self._resolve,
            client_id=f"{self.settings.client_id}-ranges",
            codec=self._codec,
            timeout_s=self.settings.range_read_timeout_s,
        )
        records = await reader.read(ranges)
        task = self._task
        return await asyncio.to_thread(
            to_example_set,
            records,
            task.input_shape,
            task.num_classes,
            preprocess=task.preprocess,  # pixel-encoded inputs (U8, JPEG, PNG) need it
        )

    async def _resolve(self, schema_id: int) -> EventSchema:
        return EventSchema.from_text(await self.registry.schema(schema_id))

    async def _retrain(
        self, run: Path, hard_path: Path, trigger_id: str, ranges: dict[str, list[int]]
    ) -> dict[str, Any]:
        s = self.settings
        job = RetrainJob(
            home=str(self.home.root),
            private_key=str(self.keys_dir / PRIVATE_KEY_NAME),
            public_key=str(self.keys_dir / PUBLIC_KEY_NAME),
            request={
                "hard_examples": str(hard_path),
                "trigger_id": trigger_id,
                "offset_ranges": ranges,
                "seed": s.seed,
                "epochs": s.epochs,
                "lr": s.lr,
                "nproc": s.nproc,
                "threads": s.threads,
                "progress_path": str(run / "progress.json"),
            },
            policy={
                "max_clean_drop": s.gate_max_clean_drop,
                "min_drift_gain": s.gate_min_drift_gain,
                "max_p99_ms": s.gate_max_p99_ms,
            },
        )
        job_path, out_path, log_path = run / "job.json", run / "report.json", run / "job.log"
        await asyncio.to_thread(job.save, job_path)
        t0 = time.perf_counter()
        self.metrics.busy.set(1)
        self.metrics.trigger.labels(trigger_id).set(1)
        self.metrics.epochs.set(s.epochs)
        watcher = asyncio.create_task(self._watch_progress(run / "progress.json"))
        try:
            rc = await run_child(
                job_path,
                out_path,
                log_path,
                timeout_s=s.training_timeout_s,
                grace_s=s.training_kill_grace_s,
            )
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.metrics.busy.set(0)
            self.metrics.epoch.set(0)
            self.metrics.epochs.set(0)
            self.metrics.trigger.remove(trigger_id)
            self.metrics.training_seconds.observe(time.perf_counter() - t0)
        if rc != 0 or not out_path.exists():
            tail = await asyncio.to_thread(log_tail, log_path)
            raise TrainingFailedError(
                f"trigger {trigger_id}: retrain exited {rc}; see {log_path}:\n{tail}",
                reason="training_failed",
            )
        doc: dict[str, Any] = json.loads(await asyncio.to_thread(out_path.read_text))
        return doc

    async def _watch_progress(self, path: Path) -> None:
        """Mirror the training's epoch count (rank 0 rewrites `path` after each epoch) in
        the gauges, once a second, until cancelled."""
        while True:
            await asyncio.sleep(1.0)
            try:
                doc = json.loads(await asyncio.to_thread(path.read_text))
                self.metrics.epoch.set(int(doc["epoch"]))
                self.metrics.epochs.set(int(doc["epochs"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not written yet (or from a run that crashed): keep the last

    def _facts(
        self,
        trigger: dict[str, Any],
        report: dict[str, Any],
        hard_examples: int,
        ranges: dict[str, list[int]],
    ) -> ReleaseFacts:
        model = str(trigger["model_name"])
        parent = int(report["parent_version"])
        version = report["released_version"]
        shown = int(version) if version is not None else parent
        chosen = report["candidate"]["chosen"]
        scores = next(v for v in report["candidate"]["variants"] if v["mode"] == chosen)
        url, sha, target = self._artifact(model, shown)
        return ReleaseFacts(
            trigger_id=str(trigger["trigger_id"]),
            model_name=model,
            model_version=shown,
            parent_version=parent,
            artifact_url=url,
            manifest_sha256=sha,
            target=target,
            hard_examples=hard_examples,
            offset_ranges=ranges,
            scores={"candidate": scores["scores"], "serving": report["serving"]},
            refused=tuple(report["refused"]),
            training_run=report.get("run_dir"),
        )

    def _artifact(self, model: str, version: int) -> tuple[str, str, str]:
        return artifact_location(self.home, model, version, self.settings.artifact_base_url)

    async def _publish_release(self, publisher: EventPublisher, facts: ReleaseFacts) -> None:
        cohort = self.settings.canary_cohort
        await publisher.publish(
            self.settings.releases_topic,
            "ModelRelease",
            cohort,
            release_record(facts, cohort, self.settings.canary_share),
            [("trigger_id", facts.trigger_id.encode())],
        )
        stage = "CANARY" if facts.released else "REFUSED"
        self.metrics.release.labels(cohort, stage).set(facts.model_version)
        outcome = "released" if facts.released else "refused"
        await asyncio.to_thread(
            self.ledger.finish,
            facts.trigger_id,
            outcome,
            version=facts.model_version,
            hard_examples=facts.hard_examples,
        )
        self.metrics.triggers.labels(outcome).inc()
        log.info(
            "trigger handled",
            extra={
                "trigger_id": facts.trigger_id,
                "outcome": outcome,
                "version": facts.model_version,
                "hard_examples": facts.hard_examples,
                "refused": "; ".join(facts.refused),
            },
        )

    async def _finish_interrupted(
        self, publisher: EventPublisher, trigger: dict[str, Any], source: str, raw: bytes
    ) -> None:
        """A run started before a crash: never train again; finish from the store."""
        trigger_id = str(trigger["trigger_id"])
        model = str(trigger["model_name"])
        entry = self.ledger.get(trigger_id)
        hard_examples = int(entry.detail.get("hard_examples", 0)) if entry else 0
        for version in sorted(self.home.store.versions(model), reverse=True):
            folder = self.home.root / "store" / model / str(version)
            manifest = Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes())
            if manifest.lineage.trigger_id == trigger_id:
                log.warning(
                    "interrupted trigger had released; publishing its release again",
                    extra={"trigger_id": trigger_id, "version": version},
                )
                url, sha, target = self._artifact(model, version)
                facts = ReleaseFacts(
                    trigger_id=trigger_id,
                    model_name=model,
                    model_version=version,
                    parent_version=manifest.lineage.parent_version or version - 1,
                    artifact_url=url,
                    manifest_sha256=sha,
                    target=target,
                    hard_examples=hard_examples,
                    offset_ranges=manifest.lineage.offset_ranges,
                    scores={"candidate": manifest.lineage.holdout_scores},
                    refused=(),
                )
                await self._publish_release(publisher, facts)
                return
        await self._dead_letter(
            publisher,
            reason="interrupted",
            detail=f"trigger {trigger_id}: its retrain was interrupted (crash or shutdown) "
            "before a release; not retried (at most once): send a new trigger to retrain",
            source=source,
            raw=raw,
            trigger_id=trigger_id,
        )

    async def _dead_letter(
        self,
        publisher: EventPublisher,
        *,
        reason: str,
        detail: str,
        source: str,
        raw: bytes,
        trigger_id: str | None,
    ) -> None:
        s = self.settings
        record = dead_letter_record(
            reason=reason,
            detail=detail,
            source=source,
            payload=raw,
            cap=s.dlq_payload_bytes,
            client_id=s.client_id,
        )
        headers = [("reason", reason.encode())]
        if trigger_id is not None:
            headers.append(("trigger_id", trigger_id.encode()))
        await publisher.publish(
            dlq_topic(s.triggers_topic), "DeadLetter", trigger_id, record, headers
        )
        if trigger_id is not None:
            outcome = {"training_failed": "failed", "training_timeout": "failed"}.get(
                reason, "interrupted" if reason == "interrupted" else "rejected"
            )
            await asyncio.to_thread(self.ledger.finish, trigger_id, outcome, reason=reason)
            self.metrics.triggers.labels(outcome).inc()
        else:
            self.metrics.triggers.labels("rejected").inc()
        self.metrics.dead_letters.labels(reason).inc()
        log.warning(
            "trigger dead-lettered",
            extra={
                "reason": reason,
                "trigger_id": trigger_id,
                "source": source,
                "detail": detail[:300],
            },
        )
