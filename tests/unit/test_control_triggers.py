"""Training triggers: each condition fires exactly once, replays yield the same id, and
the ranges are exactly the hard examples covered, in the form `train serve` reads."""

from __future__ import annotations

import json

import fastavro.validation

from edgeloop.agents.control.settings import TriggerSettings
from edgeloop.agents.control.triggers import (
    HardObs,
    TriggerState,
    manual,
    on_hard,
    on_signal,
    on_tick,
    set_serving_version,
)
from edgeloop.schemas.catalog import get
from edgeloop.trainer.hard_example_source import OffsetRange, check_ranges
from edgeloop.trainer.trigger_consumer import _SAFE_ID

US = 1_000_000
T0 = 1_800_000_000 * US
S = TriggerSettings(hard_examples=10, drift_windows=3, debounce_s=300, schedule_s=3600)


def hard_stream(n, *, start_s=0.0, version=3, offsets=None):
    """n hard examples alternating over partitions 0 and 1, one per second."""
    offsets = offsets if offsets is not None else {0: 100, 1: 40}
    out = []
    for i in range(n):
        part = i % 2
        out.append(HardObs(part, offsets[part], version, T0 + int((start_s + i) * US)))
        offsets[part] += 1
    return out


def feed(obs, state, settings=S):
    fired = []
    for o in obs:
        fired.extend(on_hard(o, state, settings))
    return fired


def check_for_trainer(trigger):
    fastavro.validation.validate(trigger, get("TrainingTrigger").parsed, raise_errors=True)
    assert _SAFE_ID.fullmatch(trigger["trigger_id"])
    ranges = [OffsetRange.from_record(r) for r in trigger["ranges"]]
    check_ranges(ranges, max_examples=100_000)
    assert sum(r.size for r in ranges) == trigger["hard_example_count"]


def test_count_fires_once_at_n_with_the_exact_ranges_and_replays_to_the_same_id():
    obs = hard_stream(15)
    state = TriggerState("digits", 3)
    fired = feed(obs, state)
    assert len(fired) == 1
    (t,) = fired
    assert t["reason"] == "COUNT"
    assert t["hard_example_count"] == 10
    assert [(r["partition"], r["start_offset"], r["end_offset"]) for r in t["ranges"]] == [
        (0, 100, 105),
        (1, 40, 45),
    ]
    check_for_trainer(t)
    # The same input again, from scratch (a new worker) and from a changelog restored
    # mid-way (a crash), yields the same trigger: same id, same event id, same ranges.
    assert feed(obs, TriggerState("digits", 3)) == fired
    half = TriggerState("digits", 3)
    feed(obs[:6], half)
    half = TriggerState.from_json(json.loads(json.dumps(half.to_json())))
    assert feed(obs[6:], half) == fired
    # Redelivered records (offsets already seen) change nothing; 5 more are not 10.
    assert feed(obs, state) == []
    assert state.uncovered == 5


def test_the_next_count_trigger_starts_where_the_last_one_ended():
    state = TriggerState("digits", 3)
    offsets = {0: 100, 1: 40}
    first = feed(hard_stream(10, offsets=offsets), state)
    second = feed(hard_stream(10, start_s=400, offsets=offsets), state)
    assert len(first) == len(second) == 1
    a = {r["partition"]: r for r in first[0]["ranges"]}
    b = {r["partition"]: r for r in second[0]["ranges"]}
    assert all(b[p]["start_offset"] == a[p]["end_offset"] for p in (0, 1))
    assert first[0]["trigger_id"] != second[0]["trigger_id"]


def test_hard_examples_of_an_older_model_version_are_covered_but_not_counted():
    state = TriggerState("digits", 3)
    assert feed(hard_stream(12, version=2), state) == []
    (t,) = feed(hard_stream(10, start_s=20, offsets={0: 106, 1: 46}), state)
    assert t["hard_example_count"] == 22  # the ranges hold both versions' records


def signal(k, psi, *, cohort="night", version=3):
    start = T0 + k * 60 * US
    return {
        "scope": "COHORT",
        "scope_id": cohort,
        "window_start": start,
        "window_end": start + 60 * US,
        "values": {"confidence_psi": psi, "psi_model_version": float(version)},
    }


