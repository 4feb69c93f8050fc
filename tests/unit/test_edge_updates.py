"""Downlink version gating: thresholds and signed model releases (A/B swap, refusals)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop.artifacts.manifest import MANIFEST_NAME
from edgeloop.artifacts.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_artifact,
)
from edgeloop.edge.control import ThresholdGate, VerdictCounter
from edgeloop.edge.inference import LoadedModel, SessionConfig
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.pipeline import PendingVerdicts
from edgeloop.edge.slots import ModelSlots
from edgeloop.edge.state import AppliedThreshold, DeviceState, StateFile
from edgeloop.edge.updater import ModelUpdater


def tiny_onnx(path: Path, seed: int) -> None:
    """input (N,1,8,8) -> Flatten -> Gemm -> logits (N,10): a real model, built in ms."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def make_release_dir(
    root: Path,
    key: Path,
    version: int,
    *,
    target: str = "pi5-cpu",
    now: int | None = None,
    validity_s: int = 3600,
    name: str = "digits-student",
) -> Path:
    art = root / f"{name}-{version}-{target}-{now}"
    art.mkdir(parents=True)
    tiny_onnx(art / "model.onnx", seed=version)
    (art / "model-card.json").write_text('{"precision": "fp32"}')
    sign_artifact(
        art,
        load_private_key(key),
        model_name=name,
        version=version,
        files=["model.onnx", "model-card.json"],
        target=target,
        now=now,
        validity_s=validity_s,
    )
    return art


def release(art: Path, version: int, **kw: Any) -> dict[str, Any]:
    rec = {
        "event_id": f"r{version}",
        "ts": 0,
        "model_name": "digits-student",
        "model_version": version,
        "cohort": "default",
        "stage": "CANARY",
        "wave": 0,
        "artifact_url": art.resolve().as_uri(),
        "manifest_sha256": hashlib.sha256((art / MANIFEST_NAME).read_bytes()).hexdigest(),
        "target": "pi5-cpu",
        "parent_version": None,
        "reason": "test",
    }
    rec.update(kw)
    return rec


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


class Device:
    def __init__(self, root: Path, pub: Path) -> None:
        self.state = StateFile(
            root / "state.json", DeviceState(AppliedThreshold(0, 0.8, "MAX_PROB", 0.0))
        )
        self.swapped: list[LoadedModel] = []
        self.executor = ThreadPoolExecutor(1)
        self.updater = ModelUpdater(
            device_id="dev-1",
            cohort="default",
            slots=ModelSlots(root / "models"),
            public_key=load_public_key(pub),
            target="pi5-cpu",
            session=SessionConfig(),
            example=np.zeros((1, 1, 8, 8), np.float32),
            executor=self.executor,
            state=self.state,
            metrics=EdgeMetrics(),
            on_swap=self.swapped.append,
        )


@pytest.fixture
def device(tmp_path: Path, keys: tuple[Path, Path]) -> Device:
    priv, pub = keys
    dev = Device(tmp_path / "device", pub)
    dev.updater.boot(make_release_dir(tmp_path / "rel", priv, 1))
    return dev


def test_boot_installs_the_initial_model_and_reboot_keeps_it(
    tmp_path: Path, keys: tuple[Path, Path], device: Device
) -> None:
    assert device.updater.model is not None
    assert device.updater.model.version == 1
    assert device.state.current.model_version == 1
    again = Device(tmp_path / "device", keys[1])
    assert again.updater.boot(None).version == 1  # from the current slot, no initial needed


async def test_newer_release_is_verified_and_swapped(
    tmp_path: Path, keys: tuple[Path, Path], device: Device
) -> None:
    art = make_release_dir(tmp_path / "rel", keys[0], 2)
    assert await device.updater.apply(release(art, 2)) == "applied"
    assert [m.version for m in device.swapped] == [2]
    assert device.state.current.model_version == 2
    assert device.updater.slots.current() is not None
    # A reboot comes back on v2 (the link was switched on disk).
    assert Device(tmp_path / "device", keys[1]).updater.boot(None).version == 2
    # The retained release comes back on reconnect: nothing happens.
    assert await device.updater.apply(release(art, 2)) == "stale"


