"""P(edge wrong | confidence bucket) from importance-weighted teacher verdicts.

Verdicts come from two samples: every offload below tau (inclusion probability 1) and
the random audit above it (probability a, the audit rate). Weighting each verdict by
w = 1/pi (Horvitz-Thompson) makes a bucket that mixes both (tau moved, or tau inside the
bucket) count each sample for the traffic it stands for; without it the estimate is
biased towards the offloaded part. Per bucket b, with S_w = sum w, S_wy = sum w*wrong,
S_w2 = sum w^2 (exponentially forgotten across windows):

    h_b     = S_wy / S_w                   Hajek (self-normalised) error rate
    n_eff_b = S_w^2 / S_w2                 Kish effective sample size
    m_b     = 1 - (b + 1/2) / B            calibration prior: P(wrong) = 1 - confidence
                                           (or a given prior: the fleet's pooled curve)
    p_b     = (s m_b + n_eff_b h_b) / (s + n_eff_b)     Beta(s m_b, s (1 - m_b)) posterior mean

so an empty bucket is its prior (never 0 or 1), and a heavily weighted audit sample
counts as the few observations it is, not as 1/a of them. Last, the p_b are made
non-increasing in confidence by weighted isotonic regression (pool adjacent violators,
weights s + n_eff_b): the controller offloads a prefix of buckets (confidence < tau), and
with monotone estimates "highest expected error first" is that prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeloop.agents.control.signals import bucket_key


@dataclass(slots=True)
class Evidence:
    """Forgotten sums of weighted verdicts per bucket (see the module docstring)."""

    w: list[float] = field(default_factory=list)
    wy: list[float] = field(default_factory=list)
    w2: list[float] = field(default_factory=list)

    def update(self, values: Mapping[str, float], buckets: int, decay: float) -> None:
        """Forget by `decay`, then add one window's `vw_*`, `vwy_*`, `vw2_*` values."""
        if len(self.w) != buckets:
            self.w, self.wy, self.w2 = [0.0] * buckets, [0.0] * buckets, [0.0] * buckets
        for b in range(buckets):
            self.w[b] = decay * self.w[b] + values.get(bucket_key("vw", b), 0.0)
            self.wy[b] = decay * self.wy[b] + values.get(bucket_key("vwy", b), 0.0)
            self.w2[b] = decay * self.w2[b] + values.get(bucket_key("vw2", b), 0.0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"w": list(self.w), "wy": list(self.wy), "w2": list(self.w2)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evidence:
        """Inverse of `to_json`."""
        return cls(list(data["w"]), list(data["wy"]), list(data["w2"]))


def pava_nonincreasing(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares fit of `values` by a non-increasing sequence (PAVA).

    Args:
        values: the raw estimates, in bucket order.
        weights: their positive weights.

    Returns:
        The fitted sequence, same length.
    """
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for mean, _, n in blocks:
        out.extend([mean] * int(n))
    return out


def pooled(evidences: Sequence[Evidence], buckets: int) -> Evidence:
    """The sum of several scopes' evidence (the fleet's, for a shared prior)."""
    out = Evidence([0.0] * buckets, [0.0] * buckets, [0.0] * buckets)
    for ev in evidences:
        for b in range(min(buckets, len(ev.w))):
            out.w[b] += ev.w[b]
            out.wy[b] += ev.wy[b]
            out.w2[b] += ev.w2[b]
    return out


def error_estimates(
    evidence: Evidence,
    buckets: int,
    prior_strength: float,
    prior: Sequence[float] | None = None,
) -> list[float]:
    """p_b for every bucket: the posterior means made monotone (module docstring).

    Args:
        evidence: the forgotten weighted sums (may be empty: all priors).
        buckets: B.
        prior_strength: s, the prior's pseudo-sample count.
        prior: the prior means m_b; default the calibration prior 1 - confidence. The
            controller passes the fleet's pooled estimate (empirical Bayes): cohorts run
            the same model, so a cohort's few audits refine the fleet's curve instead of
            standing alone.

    Returns:
        B estimates in (0, 1), non-increasing in the bucket index.
    """
    raw, weights = [], []
    for b in range(buckets):
        m_b = 1.0 - (b + 0.5) / buckets if prior is None else prior[b]
        w = evidence.w[b] if b < len(evidence.w) else 0.0
        if w > 0:
            hajek = evidence.wy[b] / w
            n_eff = w * w / evidence.w2[b]
        else:
            hajek, n_eff = 0.0, 0.0
        raw.append((prior_strength * m_b + n_eff * hajek) / (prior_strength + n_eff))
        weights.append(prior_strength + n_eff)
    return pava_nonincreasing(raw, weights)
