"""The cloud teacher: a verified ONNX release and a micro-batcher in front of its session.

Loading follows the device's rules (`edge.updater`): fetch the release from the artifact
store, `verify_artifact` (Ed25519 signature over the manifest's exact bytes, the sha256 of
every file, no unsigned file, the target, the validity window, no rollback when a
`min_version` is given) and only then build the session. The shipped teacher is released
by `edgeloop models bootstrap` as `digits-teacher` for target `cloud-cpu`, fp32, with a
dynamic batch axis (`trainer.export`), which is what makes micro-batching possible.

`TeacherBatcher` turns one-sample requests into batched `session.run` calls: a request
waits at most `max_wait_s` for others to join, a batch holds at most `max_batch`. One
session, one inference thread: onnxruntime releases the GIL inside `run`, so the event
loop keeps fetching and decoding while a batch infers. The request queue is bounded
(`queue_size`); when it is full `infer` waits (backpressure reaches the Kafka consumer,
nothing is dropped).
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.artifacts.errors import ArtifactNotFoundError
from edgeloop.artifacts.manifest import Manifest
from edgeloop.artifacts.store import ArtifactStore
from edgeloop.artifacts.verify import verify_artifact
from edgeloop.core.errors import ConfigError, EdgeloopError
from edgeloop.tasks.inputs import InputDecodeError

# What `edgeloop models bootstrap` releases (trainer/release.py: TEACHER_MODEL and
# TEACHER_TARGET); repeated here because agents must not import the trainer.
TEACHER_NAME: Final = "digits-teacher"
TEACHER_TARGET: Final = "cloud-cpu"
MODEL_FILE: Final = "model.onnx"
# Per-sample latencies kept for `stats` (a ring: the app exports histograms, not these).
_RECENT: Final = 4096


class TeacherLoadError(EdgeloopError):
    """A verified teacher release could not be turned into a working session."""


class TeacherUnavailableError(EdgeloopError):
    """The batcher stopped (or a batch failed) before this request got its answer.

    Retriable: the same input is answered once the batcher runs again.
    """

    retriable = True


@dataclass(frozen=True)
class TeacherOutput:
    """The teacher's verdict on one sample: top label, its probability, all probabilities."""

    label: int
    confidence: float
    probs: npt.NDArray[np.float32]


def _session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Batches arrive in bursts; spinning threads would burn the cores the worker needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Row-wise softmax, shifted by the row max so large logits do not overflow."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: npt.NDArray[np.float32] = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


