"""Reading an "open" config section (`[moab]`, `[slurm]`, `[discovery]` ...) key by key.

The module that owns a section checks it; this holds the checks they share, so every section
refuses an unknown key, a wrong type or an unsafe path with the same one-line message naming
`<file>: <section>.<key>`.
"""

from __future__ import annotations

import re
from typing import Any

from pxe.config import Config
from pxe.errors import InputError

SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")  # safe inside an argv, slurm.conf and moab.cfg


class Section:
    """The raw table of ``[name]`` (empty when absent), with typed, checked getters."""

    def __init__(self, cfg: Config, name: str, known: set[str]) -> None:
        self.where = f"{cfg.path}: {name}"
        raw: Any = cfg.raw.get(name) or {}
        if not isinstance(raw, dict):
            raise InputError(f"{self.where}: must be a table")
        for key in raw:
            if key not in known:
                raise self.fail(key, f"unknown key (known: {', '.join(sorted(known))})")
        self.raw: dict[str, Any] = raw

    def fail(self, key: str, text: str) -> InputError:
        return InputError(f"{self.where}.{key}: {text}")

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def integer(self, key: str, low: int, high: int | None = None, default: int | None = None
                ) -> int | None:
        value = self.raw.get(key, default)
        if key not in self.raw:
            return value
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low \
            and (high is None or value <= high)
        if not ok:
            bound = f">= {low}" if high is None else f"from {low} to {high}"
            raise self.fail(key, f"must be an integer {bound}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def path(self, key: str) -> str | None:
        """An absolute path of plain characters (it lands in argv lists and scheduler configs)."""
        if key not in self.raw:
            return None
        value = self.raw[key]
        if not isinstance(value, str) or not SAFE_PATH.match(value):
            raise self.fail(key, f"must be an absolute path of [A-Za-z0-9._/+-], got {value!r}")
        return value
