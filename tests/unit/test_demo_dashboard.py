"""The demo's dashboard shows the frame's figures (rendered to a recording console)."""

from __future__ import annotations

from rich.console import Console

from edgeloop.demo.dashboard import Dashboard, render
from edgeloop.demo.observe import Mark
from tests.unit.demo_support import frame, view


def shown(renderable: object) -> str:
    console = Console(record=True, width=140)
    console.print(renderable)
    return console.export_text()


def test_render_shows_every_figure_and_the_services_down() -> None:
    f = frame(
        42.0,
        "canary",
        view("drifted", 0.712, accuracy_by_version={1: 0.64, 2: 0.931}, frames=12345,
             offload_rate_per_s=1.25, audit_rate_per_s=0.33, budget_per_s=4.0, tau=0.812,
             tau_version=7, hard_examples=88, model_versions={1: 9, 2: 3},
             release_stage="CANARY v2"),
        view("clean", 0.97, frames=999, offload_rate_per_s=6.5, budget_per_s=4.0),
        events_per_s={"device": 180.0, "bridge": 179.5, "enriched": 120.2, "verdicts": 7.5,
                      "hard_examples": 2.25},
        latency_p99_ms={"device_to_kafka": 12.5, "offload_to_verdict": 48.0},
        training="training trigger 3f2a9c01… epoch 3/5",
        up={"bridge": True, "trainer": False},
        budget_per_s=4.0,
        uplink_bytes=123456.0,
    )  # fmt: skip
    marks = [Mark(float(i), "note", f"mark {i}") for i in range(8)]
    text = shown(render(f, marks, title="edgeloop demo"))
    for figure in ("canary", "71.2%", "v1:64.0%", "v2:93.1%", "12,345", "1.25", "0.33",
                   "0.812 (v7)", "88", "9@v1", "3@v2", "CANARY v2", "97.0%", "180.0",
                   "179.5", "120.2", "7.5", "2.2", "12.5", "48.0",
                   "training trigger 3f2a9c01… epoch 3/5", "123,456",
                   "fleet offloads 7.75/s vs budget 4.0/s"):  # fmt: skip
        assert figure in text, figure
    assert "trainer (down)" in text
    assert "bridge (down)" not in text
    # The last six marks only.
    assert "mark 7" in text and "mark 2" in text and "mark 1" not in text


def test_dashboard_draws_updates_on_its_console() -> None:
    console = Console(record=True, width=140, force_terminal=True)
    with Dashboard(console, title="demo under test") as d:
        d.update(frame(1.0, "steady", view("a", 0.5)), [])
    assert "demo under test" in console.export_text()
