"""What `edgeloop agents` checks before its worker joins Kafka (agents/preflight.py), and
the agents' settings a newcomer got wrong: the partition count, list-valued variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edgeloop.agents.app import make_app
from edgeloop.agents.preflight import (
    check_partitions,
    check_sources_exist,
    declared_partitions,
    source_topics,
)
from edgeloop.agents.settings import AgentsSettings
from edgeloop.core.errors import ConfigError
from edgeloop.core.settings import KafkaSettings, RegistrySettings, variable_for


def _declared(tmp_path: Path, **settings: object) -> dict[str, int]:
    s = AgentsSettings(data_dir=tmp_path, verdicts=False, **settings)  # type: ignore[arg-type]
    return declared_partitions(make_app(s, KafkaSettings(), RegistrySettings()))


def test_the_worker_declares_its_sources_and_changelogs_with_its_partition_count(
    tmp_path: Path,
) -> None:
    declared = _declared(tmp_path, partitions=12, app_id="w1")
    for source in ("edge.inference.v1", "edge.status.v1", "fleet.devices.v1"):
        assert declared[source] == 12, declared
    for table in ("fleet", "status", "dedupe-inference", "dedupe-offload"):
        assert declared[f"w1-{table}-changelog"] == 12, declared
    # The control plane keeps one partition whatever the count.
    assert declared["w1-control-log"] == 1 and declared["w1-control-changelog"] == 1


def test_topics_created_with_another_count_are_refused_naming_the_variable_and_the_fix(
    tmp_path: Path,
) -> None:
    """The newcomer's path: `topics create --partitions 12`, then a worker on the default
    6 started silently and wrote changelogs of 6 partitions."""
    settings = AgentsSettings(data_dir=tmp_path, verdicts=False)
    declared = _declared(tmp_path)
    existing = {name: 12 for name in declared if not name.startswith("edgeloop-agents-")}
    with pytest.raises(ConfigError) as caught:
        check_partitions(declared, existing, settings)
    message = str(caught.value)
    assert "EDGELOOP_AGENTS_PARTITIONS is 6" in message, message
    assert "edge.inference.v1 has 12 (expected 6)" in message, message
    assert "set EDGELOOP_AGENTS_PARTITIONS=12" in message, message


def test_sources_with_mixed_counts_ask_for_one_count(tmp_path: Path) -> None:
    settings = AgentsSettings(data_dir=tmp_path, verdicts=False)
    declared = _declared(tmp_path)
    existing = {"edge.inference.v1": 12, "fleet.devices.v1": 3}
    with pytest.raises(ConfigError, match="give the topics one partition count"):
        check_partitions(declared, existing, settings)


def test_state_topics_from_an_earlier_count_name_the_app_id(tmp_path: Path) -> None:
    settings = AgentsSettings(data_dir=tmp_path, verdicts=False, partitions=12)
    declared = _declared(tmp_path, partitions=12)
    existing = {**dict.fromkeys(declared, 12), "edgeloop-agents-fleet-changelog": 6}
    with pytest.raises(ConfigError) as caught:
        check_partitions(declared, existing, settings)
    message = str(caught.value)
    assert "app id 'edgeloop-agents'" in message and "--app-id" in message, message
    assert "edgeloop-agents-fleet-changelog has 6 (expected 12)" in message, message


def test_matching_or_missing_topics_pass(tmp_path: Path) -> None:
    settings = AgentsSettings(data_dir=tmp_path, verdicts=False)
    declared = _declared(tmp_path)
    check_partitions(declared, {}, settings)  # a fresh cluster: Faust creates them
    check_partitions(declared, dict(declared), settings)
    # Topics the worker does not read are not its business.
    check_partitions(declared, {**declared, "edge.inference.enriched.v1": 3}, settings)


@pytest.mark.parametrize(
    ("value", "cohorts"),
    [("a,b", {"a", "b"}), (" a , b ,", {"a", "b"}), ('["a","b"]', {"a", "b"}), ("", set())],
)
def test_drifting_cohorts_take_a_comma_list_or_json(
    monkeypatch: pytest.MonkeyPatch, value: str, cohorts: set[str]
) -> None:
    """Only the JSON form used to load; `a,b` was an error naming no format."""
    monkeypatch.setenv("EDGELOOP_AGENTS_DRIFTING_COHORTS", value)
    assert AgentsSettings.load() == AgentsSettings(drifting_cohorts=frozenset(cohorts))


@pytest.mark.parametrize("app_id", ["", "a b", "a/b", "x" * 201, "agents:1"])
def test_an_app_id_that_cannot_prefix_a_topic_name_is_refused(app_id: str) -> None:
    with pytest.raises(ValidationError, match="prefixes the worker's Kafka topic names"):
        AgentsSettings(app_id=app_id)


def test_a_settings_error_is_mapped_to_the_variable_the_user_sets() -> None:
    assert variable_for("AgentsSettings", ("web_port",)) == "EDGELOOP_AGENTS_WEB_PORT"
    assert (
        variable_for("ControlSettings", ("judge", "wave_shares", 1))
        == "EDGELOOP_CONTROL_JUDGE__WAVE_SHARES"
    )
    assert variable_for("MqttSettings", ("pki_dir",)) == "EDGELOOP_PKI_DIR"
    assert variable_for("AgentsSettings", ("no_such_field",)) is None
    assert variable_for("NoSuchSettings", ("x",)) is None


def test_a_worker_whose_sources_are_missing_is_refused_naming_topics_create(
    tmp_path: Path,
) -> None:
    s = AgentsSettings(data_dir=tmp_path, verdicts=False, app_id="w2")
    app = make_app(s, KafkaSettings(), RegistrySettings())
    sources = source_topics(app)
    # What the agents read, the control plane's inputs included; never its own topics.
    assert {"edge.inference.v1", "fleet.devices.v1", "cloud.verdicts.v1"} <= sources
    assert not [t for t in sources if t.startswith("w2-")], sources
    check_sources_exist(sources, dict.fromkeys(sources, 6), 6)
    with pytest.raises(ConfigError) as caught:
        check_sources_exist(sources, dict.fromkeys(sources - {"fleet.devices.v1"}, 6), 12)
    message = str(caught.value)
    assert "do not exist yet: fleet.devices.v1;" in message, message
    assert "`edgeloop topics create --partitions 12`" in message, message


def test_one_odd_topic_among_agreeing_ones_is_to_be_recreated_not_followed(
    tmp_path: Path,
) -> None:
    """The fix said "set EDGELOOP_AGENTS_PARTITIONS=1" when only fleet.devices.v1 (auto-
    created by a client) had 1 and every other topic had the worker's 12."""
    settings = AgentsSettings(data_dir=tmp_path, verdicts=False, partitions=12)
    declared = _declared(tmp_path, partitions=12)
    existing = {**dict.fromkeys(declared, 12), "fleet.devices.v1": 1}
    with pytest.raises(ConfigError) as caught:
        check_partitions(declared, existing, settings)
    message = str(caught.value)
    assert "re-create fleet.devices.v1 with 12 partitions" in message, message
    assert "EDGELOOP_AGENTS_PARTITIONS=1" not in message, message
