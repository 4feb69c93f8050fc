"""One device: source → frame queue → inference thread → outbox → MQTT; downlink back.

`EdgeDaemon.run()` is a service (runs until cancelled, owns its resources). Tasks in one
TaskGroup: the source pump, the inference loop, the uplink (publish + downlink receive),
the model updater, the status ticker, and with `exit_when_drained` a watcher that ends
the run once every event has been acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import random
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.artifacts.signing import load_public_key
from edgeloop.core.errors import ConfigError, DecodeError, EdgeloopError
from edgeloop.core.logs import get_logger
from edgeloop.edge.control import ThresholdGate, VerdictCounter
from edgeloop.edge.inference import InferenceWorker, LoadedModel, SessionConfig, now_us
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.outbox import Appended, Outbox, OutboxStorageError
from edgeloop.edge.pipeline import PendingVerdicts, Pipeline, Preprocessor
from edgeloop.edge.policy import KIND_OF_NAME, ByteBudget, OffloadPolicy
from edgeloop.edge.settings import EdgeSettings
from edgeloop.edge.slots import ModelSlots
from edgeloop.edge.source import FrameQueue, FrameSource
from edgeloop.edge.state import AppliedThreshold, DeviceState, StateFile
from edgeloop.edge.updater import ModelUpdater
from edgeloop.edge.uplink import Impairment, LinkConfig, MqttUplink
from edgeloop.schemas import catalog
from edgeloop.schemas.events import DeviceState as DeviceStateName
from edgeloop.schemas.events import DeviceStatus
from edgeloop.schemas.framing import SingleObjectCodec
from edgeloop.schemas.topics import DownlinkKind, UplinkKind

log = get_logger(__name__)
CHECKPOINT_INTERVAL_S = 2.0
STATUS = catalog.get("DeviceStatus")
DOWNLINK_SCHEMAS = {
    DownlinkKind.THRESHOLD: catalog.get("ThresholdUpdate"),
    DownlinkKind.MODEL: catalog.get("ModelRelease"),
    DownlinkKind.VERDICT: catalog.get("CloudVerdict"),
}


class _DrainedError(Exception):
    """Ends the task group once the run's work is done (exit_when_drained)."""


