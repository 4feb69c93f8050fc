"""`edgeloop models release`: an operator publishes a FULL or CANARY `ModelRelease`.

Two needs `train serve` does not cover (docs/architecture.md, "Operator releases"):

- the bootstrap model's FULL release: the rollout judge remembers, per cohort, the FULL
  release a ROLLBACK reinstalls, and does not judge a CANARY whose parent's FULL release
  it never saw (`rollouts_unparented`). `models bootstrap` only stores v1; this publishes
  it as what the cohort runs;
- a CANARY the gate did not pass (the closed-loop demo's deliberately bad release, or an
  emergency fix), allowed only with `--override-gate REASON`, which is logged at WARNING
  with the operator and kept in the record's `reason`.

Rules, checked before anything is published (a violation is a `ConfigError` naming the
option and the value, or the artifact's `VerificationError`):

1. the version is in the store (`<home>/store/<model>/<version>/`) and verifies as a
   device verifies it: signature under the release public key, every file's sha256, no
   unsigned file, validity window; and its manifest names that model and version;
2. a gate passed it (`gate_evidence.py`), or `--override-gate` gives the reason; an
   override never skips rule 1: a tampered artifact is refused either way;
3. CANARY: `share` in (0, 1) (default the judge's canary share), and a parent version
   (given, or the signed lineage's) older than the candidate and in the store; FULL:
   share 1.0, the parent optional (given, or the lineage's);
4. at least one cohort; each non-empty, at most 128 characters, no whitespace or control
   characters (it is the record's Kafka key and the judge's table key).

Each cohort gets one record (key = cohort), in the shape `train serve` writes
(release_events.py: `release_record`). Its `event_id` is uuid5 of (model, version, cohort,
stage, parent): running the command again publishes the same id, and consumers drop it.
"""

from __future__ import annotations

import getpass
import json
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.artifacts.manifest import MANIFEST_NAME, Manifest
from edgeloop.artifacts.verify import verify_artifact
from edgeloop.core.errors import ConfigError
from edgeloop.core.logs import get_logger
from edgeloop.trainer.gate_evidence import gate_evidence, places
from edgeloop.trainer.home import TrainerHome
from edgeloop.trainer.release_events import EventPublisher, artifact_location, now_us

log = get_logger(__name__)

RELEASED_BY = "edgeloop models release"
STAGES = ("FULL", "CANARY")
# Not the trainer's nor the judge's namespace: an operator's FULL of v3 to a cohort is a
# different event from the judge's promotion of v3 there, and must not be dropped as it.
_OPERATOR_NS = uuid.UUID("3b8e5f1c-9a2d-4e7b-8c61-0d4f2a7e9b35")
_MAX_COHORT = 128


def operator_event_id(model: str, version: int, cohort: str, stage: str, parent: int | None) -> str:
    """The record's event id: the same release asked for twice is one event.

    Args:
        model: the model name.
        version: the released version.
        cohort: the cohort (the record's key).
        stage: FULL or CANARY.
        parent: the parent version, or None.

    Returns:
        uuid5 of "operator-release:<model>:<version>:<cohort>:<stage>:<parent>", text form.
    """
    return str(
        uuid.uuid5(_OPERATOR_NS, f"operator-release:{model}:{version}:{cohort}:{stage}:{parent}")
    )


@dataclass(frozen=True)
class ReleaseRequest:
    """What the operator asked for, as given on the command line."""

    model_name: str
    stage: str  # full | canary (any case)
    cohorts: tuple[str, ...]
    version: int | None = None  # None: the newest in the store
    share: float | None = None  # None: the judge's canary share (CANARY), 1.0 (FULL)
    parent_version: int | None = None  # None: the signed lineage's parent
    override_gate: str | None = None


@dataclass(frozen=True)
class ReleasePlan:
    """A checked release: everything the records say, before anything is published."""

    model_name: str
    version: int
    stage: str
    cohorts: tuple[str, ...]
    share: float
    parent_version: int | None
    artifact_url: str
    manifest_sha256: str
    target: str
    reason: dict[str, Any]

    @property
    def overridden(self) -> bool:
        return self.reason.get("gate") == "overridden"


@dataclass(frozen=True)
class Published:
    """One record Kafka acknowledged."""

    cohort: str
    event_id: str
    topic: str
    partition: int
    offset: int


