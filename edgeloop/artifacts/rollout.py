"""Which devices a staged release applies to: one rule, shared by the judge and the edge.

A `ModelRelease` CANARY or WAVE step carries `share` s in [0, 1]. A device is a member of
that step iff

    membership_score(model, version, device) < s,
    membership_score = int(sha256("<model>:<version>:<device>").hexdigest()[:16], 16) / 2^64

(the first 64 bits of the digest as a fraction in [0, 1)). Properties the rollout relies on:

- deterministic: the same device gives the same answer on every device and in the cloud,
  after any restart, so the judge knows which devices run the candidate without asking;
- monotone in s: a member at share s stays a member at every larger share (canary devices
  stay in every later wave of the same version);
- uniform: over many device ids the fraction of members is about s (sha256 output bits);
- per release: the version is hashed in, so one model's canary devices are not always the
  same ones.

Edge cases: s <= 0 selects no device, s >= 1 every device (a score is always < 1).

Pure standard library: the edge daemon imports it, so it must never pull in torch, Faust
or aiokafka.
"""

from __future__ import annotations

import hashlib

_TWO_64 = 2.0**64

# The canary stage's share when nothing is configured: the rollout judge's default
# (`JudgeSettings.canary_share`) and the trainer's CANARY release (`TrainerServeSettings.
# canary_share`) both start from it, so a release and its judge agree on who is a member.
DEFAULT_CANARY_SHARE = 0.05


def membership_score(model_name: str, version: int, device_id: str) -> float:
    """The device's position in [0, 1) for this release of this model.

    Args:
        model_name: the model's name, as in `ModelRelease.model_name`.
        version: the candidate version the step installs (`ModelRelease.model_version`).
        device_id: the device's id (its client certificate's CN).

    Returns:
        int(sha256(f"{model_name}:{version}:{device_id}").hexdigest()[:16], 16) / 2^64.
    """
    digest = hashlib.sha256(f"{model_name}:{version}:{device_id}".encode()).hexdigest()
    return int(digest[:16], 16) / _TWO_64


def in_rollout(model_name: str, version: int, device_id: str, share: float) -> bool:
    """Whether a step of share `share` of this release applies to the device.

    Args:
        model_name: the model's name.
        version: the version the step installs.
        device_id: the device's id.
        share: the fraction of the cohort's devices the step applies to (ModelRelease.share).

    Returns:
        True iff membership_score(model_name, version, device_id) < share: no device at
        share 0, every device at share 1.
    """
    return membership_score(model_name, version, device_id) < share
