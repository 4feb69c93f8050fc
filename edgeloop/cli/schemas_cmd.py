"""`edgeloop schemas register|check`: the event schemas against a schema registry.

Works with any Confluent-compatible registry. `check` decides compatibility here, with
the Apache avro checker, so the level is the one asked for (FULL_TRANSITIVE for the fleet
topics: devices upgrade late) whatever the registry is configured with.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from edgeloop.cli.fixes import reachable
from edgeloop.core.errors import RegistryError, SchemaError
from edgeloop.core.settings import RegistrySettings, edgeloop_home
from edgeloop.schemas import catalog
from edgeloop.schemas.registry import api, compat
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.registry.compat import CompatibilityLevel
from edgeloop.schemas.topics import TOPICS, subject_for

FLEET_LEVEL = CompatibilityLevel.FULL_TRANSITIVE
LEVELS = [level.value for level in CompatibilityLevel]


def _client(url: str | None) -> RegistryClient:
    # One INFO line per HTTP request would bury the table this command prints.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = RegistrySettings.load(url=url) if url else RegistrySettings.load()
    return RegistryClient.from_settings(settings)


@click.group()
def schemas() -> None:
    """Register the event schemas or check changes against a schema registry."""


@schemas.command()
@click.option("--url", default=None, help="Registry URL [default: EDGELOOP_REGISTRY_URL].")
def register(url: str | None) -> None:
    """Register every event schema under its topic's subject (`<topic>-value`).

    Fleet topics get FULL_TRANSITIVE compatibility first, so a later incompatible
    change is refused by the registry itself.
    """
    with reachable(edgeloop_home(), registry=True, registry_option="--url"):
        rows = asyncio.run(_register(_client(url)))
    table = Table(title="registered schemas")
    for column in ("subject", "event", "compatibility", "id", "version"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


async def _register(client: RegistryClient) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    async with client:
        for spec in TOPICS.values():
            subject = subject_for(spec.name)
            if spec.fleet:
                await client.set_compatibility(FLEET_LEVEL.value, subject)
            text = catalog.schema_text(spec.event)
            await client.register(subject, text)
            found = await client.lookup(subject, text)
            level = await client.compatibility(subject)
            rows.append(
                (subject, spec.event.rsplit(".", 1)[-1], level, str(found.id), str(found.version))
            )
    return rows


@dataclass(frozen=True)
class Verdict:
    subject: str
    level: str
    checked: int  # how many registered versions the schema was compared with
    problems: list[str]


@schemas.command()
@click.option("--url", default=None, help="Registry URL [default: EDGELOOP_REGISTRY_URL].")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="An .avsc file to check instead of the shipped schemas.",
)
@click.option("--subject", default=None, help="The subject to check --file against.")
@click.option(
    "--level",
    type=click.Choice(LEVELS, case_sensitive=False),
    default=None,
    help="Compatibility level [default: FULL_TRANSITIVE for fleet topics, else "
    "the subject's level in the registry].",
)
def check(*, url: str | None, path: Path | None, subject: str | None, level: str | None) -> None:
    """Check schemas against what the registry holds; exit 1 if any is incompatible."""
    if (path is None) != (subject is None):
        raise click.UsageError("--file and --subject go together")
    if path is not None and subject is not None:
        targets = [(subject, path.read_text(encoding="utf-8"))]
    else:
        targets = [(subject_for(s.name), catalog.schema_text(s.event)) for s in TOPICS.values()]
    chosen = CompatibilityLevel(level.upper()) if level else None
    with reachable(edgeloop_home(), registry=True, registry_option="--url"):
        verdicts = asyncio.run(_check(_client(url), targets, chosen))
    table = Table(title="compatibility")
    for column in ("subject", "level", "versions checked", "result"):
        table.add_column(column)
    for v in verdicts:
        result = "[red]INCOMPATIBLE[/red]" if v.problems else "[green]ok[/green]"
        table.add_row(v.subject, v.level, str(v.checked), result)
    console = Console()
    console.print(table)
    failed = [v for v in verdicts if v.problems]
    for v in failed:
        console.print(f"[bold]{v.subject}[/bold] ({v.level}):", highlight=False)
        for problem in v.problems:
            console.print(f"  - {problem}", highlight=False, markup=False)
    if failed:
        # SystemExit, not click's Exit: the CLI runs click with standalone_mode=False,
        # which returns an Exit's code instead of exiting with it.
        sys.exit(1)


def _fleet_subjects() -> set[str]:
    return {subject_for(s.name) for s in TOPICS.values() if s.fleet}


async def _check(
    client: RegistryClient, targets: list[tuple[str, str]], chosen: CompatibilityLevel | None
) -> list[Verdict]:
    verdicts = []
    async with client:
        for subject, text in targets:
            try:
                schema = compat.parse(text)
            except SchemaError as exc:
                verdicts.append(Verdict(subject, "-", 0, [str(exc)]))
                continue
            previous = await _history(client, subject)
            level = chosen or (
                FLEET_LEVEL
                if subject in _fleet_subjects()
                else CompatibilityLevel(await client.compatibility(subject))
            )
            problems = compat.check(schema, previous, level)
            compared = len(previous if level.transitive else previous[-1:])
            verdicts.append(Verdict(subject, level.value, compared, [str(p) for p in problems]))
    return verdicts


History = list[tuple[int | None, compat.AvroSchema]]


async def _history(client: RegistryClient, subject: str) -> History:
    """Every live version of `subject`, oldest first; none for a subject not yet there."""
    try:
        numbers = await client.versions(subject)
    except RegistryError as exc:
        if exc.error_code == api.SUBJECT_NOT_FOUND:
            return []
        raise
    history: History = []
    for number in numbers:
        text = (await client.version(subject, number)).schema
        history.append((number, compat.parse(text)))
    return history
