"""Did a stored model version pass a release gate? Read from what the trainer wrote then.

Every version in the store was put there by `trainer/release.py: publish`, which runs only
after a gate passed: `edgeloop models bootstrap` (the bootstrap report) or a retrain
(`edgeloop train run` and `edgeloop train serve` both run `retrain`, which writes
`runs/retrain-<trigger id>/retrain-report.json`; `train serve` also records the outcome in
its ledger). A store can also hold an artifact nobody gated: signed by hand with the
release key and copied in. `edgeloop models release` tells the two apart here.

The signed manifest's `lineage.trigger_id` names the run (read only after the signature
verified), and the run's record must name this version as the one it released:

- `bootstrap` -> `runs/bootstrap/bootstrap-report.json`, `released[<model>] == version`;
- any other id -> `runs/retrain-<id>/retrain-report.json`, `released_version == version`,
  or `triggers/ledger.json`, entry `<id>` done with outcome `released` and this version.

A second `models bootstrap` in the same home starts its run folder over, so the report of
an earlier bootstrap's version is gone: that version then needs `--override-gate`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeloop.artifacts.manifest import Manifest
from edgeloop.trainer.home import TrainerHome
from edgeloop.trainer.trigger_ledger import TriggerLedger

BOOTSTRAP_TRIGGER = "bootstrap"  # the lineage trigger id `models bootstrap` signs
# Trigger ids name run folders (trigger_consumer.py's rule); anything else names no run.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class GateEvidence:
    """Where the trainer recorded that a gate passed this version."""

    source: Path  # the report or ledger that says so
    trigger_id: str


def ledger_path(home: TrainerHome) -> Path:
    """`train serve`'s ledger in `home` (trigger_consumer.py keeps it there)."""
    return home.root / "triggers" / "ledger.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no run record there: no evidence (the caller says where it looked)
    return doc if isinstance(doc, dict) else None


def places(home: TrainerHome, manifest: Manifest) -> list[Path]:
    """The files `gate_evidence` reads for this manifest, for an error message.

    Args:
        home: the trainer home the store belongs to.
        manifest: the verified manifest of the stored version.

    Returns:
        The paths consulted, in order (none when the lineage names no run).
    """
    trigger_id = manifest.lineage.trigger_id
    if trigger_id == BOOTSTRAP_TRIGGER:
        return [home.run_dir("bootstrap") / "bootstrap-report.json"]
    if trigger_id is None or not _SAFE_ID.fullmatch(trigger_id):
        return []
    return [home.run_dir(f"retrain-{trigger_id}") / "retrain-report.json", ledger_path(home)]


def gate_evidence(home: TrainerHome, manifest: Manifest) -> GateEvidence | None:
    """The record of the gate this version passed, or None when there is none.

    Args:
        home: the trainer home the store belongs to.
        manifest: the stored version's manifest; its signature must already have been
            verified (its lineage decides which run record is read).

    Returns:
        Where the pass is recorded, or None: no run named by the lineage released this
        version (an artifact signed outside the trainer, or its run record is gone).

    Raises:
        ConfigError: `train serve`'s ledger exists but cannot be read.
    """
    trigger_id = manifest.lineage.trigger_id
    model, version = manifest.model_name, manifest.version
    found = places(home, manifest)
    if trigger_id is None or not found:
        return None
    report = _read_json(found[0])
    if trigger_id == BOOTSTRAP_TRIGGER:
        released = (report or {}).get("released") or {}
        if isinstance(released, dict) and released.get(model) == version:
            return GateEvidence(found[0], trigger_id)
        return None
    if report is not None and report.get("released_version") == version:
        return GateEvidence(found[0], trigger_id)
    if found[1].exists():
        entry = TriggerLedger(found[1]).get(trigger_id)
        if (
            entry is not None
            and entry.state == "done"
            and entry.outcome == "released"
            and entry.detail.get("version") == version
        ):
            return GateEvidence(found[1], trigger_id)
    return None
