"""The judge's statistical tests, in plain Python and numpy.

scipy is in the trainer extra only; the agents run with the cloud extra, so the two
tests the judge needs are implemented here (and checked against scipy in the unit
tests): the two-proportion z-test and the Mann-Whitney U test with the normal
approximation, tie correction and continuity correction (scipy's `method="asymptotic"`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def norm_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def norm_ppf_upper(alpha: float) -> float:
    """z with P(Z > z) = alpha (bisection; alpha in (0, 0.5))."""
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if norm_sf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True, slots=True)
class ProportionTest:
    """Canary minus control of a proportion, with a one-sided test that it is higher."""

    p_canary: float
    p_control: float
    diff: float
    z: float  # pooled two-proportion z statistic
    p_value: float  # one-sided: canary higher
    upper: float  # one-sided upper confidence bound of diff (unpooled Wald)


def two_proportion(k1: int, n1: int, k2: int, n2: int, alpha: float) -> ProportionTest:
    """Two-proportion z-test of H0: p1 <= p2 against p1 > p2 (sample 1 = canary).

    z = (p1 - p2) / sqrt(p (1 - p) (1/n1 + 1/n2)), p = (k1 + k2) / (n1 + n2); the upper
    bound uses the unpooled standard error sqrt(p1 (1-p1)/n1 + p2 (1-p2)/n2).

    Raises:
        ValueError: a sample is empty.
    """
    if n1 <= 0 or n2 <= 0:
        raise ValueError("two_proportion needs two non-empty samples")
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    # se is 0 only when both samples are all 0 or all 1: no difference.
    z = (p1 - p2) / se if se > 0 else 0.0
    se_u = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    upper = (p1 - p2) + norm_ppf_upper(alpha) * se_u
    return ProportionTest(p1, p2, p1 - p2, z, norm_sf(z), upper)


@dataclass(frozen=True, slots=True)
class RankTest:
    """Mann-Whitney U of canary against control, and the Hodges-Lehmann shift."""

    u: float  # U of the canary sample
    z: float
    p_greater: float  # one-sided: canary stochastically greater
    p_less: float  # one-sided: canary stochastically smaller
    shift: float  # Hodges-Lehmann: median of canary_i - control_j


def _average_ranks(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Ranks 1..n (ties share their average) and sum over tie groups of t^3 - t."""
    order = np.argsort(values, kind="mergesort")
    sorted_v = values[order]
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(avg, counts)
    ties = float(np.sum(counts.astype(float) ** 3 - counts))
    return ranks, ties


def mann_whitney(canary: Sequence[float], control: Sequence[float]) -> RankTest:
    """Mann-Whitney U test with the normal approximation (as Kayenta judges a metric).

    U1 = R1 - n1 (n1 + 1) / 2, mean n1 n2 / 2, variance
    n1 n2 / 12 * ((n + 1) - sum(t^3 - t) / (n (n - 1))) over tie groups of size t, and a
    continuity correction of 1/2 towards the mean.

    Raises:
        ValueError: a sample is empty.
    """
    x, y = np.asarray(canary, dtype=float), np.asarray(control, dtype=float)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney needs two non-empty samples")
    n = n1 + n2
    ranks, ties = _average_ranks(np.concatenate([x, y]))
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    mu = n1 * n2 / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:  # every value equal
        z_g = z_l = 0.0
    else:
        sd = math.sqrt(var)
        z_g = (u1 - mu - 0.5) / sd
        z_l = (u1 - mu + 0.5) / sd
    shift = float(np.median(np.subtract.outer(x, y)))
    z = (u1 - mu) / math.sqrt(var) if var > 0 else 0.0
    return RankTest(u1, z, norm_sf(z_g), 1.0 - norm_sf(z_l), shift)