class UndeliveredError(EdgeloopError):
    """exit_when_drained: the outbox emptied, but not every event was delivered (some
    were quarantined after a permanent PUBACK refusal)."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: ssl.SSLContext | None


def _noop() -> None:
    return None


@contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """One daemon per state dir: two would hand out the same seqs. The kernel drops the
    lock when the process dies, so a kill -9 never leaves it stale."""
    with (state_dir / ".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another edge daemon is running with state dir {state_dir}"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def device_tls(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass
class DaemonStats:
    started: float = field(default_factory=time.monotonic)
    frames: int = 0
    source_done: bool = False


class EdgeDaemon:
    def __init__(
        self,
        settings: EdgeSettings,
        endpoint: Endpoint,
        source: FrameSource,
        task: Preprocessor,
        *,
        metrics: EdgeMetrics | None = None,
        executor: Executor | None = None,
        impairment: Impairment | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.source = source
        self.metrics = metrics or EdgeMetrics()
        # The simulator shares one inference thread among its devices; alone, we own one.
        # It must be single-threaded: frames of one device are processed in order, and
        # shutdown relies on its FIFO order (see `run`).
        self._own_worker: InferenceWorker | None = None
        if executor is None:
            self._own_worker = InferenceWorker()
            executor = self._own_worker.executor
        self.executor: Executor = executor
        self.impairment = impairment or Impairment()
        self.task = task
        self.rng = rng or random.Random()  # noqa: S311 - jitter and audit draws, not secrets
        self.name = f"edge-{settings.device_id}"
        self.stats = DaemonStats()
        self.codec = SingleObjectCodec([STATUS, *DOWNLINK_SCHEMAS.values()])
        self.pipeline: Pipeline | None = None
        self.uplink: MqttUplink | None = None
        self.updater: ModelUpdater | None = None
        self.state: StateFile | None = None
        self.outbox: Outbox | None = None
        self.verdicts: VerdictCounter | None = None
        self.thresholds: ThresholdGate | None = None
        self.ready = asyncio.Event()
        self.queue: FrameQueue | None = None
        self._produced = 0  # InferenceEvents in the device's lifetime (persisted count)
        self._quarantined_at_boot = 0
        self._finished = False  # no more frames will be processed in this run
        self._stop_taking = asyncio.Event()  # drain(): take no more frames from the source

    async def run(self) -> None:
        s = self.settings
        if s.pubkey is None:
            raise ConfigError("no release public key: pass --pubkey (keys/release.pub)")
        public_key = load_public_key(s.pubkey)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(s.state_dir):
            default = DeviceState(
                AppliedThreshold(0, s.tau, KIND_OF_NAME[s.confidence], s.audit_rate, "UNKNOWN")
            )
            self.state = state = StateFile(s.state_dir / "state.json", default)
            self.outbox = outbox = Outbox(
                s.state_dir / "outbox.db",
                capacity=s.outbox_capacity,
                policy=s.outbox_policy,
                sync=s.outbox_sync,
                quarantine_capacity=s.quarantine_capacity,
                max_bytes=s.outbox_max_bytes,
                reserve_bytes=s.outbox_reserve_bytes,
            )
            try:
                await self._run(state, outbox, public_key)
            finally:
                # A frame already on the inference thread must finish its append before
                # the outbox closes. The executor runs one job at a time, in order, so an
                # empty job queued now completes after it.
                done = asyncio.get_running_loop().run_in_executor(self.executor, _noop)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(done)
                outbox.close()
                if self._own_worker is not None:
                    self._own_worker.close()

    async def _run(self, state: StateFile, outbox: Outbox, public_key: Ed25519PublicKey) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        example = self.task.preprocess(np.zeros((1, *self.task.input_shape[1:]), np.float32))
        pending = PendingVerdicts(s.pending_verdicts)
        self.updater = updater = ModelUpdater(
            device_id=s.device_id,
            cohort=s.cohort,
            slots=ModelSlots(s.state_dir / "models"),
            public_key=public_key,
            target=s.target,
            session=SessionConfig(s.intra_op_threads, s.inter_op_threads),
            example=example,
            executor=self.executor,
            state=state,
            metrics=self.metrics,
            on_swap=self._swap_model,
            download_timeout_s=s.download_timeout_s,
        )
        model = await loop.run_in_executor(self.executor, updater.boot, s.initial_model)
        th = state.current.threshold
        self.metrics.applied_version.labels(s.device_id, s.cohort, "threshold").set(th.version)
        policy = OffloadPolicy(
            ByteBudget(s.offload_bytes_per_s, s.offload_burst_bytes, time.monotonic()), self.rng
        )
        self.pipeline = pipeline = Pipeline(
            device_id=s.device_id,
            cohort=s.cohort,
            task=self.task,
            model=model,
            threshold=th,
            policy=policy,
            outbox=outbox,
            codec=SingleObjectCodec(),
            metrics=self.metrics,
            pending=pending,
        )
        self.thresholds = ThresholdGate(
            device_id=s.device_id,
            cohort=s.cohort,
            state=state,
            metrics=self.metrics,
            on_apply=self._apply_threshold,
        )
        self.verdicts = VerdictCounter(s.device_id, pending, self.metrics)
        self.uplink = uplink = MqttUplink(
            LinkConfig(
                device_id=s.device_id,
                host=self.endpoint.host,
                port=self.endpoint.port,
                tls=self.endpoint.tls,
                window=s.publish_window,
                keepalive_s=s.keepalive_s,
                reconnect_min_s=s.reconnect_min_s,
                reconnect_max_s=s.reconnect_max_s,
                session_expiry_s=s.session_expiry_s,
                connect_timeout_s=s.connect_timeout_s,
            ),
            outbox,
            on_downlink=self._downlink,
            will=lambda: self._status_bytes("OFFLINE", outbox.reserve_seq()),
            metrics=self.metrics,
            impairment=self.impairment,
            rng=self.rng,
        )
        self._produced = outbox.counter("inference")
        self._quarantined_at_boot = outbox.quarantined
        queue = FrameQueue(s.frame_queue, self.metrics.frames_dropped.labels(s.device_id).inc)
        self.queue = queue
        self._append_status("ONLINE")
        log.info(
            "edge daemon up",
            extra={"device": s.device_id, "model_version": model.version,
                   "threshold_version": th.version, "outbox_depth": outbox.depth},
        )  # fmt: skip
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(queue), name=f"{self.name}-source")
                tg.create_task(self._infer(queue, pipeline, uplink), name=f"{self.name}-infer")
                tg.create_task(uplink.run(), name=uplink.name)
                tg.create_task(updater.run(), name=updater.name)
                tg.create_task(self._status_ticker(), name=f"{self.name}-status")
                tg.create_task(self._checkpointer(outbox), name=f"{self.name}-checkpoint")
                if s.exit_when_drained:
                    tg.create_task(self._watch_drained(), name=f"{self.name}-drained")
        except* _DrainedError:
            quarantined = outbox.quarantined - self._quarantined_at_boot
            if quarantined:
                raise UndeliveredError(
                    f"outbox drained, but {quarantined} event(s) were refused by the broker "
                    f"for good and quarantined (table quarantine in {outbox.path})"
                ) from None
            log.info("all events delivered; exiting", extra={"device": s.device_id})

    def _swap_model(self, model: LoadedModel) -> None:
        if self.pipeline is not None:
            self.pipeline.model = model

    def _apply_threshold(self, th: AppliedThreshold) -> None:
        if self.pipeline is not None:
            self.pipeline.threshold = th

    def _done_producing(self) -> bool:
        limit = self.settings.max_events
        return limit is not None and self._produced >= limit

    @property
    def produced(self) -> int:
        """InferenceEvents this device produced in its lifetime (the outbox's count)."""
        return self._produced

    async def drain(self) -> None:
        """Take no more frames, finish the ones taken, and deliver the outbox.

        Returns once every event is acknowledged by the broker (the runner calls it on
        SIGINT/SIGTERM and bounds it by its shutdown deadline; whatever is not delivered
        by then stays in the outbox on disk for the next start). A daemon that never got
        as far as its outbox has nothing to deliver.
        """
        self._stop_taking.set()
        if self.outbox is None:
            return
        outbox = self.outbox
        while not (self._finished and outbox.depth == 0):  # noqa: ASYNC110 - as _watch_drained
            await asyncio.sleep(0.1)

    async def _pump(self, queue: FrameQueue) -> None:
        try:
            async for frame in self.source.frames():
                if self._stop_taking.is_set():
                    break
                queue.put(frame)
        finally:
            self.stats.source_done = True
            queue.close()

    async def _infer(self, queue: FrameQueue, pipeline: Pipeline, uplink: MqttUplink) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        lost = self.metrics.outbox_lost.labels(s.device_id, s.outbox_policy)
        unstored_inference = self.metrics.outbox_unstored.labels(s.device_id, "inference")
        unstored_offload = self.metrics.outbox_unstored.labels(s.device_id, "offload")
        failed = self.metrics.frames_failed
        while not self._done_producing():
            frame = await queue.get()
            if frame is None:
                break
            try:
                outcome = await loop.run_in_executor(self.executor, pipeline.process, frame)
            except (ValueError, EdgeloopError) as exc:
                # A frame the task or the codec cannot take (wrong shape, NaN scores):
                # counted and logged; the daemon keeps serving the next frames.
                failed.labels(s.device_id, type(exc).__name__).inc()
                log.warning("frame failed", extra={"device": s.device_id, "error": str(exc)[:300]})
                continue
            self.stats.frames += 1
            self._produced += 1
            if outcome.unstored:
                # The inference event is the first append of a frame; any other is its offload.
                lost_inference = 0 if outcome.stored else 1
                unstored_inference.inc(lost_inference)
                unstored_offload.inc(outcome.unstored - lost_inference)
            else:
                lost.inc((0 if outcome.stored else 1) + outcome.evicted)
            self._note_storage()
            uplink.notify()
        # Every frame taken has its events in the outbox: only the uplink has work left.
        self._finished = True

    async def _watch_drained(self) -> None:
        assert self.outbox is not None
        outbox = self.outbox
        # Depth changes on the inference thread and on PUBACKs; a 100 ms poll is simpler
        # than an event wired through both, and this only runs in batch and test runs.
        while not (self._finished and outbox.depth == 0):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        raise _DrainedError

    async def _checkpointer(self, outbox: Outbox) -> None:
        # Keeps the WAL short (and the disk bounded) whether or not the link is up.
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            try:
                await asyncio.to_thread(outbox.checkpoint)
            except OutboxStorageError as exc:
                log.warning(
                    "checkpoint failed",
                    extra={"device": self.settings.device_id, "error": str(exc)},
                )
            self._note_storage()

    def _note_storage(self) -> None:
        """Mirror the outbox's storage state in the metric (1 while DEGRADED)."""
        assert self.outbox is not None
        degraded = self.outbox.storage_error is not None
        self.metrics.storage_degraded.labels(self.settings.device_id).set(1 if degraded else 0)

    async def _status_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_interval_s)
            # SQLite commit: off the loop thread (an fsync with outbox_sync=FULL).
            done = await asyncio.to_thread(self._append_status, "ONLINE")
            self._note_storage()
            if done.error is not None and self.uplink is not None:
                await self._status_past_the_outbox(self.uplink, done.error)
            if self.uplink is not None:
                self.uplink.notify()

    async def _status_past_the_outbox(self, uplink: MqttUplink, cause: str) -> None:
        """The disk refused the status row: publish it directly, so the cloud learns that
        this device is DEGRADED while it is (a status is a snapshot; the next one
        supersedes it, so it is not kept for later)."""
        assert self.outbox is not None
        try:
            seq = await asyncio.to_thread(self.outbox.reserve_seq)
        except OutboxStorageError:
            return  # not even a seq can be stored: the next tick tries again
        # The cause as the failed write saw it: by now the uplink may have freed space.
        record = self.status_record("DEGRADED", seq)
        record["storage_error"] = cause
        record["last_error"] = f"outbox: {cause}"
        payload = self.codec.encode(STATUS, dict(record))
        if not await uplink.publish_now(UplinkKind.STATUS, payload):
            log.info("DEGRADED status not delivered", extra={"device": self.settings.device_id})

    def _append_status(self, state: DeviceStateName) -> Appended:
        assert self.outbox is not None
        return self.outbox.append(
            UplinkKind.STATUS.value,
            lambda seq: self._status_bytes(state, seq),
            created_us=now_us(),
        )

    def status_record(self, state: DeviceStateName, seq: int) -> DeviceStatus:
        s = self.settings
        assert self.outbox is not None
        assert self.state is not None
        applied = self.state.current
        uplink = self.uplink
        storage_error = self.outbox.storage_error
        if storage_error is not None and state == "ONLINE":
            state = "DEGRADED"  # deciding locally, but events are not being stored
        last_error = applied.last_refusal or (uplink.last_error if uplink else None)
        if storage_error is not None:
            last_error = f"outbox: {storage_error}"
        return {
            "event_id": f"{s.device_id}:{seq}",
            "device_id": s.device_id,
            "seq": seq,
            "ts": now_us(),
            "state": state,
            "cohort": s.cohort,
            "model_version": applied.model_version,
            "threshold_version": applied.threshold.version,
            "outbox_depth": self.outbox.depth,
            "outbox_capacity": self.outbox.capacity,
            "outbox_policy": "DROP_OLDEST" if s.outbox_policy == "drop_oldest" else "REJECT_NEW",
            "outbox_dropped": self.outbox.dropped + self.outbox.rejected,
            # Since this boot: a frame nobody saw is not worth a disk write per drop.
            "frames_dropped": self.queue.dropped if self.queue is not None else 0,
            "uptime_s": time.monotonic() - self.stats.started,
            "rtt_ms": uplink.rtt_ms if uplink is not None else None,
            "uplink_bytes_per_s": uplink.throughput.sample() if uplink is not None else None,
            "last_error": last_error,
            "outbox_quarantined": self.outbox.quarantined,
            "outbox_unstored": self.outbox.unstored,
            "storage_error": storage_error,
            # Declared, not measured: the controller limits offloads by it (a measured
            # rate depends on tau itself; docs/architecture.md, the controller's item 6).
            "uplink_capacity_bytes_per_s": s.uplink_capacity_bytes_per_s,
        }

    def _status_bytes(self, state: DeviceStateName, seq: int) -> bytes:
        return self.codec.encode(STATUS, dict(self.status_record(state, seq)))

    async def _downlink(self, kind: DownlinkKind, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            schema, record = self.codec.decode(payload)
        except DecodeError as exc:
            self.metrics.updates.labels(self.settings.device_id, kind.value, "undecodable").inc()
            log.warning(
                "undecodable downlink message", extra={"kind": kind.value, "error": str(exc)}
            )
            return
        if schema is not DOWNLINK_SCHEMAS[kind]:
            self.metrics.updates.labels(self.settings.device_id, kind.value, "wrong_schema").inc()
            return
        if kind is DownlinkKind.THRESHOLD:
            assert self.thresholds is not None
            # Off the loop: applying persists the version (fsync) before it takes effect.
            await asyncio.to_thread(self.thresholds.handle, record)  # type: ignore[arg-type]
        elif kind is DownlinkKind.MODEL:
            assert self.updater is not None
            self.updater.submit(record)  # type: ignore[arg-type]
        else:
            assert self.verdicts is not None
            self.verdicts.handle(record)  # type: ignore[arg-type]
