"""The offload policy: confidence, the decision, the audit sample and the byte budget.

Pure functions and small objects without I/O, so they are unit-tested on their own.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgeloop.core.errors import ConfigError
from edgeloop.schemas.events import ConfidenceKind, Decision, InputEncoding

FloatArray = npt.NDArray[np.float32]

KIND_OF_NAME: dict[str, ConfidenceKind] = {
    "max_prob": "MAX_PROB",
    "margin": "MARGIN",
    "entropy": "ENTROPY",
}


def softmax(logits: FloatArray) -> FloatArray:
    z = logits.astype(np.float64) - float(np.max(logits))
    e = np.exp(z)
    out: FloatArray = (e / e.sum()).astype(np.float32)
    return out


def confidence(probs: FloatArray, kind: ConfidenceKind) -> float:
    """A confidence in [0, 1] for a probability vector; higher means surer.

    - MAX_PROB: the top probability.
    - MARGIN: top minus second probability.
    - ENTROPY: 1 - H(p) / log K (1 for a one-hot vector, 0 for the uniform one).
    """
    if kind == "MAX_PROB":
        return float(np.max(probs))
    if kind == "MARGIN":
        top2 = np.partition(probs, -2)[-2:]
        return float(top2[1] - top2[0])
    if kind == "ENTROPY":
        k = probs.shape[-1]
        p = probs[probs > 0].astype(np.float64)
        h = float(-(p * np.log(p)).sum())
        return max(0.0, 1.0 - h / math.log(k)) if k > 1 else 1.0
    raise ConfigError(f"unknown confidence kind {kind!r}: use MAX_PROB, MARGIN or ENTROPY")


class ByteBudget:
    """Token bucket over offloaded bytes: `rate` bytes/s, at most `burst` saved up.

    A request larger than the burst can never pass, so it is refused (and counted) at once
    rather than waiting forever.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def try_spend(self, n: int, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if n <= self._tokens:
            self._tokens -= n
            return True
        return False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy decided: `decision` is what the event says happened."""

    decision: Decision
    wanted: Decision  # what it would have done without the byte budget
    offload_bytes: bytes | None = None


class OffloadPolicy:
    """c >= tau: act locally (and, with probability audit_rate, audit); else offload.

    An offload or audit whose compressed input does not fit the byte budget is acted on
    locally: the event then says LOCAL and `wanted` keeps what was meant, for the metric.
    """

    def __init__(self, budget: ByteBudget, rng: random.Random) -> None:
        self.budget = budget
        self.rng = rng

    def decide(
        self, c: float, tau: float, audit_rate: float, encode_input: EncodeFn, now: float
    ) -> Verdict:
        if c >= tau:
            if audit_rate <= 0.0 or self.rng.random() >= audit_rate:
                return Verdict("LOCAL", "LOCAL")
            wanted: Decision = "AUDIT"
        else:
            wanted = "OFFLOAD"
        payload = encode_input()
        if not self.budget.try_spend(len(payload), now):
            return Verdict("LOCAL", wanted)
        return Verdict(wanted, wanted, payload)


class EncodeFn:
    """Compresses one raw frame lazily: only offloads and audits pay for it."""

    __slots__ = ("encoding", "raw")

    encoding: InputEncoding

    def __init__(self, raw: npt.NDArray[np.floating]) -> None:
        self.raw = raw
        self.encoding = "U8_ZLIB"

    def __call__(self) -> bytes:
        return compress_frame(self.raw)


def compress_frame(raw: npt.NDArray[np.floating]) -> bytes:
    """A frame in [0, 1] as 8-bit pixels, zlib level 6 (U8_ZLIB): what a sensor gave."""
    u8 = (np.clip(raw, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return zlib.compress(u8.tobytes(), 6)


def decompress_frame(data: bytes, shape: list[int]) -> npt.NDArray[np.float32]:
    u8 = np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(shape)
    return u8.astype(np.float32) / 255.0
