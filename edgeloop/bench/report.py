"""Shared output of every benchmark: a printed table and a JSON file.

Each figure is measured in the same run as the baseline it is compared with, so ratios
stay meaningful on a noisy shared machine even when absolute numbers drift.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def per_call_us(fn: Callable[[], object], *, iterations: int, rounds: int) -> float:
    """The fastest of `rounds` rounds, as the mean cost of `iterations` calls, in µs.

    The minimum, as timeit advises: noise on a shared machine only ever adds time, so the
    least disturbed round is the best estimate of the code's own cost (used alike for
    candidates and baselines)."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter_ns() - start) / iterations / 1000)
    return min(samples)


def write_report(out_dir: Path, name: str, doc: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_bytes(orjson.dumps({"machine": machine(), **doc}, option=orjson.OPT_INDENT_2))
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    # Wide enough for every column even when stdout is a pipe (CI logs, `make bench | tee`).
    Console(width=max(120, 14 * len(columns))).print(table)
