"""Which offloaded samples are worth training on, and how many: the hard-example router's
pure parts (no Faust, no Kafka; the agent calls these per record).

Filters (`hard_reasons`), one `HardReason` symbol each (schemas/avro/HardExample.avsc):
  DISAGREE        the teacher's label differs from the edge prediction.
  LOW_CONFIDENCE  the edge's confidence is below `confidence_threshold`.
  LOW_MARGIN      top-1 minus top-2 of the edge's probabilities is below `margin_threshold`.
  HIGH_ENTROPY    the edge's normalised entropy H(p) / ln K is above `entropy_threshold`.
  AUDIT           a random audit sample (the device sent it although it was confident).
  DRIFT           the device's cohort is flagged as drifting (by the control plane).
The uncertainty filters follow KubeEdge Sedna's hard-example mining filters
(`ThresholdFilter`: top score below a threshold; `CrossEntropyFilter`: entropy of the
scores, default threshold 0.5) plus the top-2 margin of uncertainty sampling in active
learning (Sedna has no margin class), applied to the edge model's output. A value
exactly at a threshold is not hard (like the device's own rule: confidence >= tau acts
locally). LOW_MARGIN and HIGH_ENTROPY need the edge's full probability vector: an
OffloadRequest carries only the top confidence, so they apply when the caller has the
InferenceEvent's `probs`, and never on a guessed vector.

Budget (`HardExampleBudget`): per tumbling window of `window_s`, at most `per_device_cap`
examples per device and `global_cap` in all, so one noisy device cannot fill a training
run. Near duplicates (`NearDuplicateFilter`): a device that sends the same scene again and
again (a stuck camera) yields one example, not hundreds.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from edgeloop.core.errors import ConfigError, DecodeError

if TYPE_CHECKING:  # the router only reads a verdict; it never loads onnxruntime
    from edgeloop.agents.teacher import TeacherOutput

# The HardReason symbols, in the schema's order (the order `hard_reasons` returns them).
REASONS: Final = ("DISAGREE", "LOW_CONFIDENCE", "LOW_MARGIN", "HIGH_ENTROPY", "AUDIT", "DRIFT")
# Probabilities from a float32 softmax sum to 1 within a few ulps per class.
_PROB_SUM_TOL = 1e-3


@dataclass(frozen=True)
class RouterConfig:
    """The router's parameters (settings: EDGELOOP_AGENTS_...; defaults in brackets).

    confidence_threshold [0.8]: LOW_CONFIDENCE below it. Above the device's factory
        offload threshold, so every offload is a candidate; audits (confident) are not.
    margin_threshold [0.2]: LOW_MARGIN when top-1 - top-2 is below it.
    entropy_threshold [0.5]: HIGH_ENTROPY when H(p)/ln K is above it (the default of
        Sedna's CrossEntropyFilter threshold).
    teacher_min_confidence [0.0]: below it the teacher's label is too unsure to train on
        and the sample is not routed at all (0 = always trust the teacher).
    per_device_cap [50], global_cap [1000], window_s [60.0]: the budget per tumbling window.
    near_dup_hamming [4]: two inputs of one device whose 64-bit difference hashes differ
        in at most this many bits are near duplicates.
    near_dup_history [256]: hashes remembered per device (most recent first).
    near_dup_devices [10000]: devices remembered (least recently seen forgotten first).
    """

    confidence_threshold: float = 0.8
    margin_threshold: float = 0.2
    entropy_threshold: float = 0.5
    teacher_min_confidence: float = 0.0
    per_device_cap: int = 50
    global_cap: int = 1000
    window_s: float = 60.0
    near_dup_hamming: int = 4
    near_dup_history: int = 256
    near_dup_devices: int = 10_000

    def __post_init__(self) -> None:
        for name in (
            "confidence_threshold",
            "margin_threshold",
            "entropy_threshold",
            "teacher_min_confidence",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"RouterConfig.{name}={value} is not in [0, 1]")
        for name in ("per_device_cap", "global_cap", "near_dup_history", "near_dup_devices"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RouterConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.near_dup_hamming <= 64:
            raise ConfigError(f"RouterConfig.near_dup_hamming={self.near_dup_hamming} not in 0..64")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ConfigError(f"RouterConfig.window_s={self.window_s} must be > 0")


def _bad(message: str, field: str) -> DecodeError:
    return DecodeError(message, reason="bad_edge_output", path=field)


def _edge_probs(probs: Sequence[float]) -> npt.NDArray[np.float64]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or len(p) < 2:
        raise _bad(f"probs has {p.size} values; need a vector of at least 2 classes", "probs")
    if not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1.0) > _PROB_SUM_TOL:
        raise _bad(
            f"probs {np.round(p, 4).tolist()} is not a probability vector "
            "(finite, >= 0, summing to 1)",
            "probs",
        )
    return p


def margin(p: npt.NDArray[np.float64]) -> float:
    """Top-1 minus top-2 probability."""
    top2 = np.partition(p, len(p) - 2)[-2:]
    return float(top2[1] - top2[0])


def normalised_entropy(p: npt.NDArray[np.float64]) -> float:
    """H(p) / ln K in [0, 1]: 0 for a one-hot vector, 1 for the uniform one."""
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(len(p)))


def hard_reasons(
    *,
    edge_prediction: int,
    edge_confidence: float,
    edge_probs: Sequence[float] | None,
    teacher: TeacherOutput | None,
    audit: bool,
    drifting: bool,
    cfg: RouterConfig,
) -> list[str]:
    """Every HardReason that applies to one sample, in the schema's order; [] = not hard.

    Args:
        edge_prediction: the edge model's label.
        edge_confidence: the edge's confidence in [0, 1] (as its event reports it).
        edge_probs: the edge's probability vector, when known (InferenceEvent.probs).
        teacher: the teacher's verdict, when one was computed.
        audit: the sample is a random audit.
        drifting: the device's cohort is flagged as drifting.
        cfg: thresholds.

    Returns:
        Symbols from `REASONS`. Empty when nothing applies, or when the teacher's
        confidence is below `cfg.teacher_min_confidence` (its label is not trusted).

    Raises:
        DecodeError: reason bad_edge_output when the confidence or the probabilities are
            not valid (NaN, out of range, not summing to 1).
    """
    if not (math.isfinite(edge_confidence) and 0.0 <= edge_confidence <= 1.0):
        raise _bad(f"confidence {edge_confidence} is not in [0, 1]", "confidence")
    if teacher is not None and teacher.confidence < cfg.teacher_min_confidence:
        return []
    found: set[str] = set()
    if teacher is not None and teacher.label != edge_prediction:
        found.add("DISAGREE")
    if edge_confidence < cfg.confidence_threshold:
        found.add("LOW_CONFIDENCE")
    if edge_probs is not None:
        p = _edge_probs(edge_probs)
        if margin(p) < cfg.margin_threshold:
            found.add("LOW_MARGIN")
        if normalised_entropy(p) > cfg.entropy_threshold:
            found.add("HIGH_ENTROPY")
    if audit:
        found.add("AUDIT")
    if drifting:
        found.add("DRIFT")
    return [r for r in REASONS if r in found]


class HardExampleBudget:
    """Per-device and global caps per tumbling window of `cfg.window_s` seconds.

    Windows are aligned to multiples of `window_s` of the clock the caller passes (event
    time or processing time: the caller's choice). A time older than the current window
    counts against the current one (a late record does not reopen a closed window).
    Memory: one counter per device that got an example in this window (at most
    `global_cap` entries). `refused` counts refusals by reason: device_cap, global_cap.
    """

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self._window = -1
        self._per_device: Counter[str] = Counter()
        self._total = 0
        self.admitted = 0
        self.refused: Counter[str] = Counter()

    @property
    def window(self) -> int:
        """Index of the current window (now_s // window_s)."""
        return self._window

    def admit(self, device_id: str, now_s: float) -> bool:
        """Take one slot for `device_id` at `now_s`; False (and counted) when a cap is hit."""
        window = math.floor(now_s / self.cfg.window_s)
        if window > self._window:
            self._window = window
            self._per_device.clear()
            self._total = 0
        if self._per_device[device_id] >= self.cfg.per_device_cap:
            self.refused["device_cap"] += 1
            return False
        if self._total >= self.cfg.global_cap:
            self.refused["global_cap"] += 1
            return False
        self._per_device[device_id] += 1
        self._total += 1
        self.admitted += 1
        return True


def _image_2d(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    a = np.squeeze(a)
    if a.ndim == 3:  # (C, H, W): the luminance-free mean over channels
        a = a.mean(axis=0)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"cannot hash an input of shape {list(x.shape)}")
    return a


@functools.lru_cache(maxsize=64)
def _area_weights(n: int, m: int) -> npt.NDArray[np.float64]:
    """(m, n) weights: output cell i averages the input cells its span covers (area
    resampling down, nearest-like up). Cached: inputs of one task share a few sizes."""
    w = np.zeros((m, n))
    for i in range(m):
        lo, hi = i * n / m, (i + 1) * n / m
        for j in range(math.floor(lo), math.ceil(hi)):
            w[i, j] = min(hi, j + 1) - max(lo, j)
    norm: npt.NDArray[np.float64] = w / w.sum(axis=1, keepdims=True)
    norm.setflags(write=False)  # shared by every caller through the cache
    return norm


def _resize(a: npt.NDArray[np.float64], rows: int, cols: int) -> npt.NDArray[np.float64]:
    """Area-average resampling to rows x cols, numpy only."""
    out: npt.NDArray[np.float64] = (
        _area_weights(a.shape[0], rows) @ a @ _area_weights(a.shape[1], cols).T
    )
    return out


def difference_hash(x: npt.NDArray[np.floating], size: int = 8) -> int:
    """A 64-bit difference hash (dHash) of an image-like tensor, with a dead band.

    The image is averaged to `size` x (`size` + 1) cells; bit i is set when a cell is
    brighter than its left neighbour by more than 1/16 of the image's range. Differences
    (not levels) make it blind to a brightness offset (preprocessing, exposure); the dead
    band keeps sensor noise in flat regions from flipping bits at random, which a plain
    dHash does on mostly-blank frames.
    """
    a = _resize(_image_2d(x), size, size + 1)
    span = float(a.max() - a.min())
    diff = a[:, 1:] - a[:, :-1]
    bits = (diff > span / 16.0).ravel() if span > 0 else np.zeros(size * size, bool)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


class NearDuplicateFilter:
    """Per device, remembers recent input hashes; a new input within
    `cfg.near_dup_hamming` bits of one of them is a near duplicate.

    Bounded: `cfg.near_dup_history` hashes per device (oldest forgotten first) and
    `cfg.near_dup_devices` devices (least recently seen forgotten first). Counters:
    `checked`, `suppressed`.
    """

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self._by_device: OrderedDict[str, deque[int]] = OrderedDict()
        self.checked = 0
        self.suppressed = 0

    def seen(self, device_id: str, x: npt.NDArray[np.float32]) -> bool:
        """True when `x` nearly repeats a recent input of this device (then counted and
        not remembered again); False, and remembered, otherwise.

        Raises:
            ValueError: `x` cannot be viewed as an image (empty or more than 3 real axes).
        """
        h = difference_hash(x)
        self.checked += 1
        history = self._by_device.get(device_id)
        if history is None:
            history = deque(maxlen=self.cfg.near_dup_history)
            self._by_device[device_id] = history
            if len(self._by_device) > self.cfg.near_dup_devices:
                self._by_device.popitem(last=False)
        else:
            self._by_device.move_to_end(device_id)
        limit = self.cfg.near_dup_hamming
        if any((h ^ old).bit_count() <= limit for old in history):
            self.suppressed += 1
            return True
        history.append(h)
        return False