def check_cohorts(cohorts: tuple[str, ...]) -> tuple[str, ...]:
    """Rule 4: at least one cohort, each usable as a Kafka key (duplicates dropped).

    Args:
        cohorts: the `--cohort` values, in the order given.

    Returns:
        The cohorts, first occurrence kept.

    Raises:
        ConfigError: none given, or one is empty, too long, or has whitespace/control
            characters; the message names `--cohort` and the value.
    """
    if not cohorts:
        raise ConfigError("--cohort is required (at least one cohort to release to)")
    for cohort in cohorts:
        if (
            not cohort
            or len(cohort) > _MAX_COHORT
            or any(c.isspace() or not c.isprintable() for c in cohort)
        ):
            raise ConfigError(
                f"--cohort {cohort!r}: a cohort is 1-{_MAX_COHORT} characters without "
                "whitespace or control characters"
            )
    return tuple(dict.fromkeys(cohorts))


def check_stage_and_share(
    stage: str, share: float | None, default_share: float
) -> tuple[str, float]:
    """Rule 3's share part: FULL is every device; a CANARY a share in (0, 1).

    Args:
        stage: the `--stage` value (full or canary, any case).
        share: the `--share` value, or None.
        default_share: the rollout judge's canary share (EDGELOOP_CONTROL_JUDGE__CANARY_SHARE).

    Returns:
        (FULL or CANARY, the record's share).

    Raises:
        ConfigError: an unknown stage, `--share` with FULL, or a share outside (0, 1).
    """
    upper = stage.upper()
    if upper not in STAGES:
        raise ConfigError(f"--stage {stage!r}: expected full or canary")
    if upper == "FULL":
        if share is not None:
            raise ConfigError(f"--share {share}: a FULL release goes to every device (share 1.0)")
        return upper, 1.0
    chosen = default_share if share is None else share
    if not 0 < chosen < 1:  # the judge's own bounds: a control arm must remain
        raise ConfigError(f"--share {chosen}: a CANARY's share must be above 0 and below 1")
    return upper, chosen


def verified_manifest(
    home: TrainerHome, model: str, version: int, public_key: Ed25519PublicKey
) -> Manifest:
    """Rule 1: the stored version verifies exactly as a device verifies it.

    Args:
        home: the trainer home.
        model: the model name.
        version: the version to release.
        public_key: the release public key devices hold.

    Returns:
        The verified manifest.

    Raises:
        ConfigError: the version is not in the store (names the folder and `edgeloop
            models bootstrap`), or its manifest names another model or version.
        VerificationError: signature, hashes, unsigned files or validity window.
    """
    folder = home.root / "store" / model / str(version)
    if not (folder / MANIFEST_NAME).is_file():
        raise ConfigError(
            f"--version {version}: {model} v{version} is not in the store {folder.parent} "
            f"(stored: {sorted(home.store.versions(model)) or 'none'}); release a stored "
            "version, or create v1 with `edgeloop models bootstrap`"
        )
    # The device checks the target against its own; here the record carries the manifest's,
    # so the check is made with it. Signature, hashes and dates are checked as on a device.
    target = Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes()).target
    manifest = verify_artifact(folder, public_key, target=target)
    if (manifest.model_name, manifest.version) != (model, version):
        raise ConfigError(
            f"{folder}: its signed manifest is {manifest.model_name} v{manifest.version}, "
            f"not {model} v{version}; the store is inconsistent"
        )
    return manifest


def _parent(req: ReleaseRequest, stage: str, manifest: Manifest, home: TrainerHome) -> int | None:
    parent = (
        req.parent_version if req.parent_version is not None else manifest.lineage.parent_version
    )
    if parent is None:
        if stage == "CANARY":
            raise ConfigError(
                f"--parent-version is required: {manifest.model_name} v{manifest.version}'s "
                "lineage names no parent, and a CANARY needs the version a rollback reinstalls"
            )
        return None
    if not 1 <= parent < manifest.version:
        raise ConfigError(
            f"--parent-version {parent}: must be older than the released v{manifest.version}"
        )
    if stage == "CANARY" and parent not in home.store.versions(manifest.model_name):
        raise ConfigError(
            f"--parent-version {parent}: {manifest.model_name} v{parent} is not in the store "
            f"{home.root / 'store' / manifest.model_name}"
        )
    return parent


