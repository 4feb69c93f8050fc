"""`edgeloop bench`: benchmarks with a printed table and a JSON file per suite."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import click

from edgeloop.bench.report import print_table, write_report

# suite -> module with `run(quick: bool) -> dict`; imported only when selected.
SUITES: dict[str, str] = {
    "framing": "edgeloop.bench.framing_bench",
    "trainer": "edgeloop.bench.trainer_bench",
    "bridge": "edgeloop.bench.bridge_bench",
    "edge": "edgeloop.bench.edge_bench",
    "teacher": "edgeloop.bench.teacher_bench",
    "agents": "edgeloop.bench.agents_bench",
    "control": "edgeloop.bench.control_bench",
    "e2e": "edgeloop.bench.e2e_bench",
}


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@click.command()
@click.argument("suites", nargs=-1, type=click.Choice(sorted(SUITES)))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Folder for the JSON results.",
)
@click.option("--quick", is_flag=True, help="Fewer iterations: a smoke run, not a measurement.")
@click.option(
    "--kafka",
    type=click.Choice(["tansu", "apache"]),
    default="tansu",
    show_default=True,
    help="Kafka flavour of the embedded stack, for the suites that take one (e2e).",
)
def bench(suites: tuple[str, ...], out: Path, quick: bool, kafka: str) -> None:
    """Run benchmark SUITES (default: all) and compare each figure with a baseline
    measured in the same run. Writes <out>/<suite>.json."""
    for suite in suites or tuple(SUITES):
        module = importlib.import_module(SUITES[suite])
        # A suite that reports another's figures (e2e shows control's) reads them from `out`;
        # one that can run on either broker takes the flavour.
        params = inspect.signature(module.run).parameters
        extra: dict[str, Any] = {"out_dir": out} if "out_dir" in params else {}
        if "kafka" in params:
            extra["kafka"] = kafka
        result: dict[str, Any] = module.run(quick=quick, **extra)
        if "rows" in result:
            columns = result.get("columns") or list(result["rows"][0])
            labels = result.get("labels", {})
            print_table(
                # Columns name their units; a suite whose do not says it in its title.
                result.get("title", suite),
                [labels.get(c, c) for c in columns],
                [[row[c] for c in columns] for row in result["rows"]],
            )
        else:
            print_table(suite, ["figure", "value"], list(_flatten(result).items()))
        for key, value in result.get("summary", {}).items():
            click.echo(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
        path = write_report(out, suite, result)
        click.echo(f"  wrote {path}")