async def test_tampered_artifact_is_refused_and_old_model_keeps_serving(
    tmp_path: Path, keys: tuple[Path, Path], device: Device
) -> None:
    art = make_release_dir(tmp_path / "rel", keys[0], 2)
    data = bytearray((art / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (art / "model.onnx").write_bytes(bytes(data))
    assert await device.updater.apply(release(art, 2)) == "refused:hash"
    assert device.swapped == []
    assert device.updater.model is not None and device.updater.model.version == 1
    assert device.state.current.model_version == 1
    assert "hash" in (device.state.current.last_refusal or "")
    out = device.updater.model.logits(np.zeros((1, 1, 8, 8), np.float32))
    assert out.shape == (1, 10)


async def test_signature_by_another_key_is_refused(tmp_path: Path, device: Device) -> None:
    other_priv, _ = generate_keypair(tmp_path / "other-keys")
    art = make_release_dir(tmp_path / "rel", other_priv, 2)
    assert await device.updater.apply(release(art, 2)) == "refused:signature"


async def test_older_artifact_behind_a_newer_claim_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], device: Device
) -> None:
    await device.updater.apply(release(make_release_dir(tmp_path / "rel", keys[0], 3), 3))
    old = make_release_dir(tmp_path / "rel2", keys[0], 2)
    # The event claims v4, the signed manifest says v2: verification's no-rollback refuses.
    assert await device.updater.apply(release(old, 4)) == "refused:version"
    assert device.updater.model is not None and device.updater.model.version == 3


async def test_expired_artifact_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], device: Device
) -> None:
    art = make_release_dir(
        tmp_path / "rel", keys[0], 2, now=int(time.time()) - 7200, validity_s=3600
    )
    assert await device.updater.apply(release(art, 2)) == "refused:expired"


async def test_wrong_target_is_refused_from_the_event_and_from_the_manifest(
    tmp_path: Path, keys: tuple[Path, Path], device: Device
) -> None:
    art = make_release_dir(tmp_path / "rel", keys[0], 2, target="cloud-cpu")
    assert await device.updater.apply(release(art, 2, target="cloud-cpu")) == "refused:target"
    # The event lies about the target; the signed manifest does not.
    assert await device.updater.apply(release(art, 2)) == "refused:target"
    assert device.swapped == []


async def test_manifest_hash_named_by_the_release_must_match(
    tmp_path: Path, keys: tuple[Path, Path], device: Device
) -> None:
    art = make_release_dir(tmp_path / "rel", keys[0], 2)
    assert (
        await device.updater.apply(release(art, 2, manifest_sha256="0" * 64))
        == "refused:manifest_hash"
    )


async def test_canary_for_another_cohort_and_refused_stage_are_ignored(
    tmp_path: Path, keys: tuple[Path, Path], device: Device
) -> None:
    art = make_release_dir(tmp_path / "rel", keys[0], 2)
    assert await device.updater.apply(release(art, 2, cohort="canary")) == "other_cohort"
    assert await device.updater.apply(release(art, 2, stage="REFUSED")) == "ignored_stage"
    assert await device.updater.apply(release(art, 2, cohort="fleet")) == "applied"


async def test_download_over_http(tmp_path: Path, keys: tuple[Path, Path], device: Device) -> None:
    from edgeloop.artifacts.store import DirectoryStore, serve_directory

    store = DirectoryStore(tmp_path / "store")
    store.put(make_release_dir(tmp_path / "rel", keys[0], 2))
    server = serve_directory(store.root)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/digits-student/2"
        rec = release(store.root / "digits-student" / "2", 2, artifact_url=url)
        assert await device.updater.apply(rec) == "applied"
        rec3 = release(store.root / "digits-student" / "2", 3, artifact_url=url.replace("/2", "/3"))
        assert await device.updater.apply(rec3) == "refused:download"
    finally:
        await asyncio.to_thread(server.shutdown)