class TeacherModel:
    """One verified teacher release wrapped around one onnxruntime session.

    Immutable once built; a new release is a new object handed to `TeacherBatcher.swap`.
    """

    def __init__(self, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.manifest = manifest
        self.session = session
        self.name: str = manifest.model_name
        self.version: int = manifest.version
        inp = session.get_inputs()[0]
        self.input_name: str = inp.name
        self.output_name: str = session.get_outputs()[0].name
        dims = list(inp.shape)[1:]  # the first axis is the (dynamic) batch
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            raise TeacherLoadError(
                f"{self.name} v{self.version}: input {inp.name} has shape {inp.shape}; "
                "need a batch axis followed by fixed sizes"
            )
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in dims)

    def logits(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Raw scores (N, K) for a batch (N, *input_shape); blocking, releases the GIL."""
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)

    def predict(self, x: npt.NDArray[np.float32]) -> list[TeacherOutput]:
        """Verdicts for a batch (N, *input_shape), in order; blocking."""
        probs = softmax(self.logits(x))
        labels = probs.argmax(axis=1)
        return [
            TeacherOutput(label=int(lab), confidence=float(p[lab]), probs=p)
            for lab, p in zip(labels, probs, strict=True)
        ]


def teacher_store(location: str) -> ArtifactStore:
    """The artifact store at `location`: an http(s) URL or a directory path."""
    from edgeloop.artifacts.store import DirectoryStore, HttpArtifactStore

    if location.startswith(("http://", "https://")):
        return HttpArtifactStore(location)
    return DirectoryStore(Path(location))


def load_teacher(
    store: ArtifactStore,
    *,
    public_key: Ed25519PublicKey,
    name: str = TEACHER_NAME,
    version: int | None = None,
    target: str = TEACHER_TARGET,
    min_version: int | None = None,
    threads: int = 1,
) -> TeacherModel:
    """Fetch, verify (as a device does) and load a teacher release. Blocking.

    Args:
        store: the artifact store the trainer releases to.
        public_key: the release key devices trust.
        name: the teacher's model name in the store.
        version: the release to load; None loads the newest in the store.
        target: the target the release must be signed for.
        min_version: the version running now, if any: the release must be strictly newer
            (no rollback), as on a device.
        threads: onnxruntime intra-op threads for the session.

    Returns:
        The loaded teacher, warmed up with one run.

    Raises:
        ArtifactNotFoundError: no such release (or none at all) in the store.
        VerificationError: the release fails a check; `reason` names which.
        TeacherLoadError: it verified but does not run or has no usable input shape.
    """
    if version is None:
        versions = store.versions(name)
        if not versions:
            raise ArtifactNotFoundError(f"no release of {name} in the artifact store")
        version = max(versions)
    with tempfile.TemporaryDirectory(prefix=f"{name}-v{version}-") as tmp:
        art = store.fetch(name, version, Path(tmp) / "artifact")
        manifest = verify_artifact(art, public_key, target=target, min_version=min_version)
        if manifest.model_name != name or manifest.version != version:
            # A store that serves another release under this path is as bad as a bad hash.
            raise TeacherLoadError(
                f"store served {manifest.model_name} v{manifest.version} for {name} v{version}"
            )
        try:
            # The session reads the verified file now; the temp dir goes away after.
            session = ort.InferenceSession(
                str(art / MODEL_FILE),
                sess_options=_session_options(threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
            raise TeacherLoadError(f"{name} v{version} does not load: {exc}") from exc
    model = TeacherModel(manifest, session)
    try:
        out = model.logits(np.zeros((1, *model.input_shape), dtype=np.float32))
    except Exception as exc:  # same: any onnxruntime failure means "does not run"
        raise TeacherLoadError(f"{name} v{version} does not run: {exc}") from exc
    if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 2:
        raise TeacherLoadError(f"{name} v{version}: expected (1, K>=2) scores, got {out.shape}")
    return model


@dataclass
class BatcherStats:
    """What the batcher did, for the app's metrics (cumulative since start).

    `batch_sizes` counts batches by size (at most `max_batch` keys); `latency_s` keeps the
    most recent per-request latencies (enqueue to answer); `on_batch`, when set, is called
    after each batch with (size, session seconds, per-request latencies) so the app can
    feed Prometheus histograms directly.
    """

    batches: int = 0
    samples: int = 0
    failed_batches: int = 0
    abandoned: int = 0  # requests whose caller was cancelled before their batch ran
    run_s_total: float = 0.0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT))
    on_batch: Callable[[int, float, Sequence[float]], None] | None = None

    @property
    def mean_batch(self) -> float:
        return self.samples / self.batches if self.batches else 0.0


@dataclass
class _Request:
    x: npt.NDArray[np.float32]
    future: asyncio.Future[TeacherOutput]
    t0: float


class TeacherBatcher:
    """Micro-batches single-sample requests onto one teacher session.

    Queue policy: bounded at `queue_size` requests; `infer` waits for space when full.
    A batch closes when it holds `max_batch` requests or `max_wait_s` after its first
    request was taken, whichever comes first. With `max_wait_s=0` a batch is whatever
    queued while the previous one ran (continuous batching): in `edgeloop bench teacher`
    that was as fast as a 5 ms wait under load and added nothing to a lone request's
    latency, while a wait saves CPU at moderate load (fewer, larger batches) at the price
    of up to `max_wait_s` per request.
    """

    def __init__(
        self,
        model: TeacherModel,
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        queue_size: int = 4096,
    ) -> None:
        """Args: the teacher to serve, and the batch/queue bounds (see the class).

        Raises:
            ConfigError: a bound is not positive (or the wait is negative or not finite).
        """
        if max_batch < 1 or queue_size < 1 or not math.isfinite(max_wait_s) or max_wait_s < 0:
            raise ConfigError(
                f"max_batch={max_batch}, queue_size={queue_size} must be >= 1 and "
                f"max_wait_s={max_wait_s} >= 0"
            )
        self._model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=queue_size)
        self._closed = False
        self._waiting: set[asyncio.Future[TeacherOutput]] = set()
        self.stats = BatcherStats()

    @property
    def model(self) -> TeacherModel:
        """The teacher the next batch runs on."""
        return self._model

    @property
    def stopped(self) -> bool:
        """True once `run` has ended (requests are refused until it runs again)."""
        return self._closed

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def swap(self, model: TeacherModel) -> None:
        """Serve every batch formed from now on with `model` (a new release).

        A batch already running finishes on the old session.

        Raises:
            TeacherLoadError: the new teacher takes another input shape; queued requests
                were checked against the current one.
        """
        if model.input_shape != self._model.input_shape:
            raise TeacherLoadError(
                f"{model.name} v{model.version} takes input {list(model.input_shape)}, "
                f"the running teacher {list(self._model.input_shape)}; not swapped"
            )
        self._model = model

    def _check(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        # One wrong-shaped sample would fail a whole batch: refuse it alone, up front.
        if tuple(x.shape) != self._model.input_shape:
            raise InputDecodeError(
                f"input of shape {list(x.shape)} is not the teacher's "
                f"{list(self._model.input_shape)}",
                reason="bad_input_shape",
                path="input_shape",
            )
        return np.ascontiguousarray(x, dtype=np.float32)

    async def infer(self, x: npt.NDArray[np.float32]) -> TeacherOutput:
        """The teacher's verdict on one sample (shape `model.input_shape`).

        Waits while the queue is full.

        Raises:
            InputDecodeError: reason bad_input_shape; nothing was queued.
            TeacherUnavailableError: the batcher stopped or the batch failed (retriable).
        """
        if self.stopped:
            raise TeacherUnavailableError("teacher batcher is stopped")
        future: asyncio.Future[TeacherOutput] = asyncio.get_running_loop().create_future()
        req = _Request(self._check(x), future, time.perf_counter())
        # Every unanswered request is findable, wherever it waits (for queue space, in the
        # queue, in a batch), so that `run` can answer all of them when it stops.
        self._waiting.add(future)
        future.add_done_callback(self._waiting.discard)
        try:
            self._queue.put_nowait(req)
        except asyncio.QueueFull:
            # Backpressure: wait for space, or for `run` to stop (it fails our future).
            put = asyncio.ensure_future(self._queue.put(req))
            either: set[asyncio.Future[Any]] = {put, future}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not put.done():
                    put.cancel()
        return await future

    async def infer_many(self, xs: Sequence[npt.NDArray[np.float32]]) -> list[TeacherOutput]:
        """Verdicts for several samples, in order (they batch with everyone else's).

        Raises:
            InputDecodeError: a sample has the wrong shape; none was queued.
            TeacherUnavailableError: as `infer`.
        """
        checked = [self._check(x) for x in xs]
        return list(await asyncio.gather(*(self.infer(x) for x in checked)))

    async def _next_batch(self) -> list[_Request]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def run(self) -> None:
        """Form and run batches until cancelled; on the way out every waiter is answered
        (TeacherUnavailableError), none is left hanging."""
        self._closed = False
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await self._next_batch()
                live = [r for r in batch if not r.future.done()]  # done = caller cancelled
                self.stats.abandoned += len(batch) - len(live)
                if live:
                    await self._run_batch(loop, executor, live)
        finally:
            self._closed = True
            stopped = TeacherUnavailableError("teacher batcher stopped")
            for fut in list(self._waiting):  # queued, in this batch, or waiting for space
                if not fut.done():
                    fut.set_exception(stopped)
            while not self._queue.empty():
                self._queue.get_nowait()  # their futures are answered above
            # A running session.run cannot be interrupted; do not wait for it here.
            executor.shutdown(wait=False, cancel_futures=True)

    async def _run_batch(
        self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, live: list[_Request]
    ) -> None:
        model = self._model  # a swap during this batch applies to the next one
        x = np.stack([r.x for r in live])
        t0 = time.perf_counter()
        try:
            outs = await loop.run_in_executor(executor, model.predict, x)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an onnxruntime failure answers this batch, not the loop
            self.stats.failed_batches += 1
            err = TeacherUnavailableError(
                f"{model.name} v{model.version} failed on a batch of {len(live)}: {exc}"
            )
            for r in live:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        t1 = time.perf_counter()
        latencies = []
        for r, out in zip(live, outs, strict=True):
            if not r.future.done():
                r.future.set_result(out)
            latencies.append(t1 - r.t0)
        st = self.stats
        st.batches += 1
        st.samples += len(live)
        st.run_s_total += t1 - t0
        st.batch_sizes[len(live)] += 1
        st.latency_s.extend(latencies)
        if st.on_batch is not None:
            st.on_batch(len(live), t1 - t0, latencies)
