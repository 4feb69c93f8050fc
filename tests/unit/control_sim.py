"""A small simulated fleet for the control-plane unit tests.

Each cohort has a traffic rate, a distribution of edge confidence over the fixed buckets,
and a probability that the edge is wrong in each bucket. A window draws Poisson event
counts per bucket, offloads the buckets below the cohort's tau, audits the others at the
audit rate, draws the teacher's verdicts, and serves offloads with a teacher of capacity
C (a backlog becomes lag). It returns the StreamSignal `values` the signals module
writes, so the controller is driven as in production, and what really happened (offered
load per second) so a test can judge the controller by its effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeloop.agents.control.histograms import psi
from edgeloop.agents.control.signals import bucket_key
from edgeloop.agents.control.threshold import WindowInputs

B = 20
W = 60.0  # seconds per window
US = 1_000_000
T0 = 1_800_000_000 * US  # a window-aligned start time


def beta_pmf(a: float, b: float, buckets: int = B) -> np.ndarray:
    """Confidence distribution over the buckets: a Beta(a, b) density, discretised."""
    mids = (np.arange(buckets) + 0.5) / buckets
    dens = mids ** (a - 1) * (1 - mids) ** (b - 1)
    return dens / dens.sum()


def calibrated_error(scale: float = 1.0, buckets: int = B) -> np.ndarray:
    """P(edge wrong | bucket): 1 - confidence, scaled (a drifting model is worse)."""
    mids = (np.arange(buckets) + 0.5) / buckets
    return np.clip(scale * (1 - mids) ** 1.5, 0.0, 0.95)


@dataclass
class CohortModel:
    rate: float  # events/s
    pmf: np.ndarray
    err: np.ndarray
    reference: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.reference = self.pmf.copy()


@dataclass
class WindowResult:
    inputs: WindowInputs
    offered_per_s: float  # offloads + audits the fleet really sent
    offloads_per_s: dict[str, float]
    audits_per_s: dict[str, float]
    lag_s: float


@dataclass
class Fleet:
    cohorts: dict[str, CohortModel]
    capacity: float
    seed: int = 7
    backlog: float = 0.0
    window: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def run(self, taus: dict[str, float], audits: dict[str, float]) -> WindowResult:
        """One window under the given taus and audit rates."""
        cohort_values: dict[str, dict[str, float]] = {}
        offered = 0.0
        off_s: dict[str, float] = {}
        aud_s: dict[str, float] = {}
        for name, m in sorted(self.cohorts.items()):
            # Before the first update a device runs the edge's factory default (tau 0.8,
            # no audits).
            k = round(taus.get(name, 0.8) * B)
            a = audits.get(name, 0.0)
            counts = self.rng.poisson(m.rate * W * m.pmf)
            v: dict[str, float] = {"window_s": W, "events": float(counts.sum())}
            n_off = n_aud = 0
            for b in range(B):
                n = int(counts[b])
                v[bucket_key("conf", b)] = float(n)
                if b < k:
                    sent, weight = n, 1.0
                    n_off += n
                else:
                    sent = int(self.rng.binomial(n, a))
                    weight = 1.0 / a if a > 0 else 0.0
                    n_aud += sent
                wrong = int(self.rng.binomial(sent, m.err[b]))
                v[bucket_key("vw", b)] = sent * weight
                v[bucket_key("vwy", b)] = wrong * weight
                v[bucket_key("vw2", b)] = sent * weight * weight
            v["offload_rate"] = n_off / max(1, counts.sum())
            v["audit_rate"] = n_aud / max(1, counts.sum() - n_off)
            v["confidence_psi"] = psi(counts.tolist(), m.reference.tolist(), 1e-4)
            off_s[name], aud_s[name] = n_off / W, n_aud / W
            offered += (n_off + n_aud) / W
            cohort_values[name] = v
        # The teacher serves at most `capacity` per second; the rest waits (lag).
        self.backlog = max(0.0, self.backlog + (offered - self.capacity) * W)
        lag_s = self.backlog / self.capacity
        self.window += 1
        end = T0 + self.window * int(W * US)
        fleet = {
            "teacher_capacity_per_s": self.capacity,
            "offload_lag_s": lag_s,
            "verdict_latency_p99_ms": 50.0,
        }
        return WindowResult(
            WindowInputs(end, cohort_values, {}, fleet), offered, off_s, aud_s, lag_s
        )


def standard_fleet(capacity: float, seed: int = 7) -> Fleet:
    """Three cohorts of different size and confidence profile."""
    return Fleet(
        {
            "indoor": CohortModel(30.0, beta_pmf(6, 1.5), calibrated_error()),
            "outdoor": CohortModel(20.0, beta_pmf(4, 1.5), calibrated_error()),
            "night": CohortModel(10.0, beta_pmf(3, 1.5), calibrated_error()),
        },
        capacity=capacity,
        seed=seed,
    )


def assert_finite(x: float) -> None:
    assert math.isfinite(x)
