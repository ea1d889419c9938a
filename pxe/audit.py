"""Append-only audit log (JSON lines) of every change: who, when, what."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pxe import atomic


def append(state_dir: Path, user: str, action: str, **details: Any) -> None:
    path = Path(state_dir) / "audit.log"
    record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "user": user, "action": action,
              **details}
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    with atomic.locked(path.with_suffix(".lock")):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def read(state_dir: Path) -> list[dict[str, Any]]:
    path = Path(state_dir) / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
