"""The teacher: loaded only when its release verifies, and micro-batched without changing
a single verdict.

The teacher here is the shipped architecture (`TeacherCNN`), trained for two quick epochs
on the digits task, exported and released exactly as `edgeloop models bootstrap` does
(`trainer.release.publish`, target cloud-cpu) into a directory store.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.agents.teacher import (
    TeacherBatcher,
    TeacherLoadError,
    TeacherModel,
    TeacherOutput,
    TeacherUnavailableError,
    load_teacher,
    softmax,
)
from edgeloop.artifacts.errors import ArtifactNotFoundError, VerificationError
from edgeloop.artifacts.manifest import Lineage
from edgeloop.artifacts.signing import generate_keypair, load_private_key, load_public_key
from edgeloop.artifacts.store import DirectoryStore
from edgeloop.core.errors import ConfigError
from edgeloop.tasks.digits import DigitsTask
from edgeloop.tasks.inputs import InputDecodeError
from edgeloop.trainer.export import export_onnx
from edgeloop.trainer.release import TEACHER_MODEL, TEACHER_TARGET, publish


@dataclass(frozen=True)
class Released:
    store: DirectoryStore
    public_key: Ed25519PublicKey
    x: np.ndarray  # clean holdout inputs (N, 1, 8, 8)
    y: np.ndarray  # their labels


def _train_and_release(root: Path, key_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Release v1 (two epochs of training) and v2 (v1 with its output layer nudged)."""
    task = DigitsTask()
    splits = task.splits(0)
    key = load_private_key(key_dir / "release.key")
    store = DirectoryStore(root / "store")
    torch.manual_seed(0)
    model = task.build_teacher()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    model.train()
    for _ in range(2):
        for i in range(0, len(xs), 64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[i : i + 64]), ys[i : i + 64])
            loss.backward()
            opt.step()
    for v in (1, 2):
        if v == 2:
            with torch.no_grad():  # another release: same shape, other scores
                model.head[-1].bias.add_(torch.linspace(-1.0, 1.0, 10))
        onnx = export_onnx(model, xs[:1], root / f"teacher-{v}.onnx")
        publish(
            store,
            key,
            model_name=TEACHER_MODEL,
            onnx_path=onnx,
            staging=root / "staging",
            lineage=Lineage(trigger_id="test"),
            card={"task": "digits", "precision": "fp32"},
            target=TEACHER_TARGET,
        )
    return splits.clean_holdout.x, splits.clean_holdout.y


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Released:
    root = tmp_path_factory.mktemp("teacher")
    generate_keypair(root / "keys")
    x, y = _train_and_release(root, root / "keys")
    return Released(
        DirectoryStore(root / "store"), load_public_key(root / "keys" / "release.pub"), x, y
    )


@pytest.fixture(scope="module")
def teacher(released: Released) -> TeacherModel:
    return load_teacher(released.store, public_key=released.public_key, version=1)


def _per_sample(model_path_session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [model_path_session.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))]
    )


def test_loads_the_newest_verified_release(released: Released) -> None:
    model = load_teacher(released.store, public_key=released.public_key)
    assert (model.name, model.version, model.input_shape) == (TEACHER_MODEL, 2, (1, 8, 8))
    # Trained, not a random net: it knows most digits.
    acc = np.mean(
        [o.label for o in model.predict(released.x)] == DigitsTask().splits(0).clean_holdout.y
    )
    assert acc > 0.8


