"""The demo's live terminal view of the newest `Frame` (rich `Live`).

Per cohort: accuracy against the simulator's labels (and per serving version), offloads/s
against the controller's budget, tau and its version, hard examples, devices per model
version, the newest release step. Then events/s per stage and p99 latencies, the phase,
training progress, the last marks, and any service whose last scrape failed (red).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from edgeloop.demo.observe import STAGES, CohortView, Frame, Mark

MARKS_SHOWN = 6
LATENCIES = ("device_to_kafka", "device_to_broker", "bridge_to_kafka", "offload_to_verdict")


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _cohort_row(c: CohortView) -> list[str | Text]:
    by_version = " ".join(f"v{v}:{_pct(a)}" for v, a in sorted(c.accuracy_by_version.items()))
    devices = " ".join(f"{n}@v{v}" for v, n in sorted(c.model_versions.items())) or "-"
    offload = _num(c.offload_rate_per_s, ".2f")
    over = (
        c.offload_rate_per_s is not None
        and c.budget_per_s is not None
        and c.offload_rate_per_s > c.budget_per_s
    )
    tau = "-" if c.tau is None else f"{c.tau:.3f} (v{c.tau_version if c.tau_version else '-'})"
    return [
        c.cohort,
        _pct(c.accuracy),
        by_version or "-",
        f"{c.frames:,}",
        Text(offload, style="red" if over else ""),
        _num(c.audit_rate_per_s, ".2f"),
        tau,
        "-" if c.hard_examples is None else str(c.hard_examples),
        devices,
        c.release_stage or "-",
    ]


def _cohort_table(frame: Frame) -> Table:
    budget = _num(frame.budget_per_s, ".1f")
    t = Table(title=f"cohorts (fleet offload budget {budget}/s)", expand=True)
    for col in ("cohort", "accuracy", "by version", "frames", "offloads/s", "audits/s",
                "tau (version)", "uncovered (fleet)", "devices", "release"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("cohort", "release", "devices") else "right")
    for c in frame.cohorts.values():
        t.add_row(*_cohort_row(c))
    fleet = [c.offload_rate_per_s for c in frame.cohorts.values() if c.offload_rate_per_s]
    if fleet:
        total = sum(fleet)
        over = frame.budget_per_s is not None and total > frame.budget_per_s
        t.caption = Text(
            f"fleet offloads {total:.2f}/s vs budget {budget}/s",
            style="red" if over else "green",
        )
    return t


def _stage_table(frame: Frame) -> Table:
    t = Table(title="pipeline", expand=True)
    for stage in STAGES:
        t.add_column(f"{stage.replace('hard_examples', 'hard ex.')}/s", justify="right")
    for key in LATENCIES:
        t.add_column(f"p99 {key.replace('_', ' ')} ms", justify="right")
    t.add_row(
        *(_num(frame.events_per_s.get(s), ".1f") for s in STAGES),
        *(_num(frame.latency_p99_ms.get(k), ".1f") for k in LATENCIES),
    )
    return t


def render(frame: Frame, marks: Sequence[Mark], *, title: str) -> RenderableType:
    """One frame as a renderable: header, cohort table, stage table, marks.

    Args:
        frame: the newest frame.
        marks: the scenario's marks (the last six are shown).
        title: the panel's title.

    Returns:
        A rich renderable.
    """
    head = Text()
    head.append(f"t={frame.t_s:6.1f}s  ", style="bold")
    head.append("phase: ", style="dim")
    head.append(frame.phase, style="bold cyan")
    head.append("   training: ", style="dim")
    head.append(frame.training or "idle", style="yellow" if frame.training else "dim")
    services = Text("services: ", style="dim")
    for name, ok in frame.up.items():
        services.append(f"{name} ", style="green" if ok else "bold red")
        if not ok:
            services.append("(down) ", style="bold red")
    extra = Text(
        f"uplink bytes {_num(frame.uplink_bytes, ',.0f')}   "
        f"hard examples routed {_num(frame.hard_examples_total, ',.0f')}",
        style="dim",
    )
    recent = Table.grid(padding=(0, 2))
    recent.add_column(justify="right", style="dim")
    recent.add_column(style="magenta")
    recent.add_column()
    for m in list(marks)[-MARKS_SHOWN:]:
        recent.add_row(f"{m.t_s:.1f}s", m.kind, m.text)
    parts: list[RenderableType] = [
        head,
        services,
        _cohort_table(frame),
        _stage_table(frame),
        extra,
        Panel(recent, title="recent", title_align="left") if marks else Text(""),
    ]
    return Panel(Group(*parts), title=title, title_align="left")


class Dashboard:
    """`with Dashboard() as d: d.update(frame, marks)` redraws in place (~4 times a second).

    Args:
        console: where to draw (default: the terminal).
        title: the panel's title.
    """

    def __init__(self, console: Console | None = None, *, title: str = "edgeloop demo") -> None:
        self.console = console or Console()
        self.title = title
        self._live: Live | None = None

    def __enter__(self) -> Dashboard:
        self._live = Live(
            Text("waiting for the first frame…"),
            console=self.console,
            refresh_per_second=4,
            transient=False,
        )
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def update(self, frame: Frame, marks: Sequence[Mark]) -> None:
        """Show `frame` (and the last marks) from the next refresh on."""
        if self._live is not None:
            self._live.update(render(frame, marks, title=self.title))