def plan_release(
    req: ReleaseRequest,
    home: TrainerHome,
    public_key: Ed25519PublicKey,
    *,
    default_share: float,
    artifact_base_url: str | None = None,
    operator: str | None = None,
) -> ReleasePlan:
    """Check every rule (module docstring) and build what the records will say.

    Args:
        req: the operator's request.
        home: the trainer home whose store holds the version.
        public_key: the release public key.
        default_share: the judge's canary share, for a CANARY without `share`.
        artifact_base_url: where the store is served; None gives file:// URLs.
        operator: who asks (default `getpass.getuser()`), kept in `reason`.

    Returns:
        The checked plan; nothing was published.

    Raises:
        ConfigError: a rule is broken; the message names the option and value.
        VerificationError: the artifact fails a device's verification.
    """
    stage, share = check_stage_and_share(req.stage, req.share, default_share)
    cohorts = check_cohorts(req.cohorts)
    if req.override_gate is not None and not req.override_gate.strip():
        raise ConfigError("--override-gate '': give the reason the gate is overridden")
    model = req.model_name
    version = req.version
    if version is None:
        version = max(home.store.versions(model), default=0)
        if version == 0:
            raise ConfigError(
                f"--model {model}: no version in the store {home.root / 'store' / model}; "
                "run `edgeloop models bootstrap` first"
            )
    manifest = verified_manifest(home, model, version, public_key)
    parent = _parent(req, stage, manifest, home)
    who = operator if operator is not None else getpass.getuser()
    reason: dict[str, Any] = {"operator": who, "released_by": RELEASED_BY}
    evidence = gate_evidence(home, manifest)
    if evidence is not None:
        reason.update(gate="passed", gate_record=str(evidence.source),
                      trigger_id=evidence.trigger_id)  # fmt: skip
        if req.override_gate is not None:
            log.warning(
                "--override-gate ignored: a gate passed this version",
                extra={"model": model, "version": version, "gate_record": str(evidence.source)},
            )
    elif req.override_gate is None:
        looked = ", ".join(str(p) for p in places(home, manifest)) or "its lineage names no run"
        raise ConfigError(
            f"--version {version}: no gate passed {model} v{version} (looked in: {looked}); "
            "pass --override-gate REASON to release it anyway (logged, and kept in the record)"
        )
    else:
        reason.update(gate="overridden", override=req.override_gate)
    url, sha, target = artifact_location(home, model, version, artifact_base_url)
    return ReleasePlan(model_name=model, version=version, stage=stage, cohorts=cohorts,
                       share=share, parent_version=parent, artifact_url=url,
                       manifest_sha256=sha, target=target, reason=reason)  # fmt: skip


def release_record(plan: ReleasePlan, cohort: str, ts_us: int | None = None) -> dict[str, Any]:
    """One cohort's `ModelRelease`, the shape `train serve` writes (release_events.py).

    Args:
        plan: the checked release.
        cohort: the cohort (the record's key).
        ts_us: the event time; None = now.

    Returns:
        The ModelRelease record, Avro-shaped; `reason` is compact, sorted JSON.
    """
    return {
        "event_id": operator_event_id(
            plan.model_name, plan.version, cohort, plan.stage, plan.parent_version
        ),
        "ts": now_us() if ts_us is None else ts_us,
        "model_name": plan.model_name,
        "model_version": plan.version,
        "cohort": cohort,
        "stage": plan.stage,
        "wave": 0,
        "artifact_url": plan.artifact_url,
        "manifest_sha256": plan.manifest_sha256,
        "target": plan.target,
        "parent_version": plan.parent_version,
        "reason": json.dumps(plan.reason, sort_keys=True, separators=(",", ":")),
        "share": plan.share,
    }


async def publish_release(
    plan: ReleasePlan, publisher: EventPublisher, topic: str
) -> list[Published]:
    """Publish the plan's records, one per cohort, each acknowledged by Kafka.

    An override is logged at WARNING first, with the operator and the reason.

    Args:
        plan: the checked release (`plan_release`).
        publisher: the trainer's publisher (registers the schema, waits for acks=all).
        topic: the releases topic (`ml.model-releases.v1`).

    Returns:
        Where each record landed, in cohort order.

    Raises:
        KafkaError: Kafka refused or timed out; records before it are published (a rerun
            publishes the same ids again, which consumers drop).
        RegistryUnavailableError: the registry did not answer.
    """
    if plan.overridden:
        log.warning(
            "release gate overridden",
            extra={"operator": plan.reason["operator"], "override": plan.reason["override"],
                   "model": plan.model_name, "version": plan.version, "stage": plan.stage,
                   "cohorts": ",".join(plan.cohorts)},
        )  # fmt: skip
    out: list[Published] = []
    for cohort in plan.cohorts:
        record = release_record(plan, cohort)
        meta = await publisher.publish(topic, "ModelRelease", cohort, record)
        out.append(Published(cohort, record["event_id"], meta.topic, meta.partition, meta.offset))
        log.info("model release published", extra={"model": plan.model_name,
                 "version": plan.version, "stage": plan.stage, "cohort": cohort,
                 "partition": meta.partition, "offset": meta.offset})  # fmt: skip
    return out