def test_a_tampered_release_is_refused_like_on_a_device(released: Released, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    src = released.store.root / TEACHER_MODEL
    (store.root / TEACHER_MODEL).mkdir(parents=True)
    shutil.copytree(src / "1", store.root / TEACHER_MODEL / "1")
    (store.root / TEACHER_MODEL / "index.json").write_text(json.dumps({"versions": [1]}))
    model = store.root / TEACHER_MODEL / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as err:
        load_teacher(store, public_key=released.public_key)
    assert err.value.reason == "hash"


def test_wrong_key_wrong_target_rollback_and_missing_are_refused(
    released: Released, tmp_path: Path
) -> None:
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(VerificationError) as err:
        load_teacher(released.store, public_key=load_public_key(other_pub))
    assert err.value.reason == "signature"
    with pytest.raises(VerificationError) as err:
        load_teacher(released.store, public_key=released.public_key, target="pi5-cpu")
    assert err.value.reason == "target"
    with pytest.raises(VerificationError) as err:
        load_teacher(released.store, public_key=released.public_key, version=1, min_version=2)
    assert err.value.reason == "version"
    with pytest.raises(ArtifactNotFoundError):
        load_teacher(released.store, public_key=released.public_key, name="nobody")


async def _with_batcher(batcher: TeacherBatcher, coro: object) -> object:
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(batcher.run())
        try:
            return await coro  # type: ignore[misc]
        finally:
            runner.cancel()


async def test_batched_verdicts_equal_per_sample_session_runs(
    released: Released, teacher: TeacherModel
) -> None:
    x = released.x[:200]
    batcher = TeacherBatcher(teacher, max_batch=32, max_wait_s=0.05)
    outs = await _with_batcher(batcher, batcher.infer_many(list(x)))
    assert isinstance(outs, list)
    # The reference: the released file, run one sample at a time with a fresh session.
    path = released.store.root / TEACHER_MODEL / "1" / "model.onnx"
    ref = softmax(_per_sample(ort.InferenceSession(str(path)), x))
    assert [o.label for o in outs] == ref.argmax(1).tolist()
    np.testing.assert_allclose(np.stack([o.probs for o in outs]), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([o.confidence for o in outs], ref.max(1), rtol=1e-4, atol=1e-6)
    # They were batched, never past max_batch, and every sample was answered once.
    st = batcher.stats
    assert st.samples == 200
    assert max(st.batch_sizes) == 32
    assert st.batches < 200
    assert sum(size * n for size, n in st.batch_sizes.items()) == 200


async def test_batches_fill_up_to_max_batch(released: Released, teacher: TeacherModel) -> None:
    batcher = TeacherBatcher(teacher, max_batch=8, max_wait_s=0.2)
    # Queued before the loop starts: the first batches are full at once, and the rest
    # goes as one batch when its wait ends.
    pending = [asyncio.ensure_future(batcher.infer(x)) for x in released.x[:20]]
    await asyncio.sleep(0)
    await _with_batcher(batcher, asyncio.gather(*pending))
    assert batcher.stats.batch_sizes == {8: 2, 4: 1}


async def test_a_wrong_shape_is_refused_alone(teacher: TeacherModel) -> None:
    batcher = TeacherBatcher(teacher)
    with pytest.raises(InputDecodeError, match=r"shape \[8, 8\] is not the teacher's") as err:
        await batcher.infer(np.zeros((8, 8), np.float32))
    assert err.value.reason == "bad_input_shape"
    assert batcher.queue_depth == 0


class _Stuck:
    """A teacher whose session.run blocks until released (a long batch, on demand)."""

    def __init__(self, model: TeacherModel) -> None:
        self.name, self.version, self.input_shape = model.name, model.version, model.input_shape
        self._model = model
        self.started = threading.Event()
        self.release = threading.Event()

    def predict(self, x: np.ndarray) -> list[TeacherOutput]:
        self.started.set()
        self.release.wait(30)
        return self._model.predict(x)


async def test_cancelled_run_leaves_no_waiter_hanging(
    released: Released, teacher: TeacherModel
) -> None:
    stuck = _Stuck(teacher)
    # One request in a running batch, one in the queue, seven waiting for queue space.
    batcher = TeacherBatcher(cast(TeacherModel, stuck), max_batch=1, queue_size=1)
    runner = asyncio.create_task(batcher.run())
    waiters = [asyncio.create_task(batcher.infer(x)) for x in released.x[:9]]
    await asyncio.to_thread(stuck.started.wait, 30)
    await asyncio.sleep(0)
    runner.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await runner
        async with asyncio.timeout(10):  # a hanging waiter fails here (not a timing check)
            results = await asyncio.gather(*waiters, return_exceptions=True)
    finally:
        stuck.release.set()
    assert [type(r) for r in results] == [TeacherUnavailableError] * 9
    with pytest.raises(TeacherUnavailableError):
        await batcher.infer(released.x[0])  # stopped: refused at once, never queued


async def test_a_cancelled_caller_does_not_break_its_batch(
    released: Released, teacher: TeacherModel
) -> None:
    batcher = TeacherBatcher(teacher, max_batch=4, max_wait_s=10.0)
    tasks = [asyncio.create_task(batcher.infer(x)) for x in released.x[:4]]
    await asyncio.sleep(0)
    tasks[1].cancel()
    done = await _with_batcher(batcher, asyncio.gather(*tasks, return_exceptions=True))
    assert isinstance(done, list)
    assert isinstance(done[1], asyncio.CancelledError)
    assert sum(1 for d in done if not isinstance(d, BaseException)) == 3
    assert batcher.stats.abandoned == 1


async def test_swap_takes_effect_for_the_next_batch(
    released: Released, teacher: TeacherModel
) -> None:
    v2 = load_teacher(released.store, public_key=released.public_key, version=2)
    x = released.x[:50]
    ref1 = np.stack([o.probs for o in teacher.predict(x)])
    ref2 = np.stack([o.probs for o in v2.predict(x)])
    assert not np.allclose(ref1, ref2)  # two different trainings: tells them apart
    batcher = TeacherBatcher(teacher, max_batch=64, max_wait_s=0.001)

    async def both() -> tuple[list[np.ndarray], list[np.ndarray]]:
        before = await batcher.infer_many(list(x))
        batcher.swap(v2)
        after = await batcher.infer_many(list(x))
        return [o.probs for o in before], [o.probs for o in after]

    got = await _with_batcher(batcher, both())
    assert isinstance(got, tuple)
    np.testing.assert_allclose(np.stack(got[0]), ref1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.stack(got[1]), ref2, rtol=1e-4, atol=1e-5)
    assert batcher.model.version == 2


def test_swap_to_another_input_shape_is_refused(teacher: TeacherModel) -> None:
    batcher = TeacherBatcher(teacher)
    other = object.__new__(TeacherModel)
    other.name, other.version, other.input_shape = "x", 9, (3, 8, 8)
    with pytest.raises(TeacherLoadError, match=r"takes input \[3, 8, 8\]"):
        batcher.swap(other)
    assert batcher.model is teacher


@pytest.mark.parametrize(
    "bounds",
    [{"max_batch": 0}, {"queue_size": 0}, {"max_wait_s": -0.001}, {"max_wait_s": float("inf")}],
)
def test_bad_batcher_bounds_are_config_errors(
    teacher: TeacherModel, bounds: dict[str, float]
) -> None:
    with pytest.raises(ConfigError, match=next(iter(bounds))):
        TeacherBatcher(teacher, **bounds)  # type: ignore[arg-type]
