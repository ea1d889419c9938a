"""A hook subscriber for tests, importable by a run driver (a separate process, no pytest
path): it appends each event's node changes to <state_dir>/changes.jsonl."""

from __future__ import annotations

import json
from typing import Any


def record_changes(cfg: Any, event: Any) -> None:
    with open(cfg.paths.state_dir / "changes.jsonl", "a") as fh:
        for c in event.changes:
            fh.write(json.dumps([c.node, c.state, c.reason]) + "\n")
