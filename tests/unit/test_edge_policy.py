"""The offload policy: confidence measures, threshold, audit sample, byte budget."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from edgeloop.edge.policy import (
    ByteBudget,
    OffloadPolicy,
    compress_frame,
    confidence,
    decompress_frame,
    softmax,
)


def probs(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def test_confidence_measures() -> None:
    p = probs(0.7, 0.2, 0.1)
    assert confidence(p, "MAX_PROB") == pytest.approx(0.7)
    assert confidence(p, "MARGIN") == pytest.approx(0.5)
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert confidence(p, "ENTROPY") == pytest.approx(1 - h / math.log(3), rel=1e-5)
    assert confidence(probs(1, 0, 0), "ENTROPY") == pytest.approx(1.0)
    assert confidence(probs(0.25, 0.25, 0.25, 0.25), "ENTROPY") == pytest.approx(0.0, abs=1e-6)


def test_softmax_is_a_distribution() -> None:
    p = softmax(np.asarray([1000.0, 999.0, -5.0], dtype=np.float32))
    assert p.sum() == pytest.approx(1.0)
    assert p.argmax() == 0


def policy(rate: float = 1e9, burst: int = 10**9, seed: int = 0) -> OffloadPolicy:
    return OffloadPolicy(ByteBudget(rate, burst, now=0.0), random.Random(seed))


def test_threshold_decides_local_or_offload() -> None:
    pol = policy()
    assert pol.decide(0.9, 0.8, 0.0, lambda: b"x", 0.0).decision == "LOCAL"
    assert pol.decide(0.8, 0.8, 0.0, lambda: b"x", 0.0).decision == "LOCAL"  # c >= tau
    off = pol.decide(0.5, 0.8, 0.0, lambda: b"xyz", 0.0)
    assert off.decision == "OFFLOAD"
    assert off.offload_bytes == b"xyz"


def test_audit_sample_rate_above_threshold() -> None:
    pol = policy(seed=1)
    n = 20_000
    audits = sum(
        pol.decide(0.95, 0.8, 0.1, lambda: b"x", 0.0).decision == "AUDIT" for _ in range(n)
    )
    assert 0.08 * n < audits < 0.12 * n
    assert all(
        pol.decide(0.95, 0.8, 0.0, lambda: b"x", 0.0).decision == "LOCAL" for _ in range(500)
    )


def test_no_input_is_compressed_for_a_local_decision() -> None:
    def boom() -> bytes:
        raise AssertionError("compressed a frame that stays local")

    assert policy().decide(0.99, 0.5, 0.0, boom, 0.0).decision == "LOCAL"


def test_byte_budget_caps_offloads_and_refills() -> None:
    pol = policy(rate=100.0, burst=250)
    payload = b"x" * 100
    got = [pol.decide(0.1, 0.8, 0.0, lambda: payload, 0.0) for _ in range(4)]
    assert [v.decision for v in got] == ["OFFLOAD", "OFFLOAD", "LOCAL", "LOCAL"]
    assert got[2].wanted == "OFFLOAD"  # what it meant to do is kept for the metric
    assert got[2].offload_bytes is None
    # One second later 100 bytes more are available: exactly one more offload.
    later = [pol.decide(0.1, 0.8, 0.0, lambda: payload, 1.0).decision for _ in range(2)]
    assert later == ["OFFLOAD", "LOCAL"]


def test_request_larger_than_burst_never_passes() -> None:
    budget = ByteBudget(1e6, 10, now=0.0)
    assert not budget.try_spend(11, now=100.0)
    assert budget.try_spend(10, now=100.0)


def test_frame_compression_roundtrip() -> None:
    frame = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    data = compress_frame(frame)
    back = decompress_frame(data, [8, 8])
    assert np.abs(back - frame).max() <= 1 / 255 + 1e-6
