"""The enrich stage's step: each event enriched once from the right source, duplicates
dropped, bad records dead-lettered with their reason, nothing dropped silently."""

from __future__ import annotations

from collections import Counter

from edgeloop.agents.dedupe import BatchDedupe
from edgeloop.agents.enrich import (
    BASE,
    ENRICHED,
    Enrichment,
    from_device_record,
    source_of,
    tail_fields,
)
from edgeloop.agents.enrich_stage import EnrichStep
from edgeloop.schemas import catalog
from edgeloop.schemas.samples import example_record
from tests.unit.agents_support import book, frame, inference, raw


def test_enriched_schema_extends_inference_event_field_for_field() -> None:
    # The hot path appends the enrichment to the device's body: only valid while the
    # enriched schema starts with exactly InferenceEvent's fields.
    n = len(BASE.schema["fields"])
    assert ENRICHED.schema["fields"][:n] == BASE.schema["fields"]
    assert all("default" in f for f in ENRICHED.schema["fields"][n:])


def test_appended_tail_equals_a_full_encoding() -> None:
    b = book()
    event = inference("d1", 7)
    enrichment = Enrichment("FLEET", "canary", "pi5", "pi5-cpu", "lab", {"row": "3"}, False)
    fast = b.header("edge.inference.enriched.v1") + frame("InferenceEvent", event)[5:]
    fast += enrichment.tail()
    slow = b.encode("edge.inference.enriched.v1", {**event, **enrichment.fields()})
    assert fast == slow
    assert tail_fields(enrichment.tail()) == enrichment


def _run(batch: list, fleet: dict, status: dict, table: dict | None = None):  # type: ignore[no-untyped-def]
    b = book()
    step = EnrichStep(b, dlq_payload_bytes=64)
    table = {} if table is None else table
    dedupe = BatchDedupe(64, table.get)
    result = step.run(batch, dedupe, fleet.get, status.get, now_us=1)
    table.update(dedupe.changed())
    decoded = [(o.topic, b.decode(o.value)[1]) for o in result.outputs]
    return result, decoded


def test_registered_unregistered_and_unknown_devices_are_all_enriched() -> None:
    record = example_record(catalog.get("DeviceRecord"))
    record.update(device_id="reg", cohort="canary", decommissioned=False)
    fleet = {"reg": from_device_record(record).tail()}
    status = {"stat": Enrichment("STATUS", "control").tail()}
    batch = [raw(frame("InferenceEvent", inference(d, 1)), d) for d in ("reg", "stat", "new")]
    result, out = _run(batch, fleet, status)
    got = {rec["device_id"]: rec for _, rec in out}
    assert [t for t, _ in out] == ["edge.inference.enriched.v1"] * 3
    assert got["reg"]["enrichment"] == "FLEET" and got["reg"]["fleet_cohort"] == "canary"
    assert got["reg"]["hardware"] == record["hardware"]
    assert got["stat"]["enrichment"] == "STATUS" and got["stat"]["fleet_cohort"] == "control"
    assert got["new"]["enrichment"] == "NONE" and got["new"]["fleet_cohort"] == "control"
    assert result.tally["enrich:STATUS"] == 1 and result.tally["enrich:NONE"] == 1
    # The device's own fields pass through unchanged.
    assert {k: got["reg"][k] for k in inference("reg", 1)} == inference("reg", 1)


def test_duplicates_are_dropped_within_and_across_batches() -> None:
    table: dict[str, bytes] = {}
    events = [raw(frame("InferenceEvent", inference("d", s)), "d") for s in (1, 2, 1, 3)]
    result, out = _run(events, {}, {}, table)
    assert [rec["seq"] for _, rec in out] == [1, 2, 3]
    assert result.tally["duplicate"] == 1
    # Redelivery after a restart: the table (changelog) still knows them.
    batch = [*events[:2], raw(frame("InferenceEvent", inference("d", 4)), "d")]
    again, out = _run(batch, {}, {}, table)
    assert [rec["seq"] for _, rec in out] == [4]
    assert again.tally["duplicate"] == 2


def test_each_malformed_class_is_dead_lettered_with_its_reason() -> None:
    good = frame("InferenceEvent", inference("d", 1))
    status = example_record(catalog.get("DeviceStatus"))
    batch = [
        raw(b"\x01" + good[1:], "d", offset=1),  # bad magic
        raw(b"\x00\x00\x00\x03\xe7" + good[5:], "d", offset=2),  # unknown schema id
        raw(good[:-3], "d", offset=3),  # truncated body
        raw(good + b"\x00", "d", offset=4),  # trailing bytes
        raw(frame("DeviceStatus", status), "d", offset=5),  # wrong schema on the topic
        raw(good, "other", offset=6),  # key is not the event's device
        raw(b"\x00", "d", offset=7),  # shorter than the header
        raw(frame("InferenceEvent", inference("d", 2)), "d", offset=8),  # fine
    ]
    result, out = _run(batch, {}, {})
    dead = [rec for topic, rec in out if topic == "edge.inference.dlq.v1"]
    assert [d["reason"] for d in dead] == [
        "bad_magic", "unknown_schema_id", "truncated", "trailing_bytes", "wrong_schema",
        "key_mismatch", "truncated_header",
    ]  # fmt: skip
    assert [d["source"] for d in dead] == [f"kafka:edge.inference.v1/0/{i}" for i in range(1, 8)]
    assert all(d["stage"] == "agents-enrich" and d["payload_size"] > 0 for d in dead)
    assert [rec["seq"] for t, rec in out if t == "edge.inference.enriched.v1"] == [2]
    assert Counter(k for k in result.tally if k.startswith("dlq:")) == Counter(
        f"dlq:{d['reason']}" for d in dead
    )


def test_source_of_reads_the_tail() -> None:
    for source in ("FLEET", "STATUS", "NONE"):
        assert source_of(Enrichment(source, "c").tail()) == source  # type: ignore[arg-type]


def test_the_control_plane_observes_each_enriched_event_once_and_no_duplicate() -> None:
    """The enrich stage hands the control log its observations (no second decode): every
    enriched event once, a duplicate dropped by dedupe and a dead letter never."""
    b = book()
    step = EnrichStep(b, dlq_payload_bytes=64)
    good = [frame("InferenceEvent", inference("d", s)) for s in (1, 2)]
    batch = [
        raw(good[0], "d"),
        raw(good[1], "d"),
        raw(good[0], "d"),
        raw(b"\x01" + good[1][1:], "d"),
    ]
    seen: list[tuple[str, int]] = []
    result = step.run(
        batch, BatchDedupe(64, {}.get), {}.get, {}.get, now_us=1,
        observe=lambda name, event, _raw: seen.append((name, event["seq"])),
    )  # fmt: skip
    assert seen == [("edgeloop.v1.InferenceEvent", 1), ("edgeloop.v1.InferenceEvent", 2)]
    assert result.tally["duplicate"] == 1 and result.tally["dlq:bad_magic"] == 1
