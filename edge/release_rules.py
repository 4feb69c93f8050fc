"""Which model release a device installs: the decision before any download.

The rules (docs/architecture.md, "Staged rollouts and rollback on the device"):

- REFUSED, UNKNOWN: never applied (a record of the rollout);
- CANARY, WAVE: the cohort matches and `in_rollout(name, version, device, share)`; the
  version is strictly newer than the running one and not withdrawn;
- FULL: the cohort matches (every device); strictly newer, not withdrawn;
- ROLLBACK: the cohort matches and the device runs `parent_version` (the withdrawn
  version); `model_version` must be older than `parent_version`.

A ROLLBACK is the only way a device installs an older version; the artifact it names is
verified exactly as any other (signature, hashes, target, validity window), only the
"strictly newer" check is replaced by "exactly the version the release names". Every
device of the cohort that sees a ROLLBACK remembers `parent_version` as withdrawn, so a
redelivered CANARY/WAVE/FULL of that version cannot bring it back (a member that was
rolled back, and a non-member that never ran it alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeloop.artifacts.errors import ArtifactError
from edgeloop.artifacts.rollout import in_rollout
from edgeloop.schemas.events import ModelRelease

APPLY_STAGES = frozenset({"CANARY", "WAVE", "FULL", "ROLLBACK"})
STAGED = frozenset({"CANARY", "WAVE"})
# Cohort names a release may use to mean every device.
FLEET_COHORTS = frozenset({"*", "all", "fleet"})


class ReleaseRefusedError(ArtifactError):
    """A release was not applied; `reason` is the metric label."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Running:
    """What the device serves now, and what it must never install again."""

    device_id: str
    cohort: str
    target: str
    model_name: str | None  # None before the first model is installed
    version: int  # 0 before the first model
    withdrawn: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Install:
    """Download and install the release's artifact.

    `min_version`: the `verify_artifact` bound (the running version; None for a rollback,
    whose artifact must instead be exactly `release.model_version`, which the updater
    checks against the signed manifest).
    """

    min_version: int | None
    rollback: bool


def share_of(release: ModelRelease) -> float:
    """The release's share; 1.0 for a record written before the field existed."""
    return float(release.get("share", 1.0))


def decide(release: ModelRelease, running: Running) -> Install | str:
    """Decide one release against the running model.

    Args:
        release: the decoded ModelRelease.
        running: the device and the model it serves.

    Returns:
        An `Install`, or the outcome label of a release with nothing to do (not an
        error; counted): `ignored_stage`, `other_cohort`, `not_member`, `stale`,
        `withdrawn`, `not_withdrawn`.

    Raises:
        ReleaseRefusedError: the release cannot apply to this device (`model_name`,
            `target`, `rollback_parent`, `rollback_version`); counted and reported in
            DeviceStatus.last_error.
    """
    stage = release["stage"]
    if stage not in APPLY_STAGES:
        return "ignored_stage"  # REFUSED / UNKNOWN: a record of the rollout
    if release["cohort"] != running.cohort and release["cohort"] not in FLEET_COHORTS:
        return "other_cohort"  # e.g. a canary for another cohort
    if running.model_name is not None and release["model_name"] != running.model_name:
        raise ReleaseRefusedError(
            f"is not the model this device runs ({running.model_name})", reason="model_name"
        )
    if stage == "ROLLBACK":
        return _rollback(release, running)
    return _upgrade(release, running)


def _upgrade(release: ModelRelease, running: Running) -> Install | str:
    version = release["model_version"]
    if version <= running.version:
        # Retained releases come back on every reconnect, and an older version is never
        # installed by anything but a ROLLBACK: nothing to do, not an error.
        return "stale"
    if version in running.withdrawn:
        return "withdrawn"
    if release["stage"] in STAGED and not in_rollout(
        release["model_name"], version, running.device_id, share_of(release)
    ):
        return "not_member"  # keeps its model; the judge's control group
    _check_target(release, running)
    return Install(min_version=running.version, rollback=False)


def _rollback(release: ModelRelease, running: Running) -> Install | str:
    version, withdrawn = release["model_version"], release["parent_version"]
    if withdrawn is None:
        raise ReleaseRefusedError(
            "a ROLLBACK must name the withdrawn version in parent_version",
            reason="rollback_parent",
        )
    if version >= withdrawn:
        raise ReleaseRefusedError(
            f"a ROLLBACK to v{version} must name a version older than the withdrawn v{withdrawn}",
            reason="rollback_version",
        )
    if running.version == version:
        return "stale"  # already back (a retained rollback seen again)
    if running.version != withdrawn:
        return "not_withdrawn"  # e.g. not a canary member: it never ran the bad version
    _check_target(release, running)
    return Install(min_version=None, rollback=True)


def _check_target(release: ModelRelease, running: Running) -> None:
    if release["target"] != running.target:
        raise ReleaseRefusedError(
            f"targets {release['target']!r}, this device is {running.target!r}", reason="target"
        )


def withdraws(release: ModelRelease, running: Running) -> int | None:
    """The version a ROLLBACK for this device's cohort and model withdraws, else None.

    Remembered by every device of the cohort before the rollback is decided, so that a
    device that never ran the withdrawn version does not install it from a redelivered
    CANARY/WAVE/FULL either. The release event itself is not signed (its artifact is):
    a forged ROLLBACK can at worst make a device skip a version, never install one.

    Args:
        release: the decoded ModelRelease.
        running: the device and the model it serves.

    Returns:
        `parent_version` of a ROLLBACK that applies to this cohort and model, else None.
    """
    if release["stage"] != "ROLLBACK":
        return None
    if release["cohort"] != running.cohort and release["cohort"] not in FLEET_COHORTS:
        return None
    if running.model_name is not None and release["model_name"] != running.model_name:
        return None
    return release["parent_version"]


def supersedes(new: ModelRelease, waiting: ModelRelease | None) -> bool:
    """Whether `new` replaces the release waiting to be applied (one slot is kept).

    A newer version replaces an older one; a ROLLBACK replaces a waiting release of the
    version it withdraws (or older), and only a version newer than the withdrawn one
    replaces a waiting ROLLBACK, so a redelivered canary cannot cancel its own rollback.

    Args:
        new: the release just received.
        waiting: the one not yet applied, if any.

    Returns:
        True when `new` should be kept instead of `waiting`.
    """
    if waiting is None:
        return True
    if new["stage"] == "ROLLBACK":
        return (new["parent_version"] or 0) >= waiting["model_version"]
    if waiting["stage"] == "ROLLBACK":
        return new["model_version"] > (waiting["parent_version"] or 0)
    return new["model_version"] >= waiting["model_version"]
