"""The report's PNGs, drawn from the report's own figures (what report.json holds).

matplotlib is in the trainer extra; it is imported here, lazily, by `draw_all`, and only
through its object API (`Figure`, Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MARK_STYLE = {"release": ("tab:green", "--"), "rollback": ("tab:red", "--"),
              "phase": ("0.6", ":")}  # fmt: skip


def _marks(ax: Axes, marks: Sequence[Mapping[str, Any]], kinds: tuple[str, ...]) -> None:
    for m in marks:
        if m["kind"] in kinds:
            color, style = MARK_STYLE.get(m["kind"], ("0.5", ":"))
            ax.axvline(m["t_s"], color=color, linestyle=style, linewidth=1)
            ax.annotate(m["text"], (m["t_s"], 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, fontsize=7, va="top", ha="right", color=color)  # fmt: skip


def _line(ax: Axes, t: Sequence[float], ys: Sequence[float | None], label: str, **kw: Any) -> None:
    pts = [(x, y) for x, y in zip(t, ys, strict=True) if y is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **kw)


def _legend(ax: Axes, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # a stage without samples draws no line
        ax.legend(**kw)


def draw_all(report: Mapping[str, Any], out_dir: Path) -> list[str]:
    """Draw every plot of the report into `out_dir`; the file names written.

    Args:
        report: the dict that report.json holds (its `series`, `latency`, `marks`).
        out_dir: where the PNGs go.

    Returns:
        The PNG file names, in the order report.md shows them.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless; the object API below never opens a window
    from matplotlib.figure import Figure

    s = report["series"]
    t = s["t_s"]
    marks = report["marks"]
    written: list[str] = []

    def save(fig: Figure, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        written.append(name)

    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    for cohort, cs in s["cohorts"].items():
        _line(ax, t, cs["accuracy"], cohort)
    _marks(ax, marks, ("release", "rollback", "phase"))
    ax.set(xlabel="seconds", ylabel=f"accuracy (rolling {report['window_s']:g} s)",
           title="accuracy per cohort against ground truth", ylim=(0, 1.05))  # fmt: skip
    _legend(ax, loc="lower left")
    save(fig, "accuracy.png")

    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    for cohort, cs in s["cohorts"].items():
        _line(ax, t, cs["offload_rate_per_s"], f"{cohort} offloads/s")
    _line(ax, t, s["fleet_offloads_per_s"], "fleet offloads/s", color="black", linewidth=2)
    _line(ax, t, s["budget_per_s"], "budget (offloads/s)", color="tab:red", linestyle="--")
    _marks(ax, marks, ("release", "rollback", "phase"))
    ax.set(xlabel="seconds", ylabel="offloads/s", title="offload rate and the cloud budget")
    _legend(ax, loc="upper left")
    save(fig, "offload.png")

    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    for cohort, cs in s["cohorts"].items():
        _line(ax, t, cs["tau"], cohort, drawstyle="steps-post")
    _marks(ax, marks, ("phase",))
    ax.set(xlabel="seconds", ylabel="tau", title="offload threshold tau per cohort")
    _legend(ax, loc="lower left")
    save(fig, "tau.png")

    save(_latency(Figure(figsize=(11, 4.5)), report), "latency.png")
    save(_hard_and_uplink(Figure(figsize=(10, 6)), report), "hard_examples_uplink.png")
    return written


def _latency(fig: Figure, report: Mapping[str, Any]) -> Figure:
    s = report["series"]
    t = s["t_s"]
    ax_cdf, ax_p99 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for stage, points in report["latency"]["cdf"].items():
        if points:
            ax_cdf.step([p[0] for p in points], [p[1] for p in points], where="post",
                        label=stage)  # fmt: skip
    if not any(report["latency"]["cdf"].values()):
        ax_cdf.text(0.5, 0.5, "no histogram samples", ha="center", transform=ax_cdf.transAxes)
    ax_cdf.set(xscale="log", xlabel="ms (bucket upper bounds)", ylabel="fraction ≤",
               title="latency CDF per stage, whole run", ylim=(0, 1.02))  # fmt: skip
    _legend(ax_cdf, loc="lower right", fontsize=8)
    for key, ys in s["latency_p99_ms"].items():
        _line(ax_p99, t, ys, key)
    ax_p99.set(xlabel="seconds", ylabel="p99 ms (rolling window)", title="p99 over time")
    _legend(ax_p99, loc="upper left", fontsize=8)
    return fig


def _hard_and_uplink(fig: Figure, report: Mapping[str, Any]) -> Figure:
    s = report["series"]
    t = s["t_s"]
    marks = report["marks"]
    ax_h, ax_u = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    _line(ax_h, t, s["hard_examples_total"], "hard examples routed (cumulative)")
    first = next(iter(s["cohorts"].values()), None)
    if first is not None:
        _line(ax_h, t, first["hard_examples"], "not yet covered by a trigger")
    _marks(ax_h, marks, ("release", "rollback"))
    ax_h.set(ylabel="hard examples", title="hard examples and uplink bytes")
    _legend(ax_h, loc="upper left", fontsize=8)
    _line(ax_u, t, s["uplink_bytes"], "offloaded input bytes (cumulative)", color="tab:purple")
    ax_u.set(xlabel="seconds", ylabel="bytes")
    _legend(ax_u, loc="upper left", fontsize=8)
    return fig
