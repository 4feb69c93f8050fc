"""Staged rollouts on the device: the shared membership rule, the update decision table
(stage x membership x version order x signature), rollback, and the uplink's bytes/s."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgeloop.artifacts.rollout import in_rollout, membership_score
from edgeloop.artifacts.signing import generate_keypair
from edgeloop.edge.rates import ThroughputMeter
from edgeloop.edge.release_rules import (
    Install,
    ReleaseRefusedError,
    Running,
    decide,
    supersedes,
)
from edgeloop.edge.state import AppliedThreshold, DeviceState, StateFile
from edgeloop.schemas import catalog
from edgeloop.schemas.events import ModelRelease
from edgeloop.schemas.framing import SingleObjectCodec
from tests.unit.test_edge_updates import Device, make_release_dir, release

MODEL = "digits-student"

# -- membership --------------------------------------------------------------------------


def test_membership_score_is_the_documented_formula_and_stable() -> None:
    for device in ("dev-1", "pi-kitchen", ""):
        digest = hashlib.sha256(f"{MODEL}:7:{device}".encode()).hexdigest()
        expected = int(digest[:16], 16) / 2**64
        assert membership_score(MODEL, 7, device) == expected
        assert membership_score(MODEL, 7, device) == membership_score(MODEL, 7, device)
        assert 0.0 <= expected < 1.0
    # A known value, so a change of the rule (which the judge shares) cannot go unnoticed.
    assert membership_score("m", 1, "d") == pytest.approx(
        int(hashlib.sha256(b"m:1:d").hexdigest()[:16], 16) / 2**64
    )


def test_the_judge_and_the_devices_agree_on_membership() -> None:
    from edgeloop.agents.control import judge

    for i in range(500):
        device = f"dev-{i}"
        assert judge.membership_score(MODEL, 5, device) == membership_score(MODEL, 5, device)


def test_share_zero_selects_nobody_and_share_one_everybody() -> None:
    ids = [f"dev-{i}" for i in range(2000)]
    assert not any(in_rollout(MODEL, 3, d, 0.0) for d in ids)
    assert all(in_rollout(MODEL, 3, d, 1.0) for d in ids)


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5])
def test_member_fraction_is_about_the_share_and_monotone(share: float) -> None:
    ids = [f"dev-{i}" for i in range(20_000)]
    members = {d for d in ids if in_rollout(MODEL, 3, d, share)}
    # Binomial(20000, s): 5 standard deviations is < 0.018 for every s here.
    assert abs(len(members) / len(ids) - share) < 0.018
    # A canary member stays a member of every later, larger wave of the same version.
    assert members <= {d for d in ids if in_rollout(MODEL, 3, d, min(1.0, share * 2))}


def test_the_version_reshuffles_who_is_in_the_canary() -> None:
    ids = [f"dev-{i}" for i in range(2000)]
    v3 = {d for d in ids if in_rollout(MODEL, 3, d, 0.1)}
    v4 = {d for d in ids if in_rollout(MODEL, 4, d, 0.1)}
    assert v3 != v4


# -- the decision table (no download) -----------------------------------------------------


def rec(stage: str, version: int, *, parent: int | None = None, share: float = 1.0,
        cohort: str = "default", target: str = "pi5-cpu") -> ModelRelease:  # fmt: skip
    return {
        "event_id": "e", "ts": 0, "model_name": MODEL, "model_version": version,
        "cohort": cohort, "stage": stage, "wave": 0, "artifact_url": "file:///x",  # type: ignore[typeddict-item]
        "manifest_sha256": "", "target": target, "parent_version": parent, "reason": "t",
        "share": share,
    }  # fmt: skip


def device_on_either_side(version: int, share: float) -> tuple[str, str]:
    member = next(f"d{i}" for i in range(1000) if in_rollout(MODEL, version, f"d{i}", share))
    other = next(f"d{i}" for i in range(1000) if not in_rollout(MODEL, version, f"d{i}", share))
    return member, other


def running(device: str = "d0", version: int = 2, withdrawn: frozenset[int] = frozenset()
            ) -> Running:  # fmt: skip
    return Running(device_id=device, cohort="default", target="pi5-cpu", model_name=MODEL,
                   version=version, withdrawn=withdrawn)  # fmt: skip


MEMBER, OTHER = device_on_either_side(3, 0.5)


@pytest.mark.parametrize(
    ("release_", "device", "expected"),
    [
        # stage x membership, newer version
        (rec("CANARY", 3, share=0.5), MEMBER, Install(min_version=2, rollback=False)),
        (rec("CANARY", 3, share=0.5), OTHER, "not_member"),
        (rec("WAVE", 3, share=0.5), MEMBER, Install(min_version=2, rollback=False)),
        (rec("WAVE", 3, share=0.5), OTHER, "not_member"),
        (rec("CANARY", 3, share=0.0), MEMBER, "not_member"),
        (rec("WAVE", 3, share=1.0), OTHER, Install(min_version=2, rollback=False)),
        # FULL ignores the share: every device
        (rec("FULL", 3, share=0.0), OTHER, Install(min_version=2, rollback=False)),
        # version order: nothing but a ROLLBACK installs an older or the same version
        (rec("FULL", 1), MEMBER, "stale"),
        (rec("CANARY", 1, share=1.0), MEMBER, "stale"),
        (rec("WAVE", 2, share=1.0), MEMBER, "stale"),
        # rollback: only a device on the withdrawn version goes back
        (rec("ROLLBACK", 1, parent=2), OTHER, Install(min_version=None, rollback=True)),
        (rec("ROLLBACK", 1, parent=2, share=0.0), OTHER, Install(min_version=None, rollback=True)),
        (rec("ROLLBACK", 0, parent=1), MEMBER, "not_withdrawn"),
        (rec("ROLLBACK", 2, parent=3), MEMBER, "stale"),
        # not for this device at all
        (rec("REFUSED", 3), MEMBER, "ignored_stage"),
        (rec("UNKNOWN", 3), MEMBER, "ignored_stage"),
        (rec("FULL", 3, cohort="other"), MEMBER, "other_cohort"),
        (rec("FULL", 3, cohort="*"), MEMBER, Install(min_version=2, rollback=False)),
    ],
)
def test_decision_table(release_: ModelRelease, device: str, expected: Install | str) -> None:
    assert decide(release_, running(device)) == expected


@pytest.mark.parametrize(
    ("release_", "reason"),
    [
        (rec("ROLLBACK", 1), "rollback_parent"),  # no withdrawn version named
        (rec("ROLLBACK", 3, parent=2), "rollback_version"),  # "back" to a newer one
        (rec("ROLLBACK", 2, parent=2), "rollback_version"),
        (rec("ROLLBACK", 1, parent=2, target="jetson"), "target"),
        (rec("FULL", 3, target="jetson"), "target"),
    ],
)
def test_malformed_rollbacks_and_wrong_targets_are_refused(
    release_: ModelRelease, reason: str
) -> None:
    with pytest.raises(ReleaseRefusedError) as err:
        decide(release_, running())
    assert err.value.reason == reason


def test_a_withdrawn_version_is_not_installed_again() -> None:
    assert decide(rec("FULL", 3), running(version=1, withdrawn=frozenset({3}))) == "withdrawn"
    assert decide(rec("FULL", 4), running(version=1, withdrawn=frozenset({3}))) == Install(
        min_version=1, rollback=False
    )


def test_a_release_without_share_is_for_every_device() -> None:
    old = dict(rec("CANARY", 3))
    del old["share"]  # a record decoded from before the field existed
    assert decide(old, running(OTHER)) == Install(min_version=2, rollback=False)  # type: ignore[arg-type]


def test_waiting_slot_keeps_a_rollback_against_a_redelivered_canary() -> None:
    rollback = rec("ROLLBACK", 1, parent=2)
    assert supersedes(rollback, rec("CANARY", 2))
    assert not supersedes(rec("CANARY", 2), rollback)
    assert supersedes(rec("CANARY", 3), rollback)
    assert supersedes(rec("WAVE", 3), rec("CANARY", 3))
    assert not supersedes(rec("CANARY", 2), rec("FULL", 3))


def test_share_round_trips_and_defaults_to_one() -> None:
    schema = catalog.get("ModelRelease")
    codec = SingleObjectCodec([schema])
    with_share = dict(rec("CANARY", 3, share=0.25))
    assert codec.decode(codec.encode(schema, with_share))[1]["share"] == 0.25
    without = dict(with_share)
    del without["share"]  # what trainer/release_events.py builds today
    assert codec.decode(codec.encode(schema, without))[1]["share"] == 1.0


# -- the updater, with real signed artifacts ----------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


def at(art: Path, version: int, stage: str, **kw: Any) -> dict[str, Any]:
    return release(art, version, stage=stage, share=1.0, **kw)


async def test_rollback_installs_the_named_older_version_and_persists_it(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    dev = Device(tmp_path / "device", pub)
    v1 = make_release_dir(tmp_path / "rel", priv, 1)
    dev.updater.boot(v1)
    v2 = make_release_dir(tmp_path / "rel", priv, 2)
    assert await dev.updater.apply(at(v2, 2, "FULL", parent_version=1)) == "applied"  # type: ignore[arg-type]
    # An older version by any other stage is refused.
    for stage in ("CANARY", "WAVE", "FULL"):
        assert await dev.updater.apply(at(v1, 1, stage)) == "stale"  # type: ignore[arg-type]
        assert dev.updater.model is not None and dev.updater.model.version == 2
    assert await dev.updater.apply(at(v1, 1, "ROLLBACK", parent_version=2)) == "applied"  # type: ignore[arg-type]
    assert dev.updater.model is not None and dev.updater.model.version == 1
    assert dev.state.current.model_version == 1  # what DeviceStatus reports
    assert dev.state.current.withdrawn == (2,)
    # The rollback seen again (retained) is a no-op; the withdrawn canary cannot return.
    assert await dev.updater.apply(at(v1, 1, "ROLLBACK", parent_version=2)) == "stale"  # type: ignore[arg-type]
    assert await dev.updater.apply(at(v2, 2, "CANARY")) == "withdrawn"  # type: ignore[arg-type]
    # ... and a reboot remembers both.
    again = StateFile(tmp_path / "device" / "state.json",
                      DeviceState(AppliedThreshold(0, 0.8, "MAX_PROB", 0.0)))  # fmt: skip
    assert (again.current.model_version, again.current.withdrawn) == (1, (2,))


async def test_rollback_with_a_badly_signed_artifact_is_refused(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    dev = Device(tmp_path / "device", pub)
    dev.updater.boot(make_release_dir(tmp_path / "rel", priv, 3))
    # Signed by another key.
    other_priv, _ = generate_keypair(tmp_path / "other")
    forged = make_release_dir(tmp_path / "forged", other_priv, 2)
    outcome = await dev.updater.apply(at(forged, 2, "ROLLBACK", parent_version=3))  # type: ignore[arg-type]
    assert outcome == "refused:signature"
    # Signed, then a file changed.
    tampered = make_release_dir(tmp_path / "tampered", priv, 2)
    (tampered / "model-card.json").write_text('{"precision": "int1"}')
    outcome = await dev.updater.apply(at(tampered, 2, "ROLLBACK", parent_version=3))  # type: ignore[arg-type]
    assert outcome == "refused:hash"
    # The release says v2, the signed manifest says v1: the named version or nothing.
    v1 = make_release_dir(tmp_path / "v1", priv, 1)
    v1_as_v2 = tmp_path / "v1-as-v2"
    shutil.copytree(v1, v1_as_v2)
    outcome = await dev.updater.apply(at(v1_as_v2, 2, "ROLLBACK", parent_version=3))  # type: ignore[arg-type]
    assert outcome == "refused:mismatch"
    assert dev.updater.model is not None and dev.updater.model.version == 3
    assert dev.state.current.model_version == 3
    assert dev.state.current.last_refusal is not None  # reported in DeviceStatus


async def test_a_canary_is_installed_by_members_only(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    dev = Device(tmp_path / "device", pub)  # device id "dev-1"
    dev.updater.boot(make_release_dir(tmp_path / "rel", priv, 1))
    v2 = make_release_dir(tmp_path / "rel", priv, 2)
    score = membership_score(MODEL, 2, "dev-1")
    below = release(v2, 2, stage="CANARY", share=score)  # score < share is false: not in
    assert await dev.updater.apply(below) == "not_member"  # type: ignore[arg-type]
    assert dev.state.current.model_version == 1
    above = release(v2, 2, stage="WAVE", share=min(1.0, score + 1e-9))
    assert await dev.updater.apply(above) == "applied"  # type: ignore[arg-type]
    assert dev.state.current.model_version == 2


# -- uplink bytes per second ------------------------------------------------------------


def test_throughput_is_bytes_acknowledged_over_the_interval() -> None:
    now = [100.0]
    meter = ThroughputMeter(clock=lambda: now[0])
    meter.add(3000)
    meter.add(1000)
    now[0] = 102.0
    assert meter.sample() == 2000.0  # 4000 B over 2 s
    now[0] = 107.0
    assert meter.sample() == 0.0  # nothing acknowledged in the next 5 s
    meter.add(500)
    assert meter.sample() == 0.0  # no time passed: no rate rather than a division by 0
    now[0] = 108.0
    assert meter.sample() == 0.0  # the 500 B were counted in the interval that took them
