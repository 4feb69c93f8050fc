"""ThresholdUpdate and CloudVerdict handling: small, synchronous, version-gated."""

from __future__ import annotations

import time
from collections.abc import Callable

from edgeloop.core.logs import get_logger
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.pipeline import PendingVerdicts
from edgeloop.edge.state import AppliedThreshold, StateFile
from edgeloop.schemas.events import CloudVerdict, ThresholdUpdate

log = get_logger(__name__)


def threshold_applies(update: ThresholdUpdate, device_id: str, cohort: str) -> bool:
    scope, scope_id = update["scope"], update["scope_id"]
    return (
        (scope == "DEVICE" and scope_id == device_id)
        or (scope == "COHORT" and scope_id == cohort)
        or scope == "FLEET"
    )


class ThresholdGate:
    """Applies a ThresholdUpdate only when its version is newer than the applied one.

    Retained updates come back on every reconnect; an older or equal version is a no-op
    (counted as stale), so a stale broker copy can never roll the threshold back.
    """

    def __init__(
        self,
        *,
        device_id: str,
        cohort: str,
        state: StateFile,
        metrics: EdgeMetrics,
        on_apply: Callable[[AppliedThreshold], None],
    ) -> None:
        self.device_id = device_id
        self.cohort = cohort
        self.state = state
        self.metrics = metrics
        self.on_apply = on_apply

    def handle(self, update: ThresholdUpdate) -> str:
        outcome = self._handle(update)
        self.metrics.updates.labels(self.device_id, "threshold", outcome).inc()
        return outcome

    def _handle(self, update: ThresholdUpdate) -> str:
        if not threshold_applies(update, self.device_id, self.cohort):
            return "other_scope"
        current = self.state.current.threshold
        if update["threshold_version"] <= current.version:
            return "stale"
        if not 0.0 <= update["tau"] <= 1.0 or not 0.0 <= update["audit_rate"] <= 1.0:
            return "refused:range"
        kind = update["confidence_kind"]
        applied = AppliedThreshold(
            version=update["threshold_version"],
            tau=float(update["tau"]),
            # UNKNOWN (a newer controller's symbol we cannot read) keeps our measure.
            confidence_kind=current.confidence_kind if kind == "UNKNOWN" else kind,
            audit_rate=float(update["audit_rate"]),
            scope=update["scope"],
        )
        # Persist first: what is reported as applied must survive a reboot.
        self.state.update(threshold=applied)
        self.on_apply(applied)
        self.metrics.applied_version.labels(self.device_id, self.cohort, "threshold").set(
            applied.version
        )
        log.info(
            "threshold applied",
            extra={"device": self.device_id, "version": applied.version, "tau": applied.tau},
        )
        return "applied"


class VerdictCounter:
    """Matches CloudVerdicts to this device's offloads and counts agreement."""

    def __init__(self, device_id: str, pending: PendingVerdicts, metrics: EdgeMetrics) -> None:
        self.device_id = device_id
        self.pending = pending
        self.metrics = metrics
        self.agree = 0
        self.disagree = 0
        self.unmatched = 0

    def handle(self, verdict: CloudVerdict) -> str:
        taken = self.pending.take(verdict["request_event_id"])
        prediction = None if taken is None else taken[0]
        if taken is not None and taken[1] is not None:
            # The device's own round trip: offload stored -> verdict back (the demo's
            # "offload -> verdict" latency, outbox wait and both MQTT legs included).
            latency = time.monotonic() - taken[1]
            self.metrics.verdict_latency.labels(self.device_id).observe(latency)
        if prediction is None:
            self.unmatched += 1
            outcome = "unmatched"
        elif prediction == verdict["label"]:
            self.agree += 1
            outcome = "agree"
        else:
            self.disagree += 1
            outcome = "disagree"
        self.metrics.verdicts.labels(self.device_id, outcome).inc()
        return outcome
