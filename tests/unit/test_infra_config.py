"""Generated configuration: Mosquitto, Kafka KRaft, and the endpoints file."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from edgeloop.core.errors import InfraError
from edgeloop.core.settings import KafkaSettings, MqttSettings, RegistrySettings, endpoints_file
from edgeloop.infra import kafka_jvm
from edgeloop.infra.kafka import make_broker
from edgeloop.infra.mosquitto import MosquittoLimits, hash_password, render_acl, render_conf
from edgeloop.infra.pki import DevPki, ServerCredentials
from edgeloop.infra.ports import free_ports
from edgeloop.infra.stack import Stack, StackOptions
from edgeloop.streams.settings import BridgeSettings


def conf_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_password_hash_matches_mosquitto_passwd() -> None:
    # Written by `mosquitto_passwd -c -b pw edgeloop-cloud s3cret-Pass` (Mosquitto 2.0.11).
    written = (
        "$7$101$H4tExa3dTOcsHsb4$1O6oJh0U6mcwFBy/zr9ujAF1/pQJn5WvsulNrT7F07Dn0xyZhxaPGkrWVHg"
        "KqBfLp1k2smqD6wOvXNtHscHJOg=="
    )
    salt = base64.b64decode(written.split("$")[3])
    assert hash_password("s3cret-Pass", salt=salt) == written
    assert hash_password("other", salt=salt) != written


def test_mosquitto_conf_locks_devices_to_certificates(tmp_path: Path) -> None:
    server = DevPki(tmp_path / "pki").server_cert()
    limits = MosquittoLimits(max_queued_messages=12345, max_inflight_messages=42)
    text = render_conf(
        workdir=tmp_path, server=server, port=1883, tls_port=8883, limits=limits, run_as="someone"
    )
    lines = conf_lines(text)
    assert "allow_anonymous false" in lines
    assert "listener 1883 127.0.0.1" in lines
    assert "listener 8883 127.0.0.1" in lines
    tls_section = lines[lines.index("listener 8883 127.0.0.1") :]
    assert "require_certificate true" in tls_section
    assert "use_identity_as_username true" in tls_section
    # The cloud listener (before the TLS one) takes no certificate identity.
    cloud_section = lines[lines.index("listener 1883 127.0.0.1") : lines.index(tls_section[0])]
    assert not any(line.startswith("use_identity_as_username") for line in cloud_section)
    assert "max_queued_messages 12345" in lines
    assert "max_inflight_messages 42" in lines
    assert "persistence true" in lines
    assert f"persistence_location {tmp_path / 'data'}/" in lines


def test_default_queue_is_far_above_mosquittos_1000() -> None:
    # Measured on Mosquitto 2.0.11: at the default 1000 a slow QoS 1 subscriber loses
    # every message beyond it.
    assert MosquittoLimits().max_queued_messages >= 100_000


def test_publishes_over_the_bridges_payload_cap_are_refused_by_the_broker() -> None:
    # message_size_limit (PUBACK 0x95 to the publisher), not max_packet_size (which
    # disconnects it, and it resends the same packet after every reconnect).
    limits = MosquittoLimits()
    assert limits.message_size_limit == BridgeSettings.model_fields["max_message_bytes"].default
    conf = render_conf(
        workdir=Path("/w"),
        server=ServerCredentials(cert=Path("cert"), key=Path("key"), ca=Path("ca")),
        port=1,
        tls_port=2,
        limits=limits,
        run_as="u",
    )
    assert f"message_size_limit {limits.message_size_limit}" in conf_lines(conf)
    assert not any(line.startswith("max_packet_size") for line in conf_lines(conf))


def test_acl_gives_devices_their_subtree_and_cloud_the_tree() -> None:
    lines = conf_lines(render_acl(["edgeloop-cloud"]))
    assert lines == [
        "user edgeloop-cloud",
        "topic readwrite edgeloop/#",
        "pattern readwrite edgeloop/%u/#",
    ]


def test_kraft_single_node_properties(tmp_path: Path) -> None:
    text = kafka_jvm.render_server_properties(data_dir=tmp_path, port=9092, controller_port=9093)
    props = dict(line.split("=", 1) for line in conf_lines(text))
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["log.cleaner.enable"] == "true"
    assert props["log.dirs"] == str(tmp_path)


def test_cluster_id_is_16_bytes_urlsafe() -> None:
    cid = kafka_jvm.new_cluster_id()
    assert len(cid) == 22
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16
    assert kafka_jvm.new_cluster_id() != cid


# A first byte 0xF8..0xFB encodes to "-" in URL-safe base64: about 1 draw in 64.
DASH_FIRST = b"\xf8" + bytes(range(1, 16))


def test_a_draw_that_would_start_with_a_dash_is_redrawn() -> None:
    assert base64.urlsafe_b64encode(DASH_FIRST).decode().startswith("-")
    draws = iter([DASH_FIRST, bytes(16), b"\x01" * 16])
    cid = kafka_jvm.new_cluster_id(lambda: next(draws))
    # Neither the dash nor Kafka's reserved all-zero id: the third draw.
    assert cid == base64.urlsafe_b64encode(b"\x01" * 16).decode().rstrip("=")


def test_storage_format_keeps_a_dash_led_cluster_id_a_value(tmp_path: Path) -> None:
    import argparse

    dash_id = base64.urlsafe_b64encode(DASH_FIRST).decode().rstrip("=")
    argv = kafka_jvm.storage_format_argv(dash_id, tmp_path / "server.properties")
    # The storage tool's parser (argparse4j) follows Python's argparse: parsed the same
    # way, the id must come back as the value of --cluster-id, not as an unknown option.
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("command")
    parser.add_argument("--cluster-id", "-t", required=True)
    parser.add_argument("--config", "-c", required=True)
    parsed = parser.parse_args(argv)
    assert parsed.cluster_id == dash_id
    assert parsed.config == str(tmp_path / "server.properties")


def test_generated_cloud_password_never_starts_with_a_dash(tmp_path: Path) -> None:
    from edgeloop.infra.mosquitto import Mosquitto

    broker = Mosquitto(tmp_path, DevPki(tmp_path / "pki"))
    passwords = []
    for _ in range(500):
        (tmp_path / "cloud.password").unlink(missing_ok=True)
        passwords.append(broker._cloud_password().get_secret_value())
    # 500 URL-safe base64 draws would start with "-" at least once (p > 99.9%).
    assert not [p for p in passwords if p.startswith("-")]


async def test_cached_classpath_is_reused_while_its_jars_exist(tmp_path: Path) -> None:
    jars = [tmp_path / f"j{i}.jar" for i in range(3)]
    for jar in jars:
        jar.write_bytes(b"PK")
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / f"kafka-{kafka_jvm.KAFKA_VERSION}.classpath"
    cached.write_text(":".join(map(str, jars)))
    assert await kafka_jvm.kafka_classpath(cache) == ":".join(map(str, jars))


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5


def test_unknown_flavour_and_external_without_bootstrap_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="unknown kafka flavour"):
        make_broker("redpanda", tmp_path)
    with pytest.raises(InfraError, match="--bootstrap"):
        make_broker("external", tmp_path)


def test_endpoints_file_is_what_the_settings_read(tmp_path: Path) -> None:
    stack = Stack(
        tmp_path,
        StackOptions(
            kafka="tansu",
            mqtt_port=18830,
            mqtt_tls_port=18883,
            kafka_port=19092,
            registry_port=18081,
        ),
    )
    stack.mosquitto.prepare()  # generates the cloud password; starts nothing
    path = stack.write_endpoints()
    assert path == endpoints_file(tmp_path)
    assert path.stat().st_mode & 0o077 == 0  # it holds a password

    kafka = KafkaSettings.load(tmp_path)
    assert (kafka.bootstrap, kafka.flavor, kafka.idempotence) == ("127.0.0.1:19092", "tansu", False)
    mqtt = MqttSettings.load(tmp_path)
    assert (mqtt.port, mqtt.tls_port, mqtt.username) == (18830, 18883, "edgeloop-cloud")
    assert mqtt.password is not None
    assert mqtt.password.get_secret_value() == stack.mosquitto.password.get_secret_value()
    assert mqtt.ca_file == tmp_path / "pki" / "ca.crt"
    assert RegistrySettings.load(tmp_path).url == "http://127.0.0.1:18081"
