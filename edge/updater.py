"""Model releases: download, verify exactly as `edgeloop models verify` does, swap A/B.

Order of a release (each step can refuse; a refusal keeps the running model, is counted
by reason and reported in DeviceStatus.last_error):
1. stage, cohort, membership (share), model name, version (strictly newer, or the one
   a ROLLBACK names), target: from the event, before any download (`release_rules`);
2. download the artifact dir over HTTP(S) (or file:// for a local store), streamed to
   disk and capped per file after decoding (`edge/download.py`);
3. the manifest's sha256 must be the one the release names;
4. `verify_artifact`: signature, file hashes, no unsigned files, target, no rollback
   (min_version = the running version; for a ROLLBACK: exactly the named version),
   validity window;
5. copy into the inactive slot, build the session and warm it up on the worker thread;
6. switch the `current` link (disk), then the pipeline's model reference (memory).
A frame is served by the model it started with; no frame sees a half-loaded session.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.artifacts.errors import ArtifactError, VerificationError
from edgeloop.artifacts.manifest import MANIFEST_NAME, Manifest
from edgeloop.artifacts.verify import verify_artifact
from edgeloop.core.errors import ConfigError
from edgeloop.core.logs import get_logger
from edgeloop.edge.download import download_artifact
from edgeloop.edge.inference import LoadedModel, ModelLoadError, SessionConfig, load_model
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.release_rules import (
    APPLY_STAGES,
    FLEET_COHORTS,
    ReleaseRefusedError,
    Running,
    decide,
    supersedes,
    withdraws,
)
from edgeloop.edge.slots import ModelSlots
from edgeloop.edge.state import MAX_WITHDRAWN, StateFile
from edgeloop.schemas.events import ModelRelease

__all__ = ["APPLY_STAGES", "FLEET_COHORTS", "ModelUpdater", "ReleaseRefusedError"]

log = get_logger(__name__)


class ModelUpdater:
    def __init__(
        self,
        *,
        device_id: str,
        cohort: str,
        slots: ModelSlots,
        public_key: Ed25519PublicKey,
        target: str,
        session: SessionConfig,
        example: npt.NDArray[np.float32],
        executor: Executor,
        state: StateFile,
        metrics: EdgeMetrics,
        on_swap: Callable[[LoadedModel], None],
        download_timeout_s: float = 60.0,
    ) -> None:
        self.device_id = device_id
        self.cohort = cohort
        self.slots = slots
        self.public_key = public_key
        self.target = target
        self.session = session
        self.example = example
        self.executor = executor
        self.state = state
        self.metrics = metrics
        self.on_swap = on_swap
        self.download_timeout_s = download_timeout_s
        self.model: LoadedModel | None = None
        self.name = f"updater-{device_id}"
        self._latest: ModelRelease | None = None
        self._ready = asyncio.Event()

    # -- boot ---------------------------------------------------------------------------

    def boot(self, initial: Path | None) -> LoadedModel:
        """Load the current slot (or install `initial` into an empty state dir). Blocking."""
        current = self.slots.current()
        if current is None:
            if initial is None:
                raise ConfigError(
                    f"no model installed under {self.slots.root} and no initial model given "
                    "(--model DIR: a signed artifact dir)"
                )
            verify_artifact(initial, self.public_key, target=self.target)
            current = self.slots.stage(initial)
            self.slots.activate(current)
        data = (current / MANIFEST_NAME).read_bytes()
        # An installed model keeps serving past its expiry (expiry gates installs, and a
        # device that cannot reach the cloud must not stop working); everything else is
        # checked again, so a file changed on disk is caught at boot.
        created = Manifest.from_bytes(data).created_at
        manifest = verify_artifact(current, self.public_key, target=self.target, now=created)
        self.model = load_model(current, manifest, self.session, self.example)
        if self.state.current.model_version != manifest.version:
            self.state.update(model_version=manifest.version)
        self.metrics.applied_version.labels(self.device_id, self.cohort, "model").set(
            manifest.version
        )
        return self.model

    # -- releases -------------------------------------------------------------------------

    def submit(self, release: ModelRelease) -> None:
        """Queue a release; one waiting release is kept (`release_rules.supersedes`)."""
        if supersedes(release, self._latest):
            self._latest = release
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            release, self._latest = self._latest, None
            if release is not None:
                await self.apply(release)

    async def apply(self, release: ModelRelease) -> str:
        """Apply or refuse one release; returns the outcome label."""
        try:
            model = await self._apply(release)
        except (ReleaseRefusedError, VerificationError) as exc:
            outcome = f"refused:{exc.reason}"
            await asyncio.to_thread(self._refuse, release, outcome, str(exc))
            return outcome
        except (ModelLoadError, ArtifactError, OSError, httpx.HTTPError) as exc:
            outcome = "refused:load" if isinstance(exc, ModelLoadError) else "refused:download"
            await asyncio.to_thread(self._refuse, release, outcome, str(exc))
            return outcome
        if isinstance(model, str):
            self.metrics.updates.labels(self.device_id, "model", model).inc()
            return model
        self.metrics.updates.labels(self.device_id, "model", "applied").inc()
        return "applied"

    def _refuse(self, release: ModelRelease, outcome: str, detail: str) -> None:
        self.metrics.updates.labels(self.device_id, "model", outcome).inc()
        message = f"model {release['model_name']} v{release['model_version']} {detail}"
        log.warning("model release refused", extra={"device": self.device_id, "why": message})
        self.state.update(last_refusal=message)

    async def _apply(self, release: ModelRelease) -> LoadedModel | str:
        """The new model, or why nothing was to be done (not an error)."""
        current = self.model
        running = current.version if current is not None else 0
        facts = Running(
            device_id=self.device_id,
            cohort=self.cohort,
            target=self.target,
            model_name=current.name if current is not None else None,
            version=running,
            withdrawn=frozenset(self.state.current.withdrawn),
        )
        withdrawn = withdraws(release, facts)
        if withdrawn is not None:
            await asyncio.to_thread(self._remember_withdrawn, withdrawn)
        decision = decide(release, facts)
        if isinstance(decision, str):
            return decision
        with tempfile.TemporaryDirectory(dir=self.slots.root, prefix=".download-") as tmp:
            art = Path(tmp) / "artifact"
            await download_artifact(release["artifact_url"], art, self.download_timeout_s)
            digest = hashlib.sha256((art / MANIFEST_NAME).read_bytes()).hexdigest()
            if release["manifest_sha256"] and digest != release["manifest_sha256"]:
                raise ReleaseRefusedError(
                    f"manifest sha256 {digest} != {release['manifest_sha256']} named by the "
                    "release",
                    reason="manifest_hash",
                )
            manifest = await asyncio.to_thread(
                verify_artifact,
                art,
                self.public_key,
                min_version=decision.min_version,
                target=self.target,
            )
            if manifest.model_name != release["model_name"] or (
                manifest.version != release["model_version"]
            ):
                raise ReleaseRefusedError(
                    f"artifact is {manifest.model_name} v{manifest.version}", reason="mismatch"
                )
            slot = await asyncio.to_thread(self.slots.stage, art)
        loop = asyncio.get_running_loop()
        # Built and warmed on the inference thread, between two frames: the running
        # model keeps serving until the reference below is switched.
        model = await loop.run_in_executor(
            self.executor, load_model, slot, manifest, self.session, self.example
        )
        await asyncio.to_thread(self.slots.activate, slot)
        self.model = model
        self.on_swap(model)
        await asyncio.to_thread(
            self.state.update, model_version=manifest.version, last_refusal=None
        )
        self.metrics.applied_version.labels(self.device_id, self.cohort, "model").set(
            manifest.version
        )
        log.info(
            "model rolled back" if decision.rollback else "model swapped",
            extra={"device": self.device_id, "model": manifest.model_name, "from": running,
                   "to": manifest.version},
        )  # fmt: skip
        return model

    def _remember_withdrawn(self, version: int) -> None:
        withdrawn = self.state.current.withdrawn
        if version not in withdrawn:
            self.state.update(withdrawn=(*withdrawn, version)[-MAX_WITHDRAWN:])
