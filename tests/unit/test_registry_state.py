"""The log's state machine: the decisions every instance makes alike from the same log."""

from __future__ import annotations

import json

from edgeloop.schemas.registry.state import (
    RegistryState,
    config_key,
    delete_subject_key,
    encode,
    schema_key,
    schema_value,
)

A = '{"type":"record","name":"A","fields":[]}'
B = '{"type":"record","name":"B","fields":[]}'
C = '{"type":"record","name":"C","fields":[]}'


def key(subject: str, version: int, proposal: str) -> bytes:
    raw = encode(schema_key(subject, version, proposal))
    assert raw is not None
    return raw


def propose(state: RegistryState, record: tuple[str, int, int, str, str]) -> bool:
    """Apply a registration (subject, version, id, schema, proposal); True if it took effect."""
    subject, version, schema_id, schema, proposal = record
    outcome = state.apply(
        key(subject, version, proposal), encode(schema_value(subject, version, schema_id, schema))
    )
    assert outcome is not None
    assert outcome.proposal == proposal
    return outcome.accepted


def test_registration_and_same_schema_under_two_subjects_shares_the_id() -> None:
    st = RegistryState()
    assert propose(st, ("s", 1, 1, A, "p1"))
    assert propose(st, ("t", 1, 1, A, "p2"))
    assert st.schema_by_id == {1: A}
    assert [(v.subject, v.version) for v in st.versions("t")] == [("t", 1)]
    assert st.next_version("s") == 2
    assert st.next_id() == 2


def test_the_later_of_two_racing_proposals_for_one_version_is_void() -> None:
    st = RegistryState()
    assert propose(st, ("s", 1, 1, A, "first"))
    # Another instance proposed from the same (empty) view: same version, same id.
    assert not propose(st, ("s", 1, 1, B, "second"))
    assert st.schema_by_id == {1: A}
    assert st.versions("s")[0].schema == A


def test_an_id_taken_by_another_schema_voids_the_proposal() -> None:
    st = RegistryState()
    assert propose(st, ("s", 1, 1, A, "p1"))
    # Different subject, concurrent writer also picked id 1 for its own schema.
    assert not propose(st, ("t", 1, 1, B, "p2"))
    assert st.versions("t") == []
    # Its retry with a fresh id wins.
    assert propose(st, ("t", 1, 2, B, "p3"))
    assert st.schema_by_id == {1: A, 2: B}


def test_a_schema_keeps_its_one_id() -> None:
    st = RegistryState()
    assert propose(st, ("s", 1, 1, A, "p1"))
    assert not propose(st, ("t", 1, 7, A, "p2"))
    assert st.id_by_schema == {A: 1}


def test_the_same_schema_twice_in_a_subject_is_void() -> None:
    st = RegistryState()
    assert propose(st, ("s", 1, 1, A, "p1"))
    assert not propose(st, ("s", 2, 1, A, "p2"))
    assert [v.version for v in st.versions("s")] == [1]


def test_soft_delete_keeps_numbers_and_ids_and_permanent_delete_frees_the_id() -> None:
    st = RegistryState()
    assert propose(st, ("s", 1, 1, A, "p1"))
    assert propose(st, ("s", 2, 2, B, "p2"))
    v1 = st.versions("s")[0]
    st.apply(v1.key, encode(schema_value("s", 1, 1, A, deleted=True)))
    assert [v.version for v in st.versions("s")] == [2]
    assert [v.version for v in st.versions("s", deleted=True)] == [1, 2]
    assert st.schema_by_id[1] == A  # a soft-deleted schema still resolves by id
    assert st.next_version("s") == 3  # numbers are never reused
    st.apply(v1.key, None)
    assert [v.version for v in st.versions("s", deleted=True)] == [2]
    assert 1 not in st.schema_by_id


def test_a_cleanup_tombstone_for_a_void_key_removes_nothing() -> None:
    st = RegistryState()
    assert propose(st, ("s", 1, 1, A, "winner"))
    assert not propose(st, ("s", 1, 1, B, "loser"))
    st.apply(key("s", 1, "loser"), None)
    assert st.versions("s")[0].schema == A


def test_delete_subject_soft_deletes_up_to_its_version_only() -> None:
    st = RegistryState()
    assert propose(st, ("s", 1, 1, A, "p1"))
    assert propose(st, ("s", 2, 2, B, "p2"))
    st.apply(encode(delete_subject_key("s")), encode({"subject": "s", "version": 1}))
    assert [v.version for v in st.versions("s")] == [2]
    st.apply(encode(delete_subject_key("s")), encode({"subject": "s", "version": 2}))
    assert st.versions("s") == []
    assert st.live_subjects() == []
    assert st.live_subjects(deleted=True) == ["s"]
    # Re-registering after a soft delete continues the numbering.
    assert propose(st, ("s", 3, 3, C, "p3"))


def test_configs_set_and_clear() -> None:
    st = RegistryState()
    st.apply(encode(config_key(None)), encode({"compatibilityLevel": "FULL"}))
    st.apply(encode(config_key("s")), encode({"compatibilityLevel": "NONE"}))
    assert st.configs == {None: "FULL", "s": "NONE"}
    st.apply(encode(config_key("s")), None)
    assert st.configs == {None: "FULL"}


def test_malformed_records_are_counted_not_fatal() -> None:
    st = RegistryState()
    assert st.apply(b"not json", b"{}") is None
    assert st.apply(b'{"keytype":"SCHEMA"}', b"{}") is None
    assert st.apply(None, None) is None
    assert st.malformed == 3
    assert propose(st, ("s", 1, 1, A, "p1"))


def test_replaying_the_same_log_reaches_the_same_state() -> None:
    log: list[tuple[bytes | None, bytes | None]] = []
    for subject, version, schema_id, schema, proposal in [
        ("s", 1, 1, A, "a"),
        ("t", 1, 1, B, "b"),
        ("t", 1, 2, B, "c"),
        ("s", 2, 2, B, "d"),
        ("s", 2, 3, C, "e"),
    ]:
        log.append(
            (
                key(subject, version, proposal),
                encode(schema_value(subject, version, schema_id, schema)),
            )
        )
    log.append((encode(config_key("s")), encode({"compatibilityLevel": "FULL"})))
    first, second = RegistryState(), RegistryState()
    verdicts = [first.apply(k, v) for k, v in log]
    assert [second.apply(k, v) for k, v in log] == verdicts
    assert first == second
    assert [o.accepted for o in verdicts if o] == [True, False, True, True, False, True]
    assert json.loads(first.versions("s")[1].schema)["name"] == "B"
