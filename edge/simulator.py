"""N simulated devices in one process: each its own MQTT client, certificate, outbox, seq.

The devices share one inference thread (a host has the cores it has) and the model
weights on disk, nothing else. Frames are the task's images, drifted on a per-cohort
schedule with the task's drift generator; network impairment (a partition for a
period, added latency) is applied per device by its uplink.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgeloop.core.errors import ConfigError
from edgeloop.core.logs import get_logger
from edgeloop.edge.daemon import EdgeDaemon, Endpoint
from edgeloop.edge.inference import InferenceWorker
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.pipeline import Preprocessor
from edgeloop.edge.settings import EdgeSettings
from edgeloop.edge.source import ArraySource
from edgeloop.edge.uplink import Impairment

log = get_logger(__name__)


@dataclass(frozen=True)
class DriftStep:
    at_s: float  # seconds after the start
    severity: float


@dataclass(frozen=True)
class DriftSchedule:
    """Per cohort, the drift severity as a step function of time (0 before the first)."""

    steps: dict[str, tuple[DriftStep, ...]] = field(default_factory=dict)

    def severity(self, cohort: str, elapsed_s: float) -> float:
        current = 0.0
        for step in self.steps.get(cohort, ()):
            if elapsed_s >= step.at_s:
                current = step.severity
        return current

    @classmethod
    def parse(cls, specs: list[str]) -> DriftSchedule:
        """`cohort:at_s=severity[,at_s=severity...]`, e.g. `canary:30=0.5,60=0.8`."""
        out: dict[str, tuple[DriftStep, ...]] = {}
        for spec in specs:
            cohort, _, rest = spec.partition(":")
            try:
                steps = tuple(
                    DriftStep(float(a), float(s))
                    for a, s in (part.split("=", 1) for part in rest.split(",") if part)
                )
            except ValueError as exc:
                raise ConfigError(f"drift schedule {spec!r}: use cohort:at_s=severity,...") from exc
            if not cohort or not steps or any(not 0 <= st.severity <= 1 for st in steps):
                raise ConfigError(f"drift schedule {spec!r}: use cohort:at_s=severity (0..1)")
            out[cohort] = tuple(sorted(steps, key=lambda st: st.at_s))
        return cls(out)


class Drifter:
    """Applies the cohort's current severity to frames; cached per (severity, frame).

    The schedule's clock starts at the device's first frame, not when the simulator is
    built: loading a model and connecting take seconds on a loaded host, and a clock
    started earlier would cut the clean time before a drift by that much (a demo on a
    busy CI machine saw the drift begin before the control plane had a reference).
    """

    def __init__(self, schedule: DriftSchedule, cohort: str, seed: int) -> None:
        self.schedule = schedule
        self.cohort = cohort
        self.seed = seed
        self.start: float | None = None

    def elapsed(self) -> float:
        """Seconds since this device's first frame (0 before it)."""
        return 0.0 if self.start is None else time.monotonic() - self.start

    def __call__(self, images: npt.NDArray[np.float32], i: int) -> npt.NDArray[np.float32]:
        if self.start is None:
            self.start = time.monotonic()
        severity = self.schedule.severity(self.cohort, self.elapsed())
        if severity <= 0:
            return images
        from edgeloop.tasks.drift import DriftConfig, apply_drift  # scipy: only when drifting

        return apply_drift(images, DriftConfig(severity=severity), seed=self.seed + i)


@dataclass(frozen=True)
class FleetPlan:
    devices: int
    prefix: str = "sim"
    cohorts: tuple[str, ...] = ("default",)
    rate_hz: float = 5.0
    schedule: DriftSchedule = field(default_factory=DriftSchedule)
    # Impairment: every device loses its connection at `partition_at_s` for
    # `partition_for_s`; `latency_s` is added before every publish batch.
    partition_at_s: float | None = None
    partition_for_s: float = 0.0
    latency_s: float = 0.0
    events_per_device: int | None = None
    seed: int = 0


class FleetSimulator:
    """Runs `plan.devices` EdgeDaemons on this loop until cancelled (or all drained)."""

    def __init__(
        self,
        plan: FleetPlan,
        base: EdgeSettings,
        *,
        host: str,
        port: int,
        tls_for: Callable[[str], ssl.SSLContext | None],
        images: npt.NDArray[np.float32],
        task: Preprocessor,
        labels: npt.NDArray[np.int64] | None = None,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        self.plan = plan
        self.metrics = metrics or EdgeMetrics()
        self.worker = InferenceWorker("sim-inference")
        self.name = "edge-simulator"
        self.daemons: list[EdgeDaemon] = []
        self.impairments: list[Impairment] = []
        rng = random.Random(plan.seed)  # noqa: S311 - simulation, not secrets
        for i in range(plan.devices):
            device_id = f"{plan.prefix}-{i:04d}"
            cohort = plan.cohorts[i % len(plan.cohorts)]
            settings = replace_settings(
                base,
                device_id=device_id,
                cohort=cohort,
                state_dir=base.state_dir / device_id,
                max_events=plan.events_per_device,
                exit_when_drained=plan.events_per_device is not None,
            )
            offset = rng.randrange(len(images))
            source = ArraySource(
                np.roll(images, -offset, axis=0),
                labels=None if labels is None else np.roll(labels, -offset),
                rate_hz=plan.rate_hz,
                transform=Drifter(plan.schedule, cohort, plan.seed + i),
            )
            impairment = Impairment(latency_s=plan.latency_s)
            self.impairments.append(impairment)
            self.daemons.append(
                EdgeDaemon(
                    settings,
                    Endpoint(host, port, tls_for(device_id)),
                    source,
                    task,
                    metrics=self.metrics,
                    executor=self.worker.executor,
                    impairment=impairment,
                    rng=random.Random(plan.seed * 100_003 + i),  # noqa: S311
                )
            )

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for daemon in self.daemons:
                    tg.create_task(daemon.run(), name=daemon.name)
                if self.plan.partition_at_s is not None:
                    tg.create_task(self._partition(), name="sim-partition")
        finally:
            self.worker.close()

    async def _partition(self) -> None:
        assert self.plan.partition_at_s is not None
        await asyncio.sleep(self.plan.partition_at_s)
        until = time.monotonic() + self.plan.partition_for_s
        log.info("simulated partition", extra={"seconds": self.plan.partition_for_s})
        for imp in self.impairments:
            imp.partition_until = until

    async def drain(self) -> None:
        """Every device stops taking frames and delivers its outbox (`EdgeDaemon.drain`)."""
        await asyncio.gather(*(d.drain() for d in self.daemons))

    def summary(self) -> dict[str, dict[str, object]]:
        """Per device: cohort, InferenceEvents produced in its lifetime, outbox depth left.

        What a run's consumer checks delivery against: every produced event
        (`<device>:<seq>`) should be in Kafka once the outbox depth is 0.
        """
        return {
            d.settings.device_id: {
                "cohort": d.settings.cohort,
                "inference_events": d.produced,
                "outbox_depth": d.outbox.depth if d.outbox is not None else None,
            }
            for d in self.daemons
        }

    def totals(self) -> dict[str, int]:
        return {
            "frames": sum(d.stats.frames for d in self.daemons),
            "outbox_depth": sum(d.outbox.depth for d in self.daemons if d.outbox is not None),
        }


def replace_settings(base: EdgeSettings, **changes: object) -> EdgeSettings:
    """A copy of frozen settings with some fields changed (validated again)."""
    return EdgeSettings.model_validate({**base.model_dump(), **changes})
