"""The trigger ledger (at most once across restarts) and the events built from outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeloop.agents.control.settings import ControlSettings, JudgeSettings
from edgeloop.core.errors import ConfigError
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.trainer.release_events import (
    ReleaseFacts,
    dead_letter_record,
    release_event_id,
    release_record,
)
from edgeloop.trainer.serve_settings import TrainerServeSettings
from edgeloop.trainer.trigger_ledger import TriggerLedger


def test_ledger_survives_a_restart_with_states_and_outcomes(tmp_path: Path) -> None:
    path = tmp_path / "triggers" / "ledger.json"
    ledger = TriggerLedger(path)
    ledger.start("t1", hard_examples=40)
    ledger.start("t2")
    ledger.finish("t2", "released", version=2)
    again = TriggerLedger(path)
    t1, t2 = again.get("t1"), again.get("t2")
    assert t1 is not None and t1.state == "started" and t1.detail == {"hard_examples": 40}
    assert t2 is not None and (t2.state, t2.outcome, t2.detail) == (
        "done",
        "released",
        {"version": 2},
    )
    assert again.get("t3") is None
    assert not path.with_name("ledger.json.tmp").exists()


def test_ledger_keeps_the_newest_entries_only(tmp_path: Path) -> None:
    ledger = TriggerLedger(tmp_path / "l.json", max_entries=3)
    for i in range(5):
        ledger.finish(f"t{i}", "rejected")
    ledger.finish("t2", "rejected")  # touched again: newest
    assert [t for t in ("t0", "t1", "t2", "t3", "t4") if ledger.get(t)] == ["t2", "t3", "t4"]
    assert len(TriggerLedger(tmp_path / "l.json", max_entries=3)) == 3


def test_an_unreadable_ledger_stops_the_trainer_instead_of_retraining_everything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"entries": [{"trigger_id": "t1"')
    with pytest.raises(ConfigError, match="unreadable"):
        TriggerLedger(path)


def _facts(refused: tuple[str, ...] = ()) -> ReleaseFacts:
    return ReleaseFacts(
        trigger_id="t-9",
        model_name="digits-student",
        model_version=2 if not refused else 1,
        parent_version=1,
        artifact_url="http://store/digits-student/2/",
        manifest_sha256="ab" * 32,
        target="pi5-cpu",
        hard_examples=40,
        offset_ranges={"ml.hard-examples.v1/0": [10, 49]},
        scores={"candidate": {"clean": 0.9, "drifted": 0.7}},
        refused=refused,
    )


@pytest.mark.parametrize("refused", [(), ("drifted holdout accuracy does not beat",)])
def test_release_events_encode_with_the_shipped_schema(refused: tuple[str, ...]) -> None:
    record = release_record(_facts(refused), "canary", 0.05)
    schema = catalog.get("ModelRelease")
    codec = ConfluentCodec()
    codec.add(7, schema)
    decoded = codec.decode(codec.encode(7, schema, record))[2]
    assert decoded["stage"] == ("REFUSED" if refused else "CANARY")
    assert decoded["cohort"] == "canary" and decoded["wave"] == 0
    why = json.loads(decoded["reason"])
    assert why["trigger_id"] == "t-9" and why["hard_examples"] == 40
    assert why["refused"] == list(refused)
    # A release published again after a crash carries the same id: deduplicated downstream.
    assert (
        decoded["event_id"]
        == release_event_id("t-9")
        == release_record(_facts(), "x", 0.5)["event_id"]
    )


def test_the_canary_goes_to_the_judges_share_of_the_cohort_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One knob: the judge's canary share is also what the trainer's CANARY carries, so the
    # devices that install the candidate are exactly the judge's canary arm.
    assert TrainerServeSettings().canary_share == JudgeSettings().canary_share
    monkeypatch.setenv("EDGELOOP_CONTROL_JUDGE__CANARY_SHARE", "0.2")
    settings = TrainerServeSettings()
    assert settings.canary_share == ControlSettings().judge.canary_share == 0.2
    schema = catalog.get("ModelRelease")
    codec = ConfluentCodec()
    codec.add(7, schema)
    for refused, share in (((), 0.2), (("gate",), 1.0)):
        record = release_record(_facts(refused), "canary", settings.canary_share)
        decoded = codec.decode(codec.encode(7, schema, record))[2]
        # Without it the schema's default (1.0) put every device of the cohort on the
        # candidate: no control arm, and a bad release everywhere before any evidence.
        assert decoded["share"] == share


def test_dead_letter_keeps_a_capped_copy_of_the_trigger() -> None:
    record = dead_letter_record(
        reason="unknown_model",
        detail="d",
        source="kafka:t/0@1",
        payload=b"x" * 10,
        cap=4,
        client_id="trainer-1",
    )
    schema = catalog.get("DeadLetter")
    codec = ConfluentCodec()
    codec.add(1, schema)
    decoded = codec.decode(codec.encode(1, schema, record))[2]
    assert (decoded["payload"], decoded["payload_size"], decoded["truncated"]) == (
        b"xxxx",
        10,
        True,
    )
