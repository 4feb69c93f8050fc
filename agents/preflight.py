"""What `edgeloop agents` checks before a worker joins its consumer group.

Once a Faust worker runs, a wrong setting shows only as a crash deep in a start-up task
(a missing teacher) or not at all (a partition count that differs from the topics': the
worker runs and creates changelogs with its own count, so a device's events, fleet
record and dedupe state no longer share a partition number). Each check here fails
first, with one line that names the setting, the value and the fix.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeloop.agents.settings import AgentsSettings
from edgeloop.artifacts.errors import ArtifactError, ArtifactNotFoundError
from edgeloop.core.errors import ConfigError
from edgeloop.core.folders import write_problem
from edgeloop.schemas.topics import check_topics_exist


def declared_partitions(app: Any) -> dict[str, int]:
    """The topics `app` reads or keeps table state in, with the partition count each is
    declared with (topics declared without a count are left out: Faust would create them
    with `topic_partitions`, and a count they already have is not ours to check).

    Args:
        app: a `faust.App` whose agents and tables are declared (`agents.app.make_app`).

    Returns:
        topic name -> partitions.
    """
    declared: dict[str, int] = {}
    for agent in app.agents.values():
        channel = agent.channel
        partitions = getattr(channel, "partitions", None)
        if partitions:
            for name in getattr(channel, "topics", ()):
                declared[name] = int(partitions)
    for table in app.tables.values():
        for name in table.changelog_topic.topics:
            declared[name] = int(table.partitions)
    return declared


def source_topics(app: Any) -> set[str]:
    """Every topic `app`'s agents read that the app does not create itself (its internal
    topics, named `<app_id>-...`, Faust creates at start).

    Args:
        app: a `faust.App` whose agents are declared.

    Returns:
        Topic names.
    """
    prefix = f"{app.conf.id}-"
    names: set[str] = set()
    for agent in app.agents.values():
        names.update(n for n in getattr(agent.channel, "topics", ()) if not n.startswith(prefix))
    return names


def check_sources_exist(sources: set[str], existing: Mapping[str, int], partitions: int) -> None:
    """Refuse to start before the topics the worker reads exist.

    A consumer that subscribes to a missing topic has the broker auto-create it with the
    broker's partition count, not the worker's (`schemas.topics.check_topics_exist`):
    the co-partitioning `check_partitions` protects would be broken from the first
    event, with no error anywhere.

    Args:
        sources: `source_topics(app)`.
        existing: topic name -> partitions, from the cluster's metadata.
        partitions: the worker's `EDGELOOP_AGENTS_PARTITIONS`, for the fix.

    Raises:
        ConfigError: naming the missing topics and `edgeloop topics create`.
    """
    check_topics_exist(sources, existing, who="the agents read", partitions=partitions)


def check_partitions(
    declared: Mapping[str, int], existing: Mapping[str, int], settings: AgentsSettings
) -> None:
    """Refuse to start when a topic exists with another partition count than declared.

    Args:
        declared: `declared_partitions(app)`.
        existing: topic name -> partitions, from the cluster's metadata.
        settings: the worker's settings (app id and `partitions`, for the message).

    Raises:
        ConfigError: naming each topic, its count and the count the worker expects, with
            the fix: EDGELOOP_AGENTS_PARTITIONS for the source topics, the app's own
            changelogs (created by an earlier start with another count) otherwise.
    """
    internal_prefix = f"{settings.app_id}-"
    sources: dict[str, int] = {}
    internal: dict[str, int] = {}
    for name, want in sorted(declared.items()):
        have = existing.get(name)
        if have is not None and have != want:
            (internal if name.startswith(internal_prefix) else sources)[name] = have

    def listed(found: dict[str, int]) -> str:
        return "; ".join(f"{n} has {have} (expected {declared[n]})" for n, have in found.items())

    if sources:
        counts = set(sources.values())
        agreeing = [
            n for n, want in declared.items()
            if not n.startswith(internal_prefix) and existing.get(n) == want
        ]  # fmt: skip
        if agreeing:
            # Others already have the worker's count: the odd ones out are the mistake
            # (e.g. auto-created by a client that ran before `topics create`).
            fix = (
                f"the other topics it reads have {settings.partitions}, so re-create "
                f"{', '.join(sources)} with {settings.partitions} partitions (deleting a "
                f"topic deletes its records)"
            )
        elif len(counts) == 1:
            fix = f"set EDGELOOP_AGENTS_PARTITIONS={counts.pop()} to match them"
        else:
            fix = "give the topics one partition count and set EDGELOOP_AGENTS_PARTITIONS to it"
        raise ConfigError(
            f"EDGELOOP_AGENTS_PARTITIONS is {settings.partitions}, but topics exist with "
            f"another partition count: {listed(sources)}. The agents keep a device's "
            f"events, fleet record and table state on the same partition number, so the "
            f"counts must be equal: {fix}"
        )
    if internal:
        raise ConfigError(
            f"app id {settings.app_id!r} has state topics from a start with another "
            f"partition count: {listed(internal)}. Use the count they were created with "
            f"(EDGELOOP_AGENTS_PARTITIONS), or a new --app-id (a new consumer group, which "
            f"reads the source topics from their start again)"
        )


def check_local(settings: AgentsSettings) -> None:
    """The worker's web port is free and its data folder is usable, checked on this host.

    Faust reports either one as a traceback (an `OSError` from aiohttp's bind, a
    `FileNotFoundError` without the path) after the worker has started.

    Args:
        settings: `web_host`, `web_port` and `data_dir` are read; `data_dir` is created
            when missing.

    Raises:
        ConfigError: naming the address or the folder, the option, and the error.
    """
    with socket.socket(socket.AF_INET6 if ":" in settings.web_host else socket.AF_INET) as sock:
        # As aiohttp binds on Unix: a port in TIME_WAIT is free to take.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.web_host, settings.web_port))
        except OSError as exc:
            raise ConfigError(
                f"the worker's web server cannot listen on {settings.web_host}:"
                f"{settings.web_port}: {exc.strerror or exc}; pass another "
                f"--workers-web-port (each worker on a host needs its own) or set "
                f"EDGELOOP_AGENTS_WEB_HOST"
            ) from exc
    data_dir = Path(settings.data_dir)
    problem = write_problem(data_dir)
    if problem is not None:
        raise ConfigError(
            f"the worker's data folder {data_dir} is not usable: {problem}; "
            f"pass another --data-dir (EDGELOOP_AGENTS_DATA_DIR)"
        )


def check_teacher(settings: AgentsSettings) -> None:
    """Load and verify the teacher release as the worker will, before it starts.

    Args:
        settings: `store`, `public_key` and `teacher_name` are read; nothing is checked
            when `verdicts` is off.

    Raises:
        ConfigError: no public key file (`edgeloop keys init`), no release of the teacher
            in the store (`edgeloop models bootstrap`), or a release that does not verify
            or load; each message also names `--no-verdicts`.
    """
    if not settings.verdicts:
        return
    from edgeloop.agents.teacher import TeacherLoadError, load_teacher, teacher_store
    from edgeloop.artifacts.signing import load_public_key

    off = "or run the worker without cloud verdicts: --no-verdicts"
    key_path = Path(settings.public_key)
    if not key_path.is_file():
        raise ConfigError(
            f"no release public key {key_path} (the teacher must verify against it): run "
            f"`edgeloop keys init` and `edgeloop models bootstrap` first, pass "
            f"--public-key, {off}"
        )
    try:
        key = load_public_key(key_path)
        load_teacher(teacher_store(settings.store), public_key=key, name=settings.teacher_name)
    except ArtifactNotFoundError as exc:
        raise ConfigError(
            f"{exc} ({settings.store}): run `edgeloop models bootstrap` first, pass --store, {off}"
        ) from exc
    except (ArtifactError, TeacherLoadError) as exc:
        raise ConfigError(
            f"the teacher {settings.teacher_name} in {settings.store} cannot be used: {exc}; "
            f"release a good one (`edgeloop models bootstrap` in a fresh store), {off}"
        ) from exc