def test_drift_fires_once_after_k_consecutive_windows_and_rearms_when_psi_falls():
    state = TriggerState("digits", 3)
    feed(hard_stream(4), state)
    psis = [0.3, 0.4, 0.1, 0.3, 0.35, 0.5, 0.6, 0.7, 0.05, 0.3, 0.3]
    fired = []
    for k, p in enumerate(psis):
        fired.extend((k, t) for t in on_signal(signal(k, p), state, S))
    # Windows 3-5 are the first 3 in a row (0-1 were broken by window 2); 6 and 7 stay
    # above the bound in the same episode; 9-10 are only 2 in a row.
    assert [(k, t["reason"]) for k, t in fired] == [(5, "DRIFT")]
    check_for_trainer(fired[0][1])
    assert "PSI 0.500 > 0.25 for 3 windows" in fired[0][1]["detail"]
    # A gap in the windows (one missing) restarts the count.
    state2 = TriggerState("digits", 3)
    feed(hard_stream(4), state2)
    gapped = [signal(0, 0.5), signal(1, 0.5), signal(3, 0.5)]
    assert [t for s in gapped for t in on_signal(s, state2, S)] == []
    # The same signals replayed give the same trigger id.
    state3 = TriggerState("digits", 3)
    feed(hard_stream(4), state3)
    again = [t for k, p in enumerate(psis) for t in on_signal(signal(k, p), state3, S)]
    assert [t["trigger_id"] for t in again] == [fired[0][1]["trigger_id"]]


def test_drift_of_another_model_version_is_ignored_and_a_new_version_starts_over():
    state = TriggerState("digits", 3)
    feed(hard_stream(4), state)
    assert [t for k in range(5) for t in on_signal(signal(k, 0.9, version=2), state, S)] == []
    set_serving_version(state, 4)
    assert state.count_for_version == 0


def test_schedule_fires_once_per_slot():
    state = TriggerState("digits", 3)
    feed(hard_stream(3), state)
    hour = 3600 * US
    ticks = [T0 + 10 * US, T0 + hour // 2, T0 + hour + 5, T0 + hour + 60 * US, T0 + 2 * hour]
    fired = [t for now in ticks for t in on_tick(now, state, S)]
    # The first tick starts the schedule; the next slot fires; the slot after it has no
    # new hard examples, so it waits (pending) for one.
    assert [t["reason"] for t in fired] == ["SCHEDULE"]
    check_for_trainer(fired[0])
    assert state.pending_reason == "SCHEDULE"
    (late,) = feed(hard_stream(1, start_s=2 * 3600 + 400, offsets={0: 200}), state)
    assert late["reason"] == "SCHEDULE"
    assert late["hard_example_count"] == 1


def test_a_condition_met_during_the_debounce_waits_and_fires_once_when_it_ends():
    state = TriggerState("digits", 3)
    offsets = {0: 100, 1: 40}
    (first,) = feed(hard_stream(10, offsets=offsets), state)
    # 10 more within 300 s of the first trigger: debounced, pending.
    assert feed(hard_stream(10, start_s=20, offsets=offsets), state) == []
    assert state.pending_reason == "COUNT"
    # More hard examples arrive; the debounce ends at T0 + 309 s; the tick fires it, once,
    # with everything uncovered so far.
    assert feed(hard_stream(5, start_s=100, offsets=offsets), state) == []
    fired = on_tick(T0 + 320 * US, state, S) + on_tick(T0 + 330 * US, state, S)
    assert [t["reason"] for t in fired] == ["COUNT"]
    assert fired[0]["hard_example_count"] == 15
    assert fired[0]["trigger_id"] != first["trigger_id"]


def test_manual_fires_now_once_per_request_and_skips_the_debounce():
    state = TriggerState("digits", 3)
    offsets = {0: 100, 1: 40}
    feed(hard_stream(10, offsets=offsets), state)  # a COUNT trigger: debounce starts
    feed(hard_stream(3, start_s=20, offsets=offsets), state)
    (t,) = manual("req-42", T0 + 30 * US, state, S, detail="operator asked")
    assert t["reason"] == "MANUAL"
    assert t["hard_example_count"] == 3
    check_for_trainer(t)
    assert manual("req-42", T0 + 31 * US, state, S) == []  # the same request again
    # Nothing uncovered: a manual trigger would be rejected by the trainer; none is made.
    assert manual("req-43", T0 + 32 * US, state, S) == []
