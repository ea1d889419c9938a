"""A hook subscriber for tests, importable by a run driver (a separate process, no pytest
path): it appends each event's node changes to <state_dir>/changes.jsonl."""

from __future__ import annotations

import json
from typing import Any


def record_changes(cfg: Any, event: Any) -> None:
    with open(cfg.paths.state_dir / "changes.jsonl", "a") as fh:
        for c in event.changes:
            fh.write(json.dumps([c.node, c.state, c.reason]) + "\n")


def record_events(cfg: Any, event: Any) -> None:
    """One line per announcement (kind, nodes, changes): how often the faces were told."""
    with open(cfg.paths.state_dir / "events.jsonl", "a") as fh:
        fh.write(json.dumps([event.kind, list(event.nodes),
                             [[c.node, c.state, c.reason] for c in event.changes]]) + "\n")
