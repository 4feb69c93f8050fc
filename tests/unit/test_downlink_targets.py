"""Downlink targets: a device or cohort id that cannot be an MQTT topic level is refused
with a reason (the record is dead-lettered), never published and never a crash."""

from __future__ import annotations

from typing import Any

import pytest

from edgeloop.streams.downlink import RELEASES, THRESHOLDS, VERDICTS, BadTargetError, Fleet

BAD_IDS = ["a/b", "x+y", "#", "pi\x00", "", "d" * 129, "pi\x1b[2J", "$SYS", "\ud800"]


def fleet(*devices: tuple[str, str]) -> Fleet:
    f = Fleet()
    for device, cohort in devices:
        f.apply_device({"device_id": device, "cohort": cohort, "decommissioned": False})
    return f


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_device_threshold_for_an_invalid_id_is_refused(bad: str) -> None:
    record: dict[str, Any] = {"scope": "DEVICE", "scope_id": bad}
    with pytest.raises(BadTargetError) as caught:
        fleet().targets(THRESHOLDS, record)
    assert caught.value.reason == "bad_target"


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_release_or_cohort_threshold_for_an_invalid_cohort_is_refused(bad: str) -> None:
    f = fleet(("pi-1", "canary"))
    with pytest.raises(BadTargetError):
        f.targets(RELEASES, {"cohort": bad})
    with pytest.raises(BadTargetError):
        f.targets(THRESHOLDS, {"scope": "COHORT", "scope_id": bad})


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_verdict_for_an_invalid_device_is_refused(bad: str) -> None:
    with pytest.raises(BadTargetError):
        fleet().targets(VERDICTS, {"device_id": bad})


def test_an_invalid_device_in_the_fleet_table_never_becomes_a_target() -> None:
    f = fleet(("pi-1", "canary"), ("pi/2", "canary"), ("pi+3", "canary"))
    assert f.targets(RELEASES, {"cohort": "canary"}) == ["pi-1"]
    assert f.targets(THRESHOLDS, {"scope": "FLEET", "scope_id": ""}) == ["pi-1"]