def threshold(version: int, **kw: Any) -> dict[str, Any]:
    rec = {
        "event_id": f"t{version}",
        "ts": 0,
        "scope": "DEVICE",
        "scope_id": "dev-1",
        "threshold_version": version,
        "tau": 0.6,
        "confidence_kind": "MARGIN",
        "audit_rate": 0.05,
        "reason": "test",
        "signals": {},
    }
    rec.update(kw)
    return rec


def test_threshold_applies_only_when_newer_and_is_persisted(tmp_path: Path) -> None:
    default = DeviceState(AppliedThreshold(0, 0.8, "MAX_PROB", 0.0))
    state = StateFile(tmp_path / "state.json", default)
    applied: list[AppliedThreshold] = []
    gate = ThresholdGate(
        device_id="dev-1", cohort="c1", state=state, metrics=EdgeMetrics(), on_apply=applied.append
    )
    assert gate.handle(threshold(3)) == "applied"  # type: ignore[arg-type]
    assert gate.handle(threshold(3, tau=0.1)) == "stale"  # type: ignore[arg-type]
    assert gate.handle(threshold(2, tau=0.1)) == "stale"  # type: ignore[arg-type]
    assert gate.handle(threshold(9, scope_id="dev-2")) == "other_scope"  # type: ignore[arg-type]
    assert gate.handle(threshold(4, scope="COHORT", scope_id="c1", tau=0.7)) == "applied"  # type: ignore[arg-type]
    assert gate.handle(threshold(5, tau=1.5)) == "refused:range"  # type: ignore[arg-type]
    assert [(t.version, t.tau, t.confidence_kind) for t in applied] == [
        (3, 0.6, "MARGIN"),
        (4, 0.7, "MARGIN"),
    ]
    # After a reboot the applied version is what was persisted, not the default.
    again = StateFile(tmp_path / "state.json", default)
    assert (again.current.threshold.version, again.current.threshold.tau) == (4, 0.7)


def test_state_writes_from_two_threads_lose_nothing_and_never_raise(tmp_path: Path) -> None:
    # The daemon writes its state from the event loop (thresholds, withdrawn versions) and
    # from the updater's worker threads (a model swap, a refusal) at the same time.
    default = DeviceState(AppliedThreshold(0, 0.8, "MAX_PROB", 0.0))
    state = StateFile(tmp_path / "state.json", default)
    n = 150

    def models() -> None:
        for i in range(1, n + 1):
            state.update(model_version=i)

    def thresholds() -> None:
        for i in range(1, n + 1):
            state.update(threshold=AppliedThreshold(i, 0.5, "MAX_PROB", 0.02))

    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(models), pool.submit(thresholds)]
        for f in done:
            f.result()  # the old code: FileNotFoundError (both renamed one temp file)
    # Neither writer's last change was overwritten by the other's stale copy.
    for s in (state.current, StateFile(tmp_path / "state.json", default).current):
        assert (s.model_version, s.threshold.version) == (n, n)


def test_verdicts_are_matched_and_counted() -> None:
    pending = PendingVerdicts(capacity=2)
    counter = VerdictCounter("dev-1", pending, EdgeMetrics())
    pending.add("dev-1:1", 3)
    pending.add("dev-1:2", 4)
    pending.add("dev-1:3", 5)  # forgets dev-1:1 (bounded)
    verdict = {"request_event_id": "dev-1:2", "label": 4}
    assert counter.handle(verdict) == "agree"  # type: ignore[arg-type]
    assert counter.handle({"request_event_id": "dev-1:3", "label": 1}) == "disagree"  # type: ignore[arg-type]
    assert counter.handle({"request_event_id": "dev-1:1", "label": 3}) == "unmatched"  # type: ignore[arg-type]
    assert pending.forgotten == 1
