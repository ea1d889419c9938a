"""The ``[console]`` section of the site config (this module owns it), checked key by key.

```toml
[console]
log = false            # `pxe-stage serve` keeps an SOL log of every IPMI node (or serve --console-log)
max_sessions = 64      # at most this many nodes logged at once by serve (one small process each)
max_bytes = 1048576    # a node's log is rotated when it would grow past this
rotations = 5          # NODE.log.1 .. NODE.log.5 kept
backoff_max = 10.0     # seconds between reconnects at most (1, 2, 4 ... s)
rescan_seconds = 60.0  # serve reads the inventory again: new, removed and changed nodes
```
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pxe.config import Config
from pxe.errors import InputError


@dataclass(frozen=True)
class ConsoleSettings:
    log: bool = False
    max_sessions: int = 64
    max_bytes: int = 1 << 20
    rotations: int = 5
    backoff_max: float = 10.0
    rescan_seconds: float = 60.0


_LIMITS: dict[str, tuple[float, float]] = {"max_sessions": (1, 4096),
                                           "max_bytes": (4096, 1 << 34), "rotations": (0, 100),
                                           "backoff_max": (0.1, 3600.0),
                                           "rescan_seconds": (1.0, 86400.0)}


def load(cfg: Config, **overrides: Any) -> ConsoleSettings:
    """Check ``[console]``; ``overrides`` (command-line flags, None = not given) win."""
    raw = cfg.raw.get("console", {})
    if not isinstance(raw, dict):
        raise InputError(f"{cfg.path}: [console]: must be a table")
    known = {f.name: f for f in fields(ConsoleSettings)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(f"{cfg.path}: console.{unknown[0]}: unknown key "
                         f"(known: {', '.join(sorted(known))})")
    data = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    values: dict[str, Any] = {}
    for name, f in known.items():
        default = f.default
        value = data.get(name, default)
        kind = type(default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise InputError(f"{cfg.path}: console.{name}: must be a {kind.__name__}, "
                             f"got {value!r}")
        if name in _LIMITS:
            low, high = _LIMITS[name]
            if not low <= value <= high:
                raise InputError(f"{cfg.path}: console.{name}: must be between {low:g} and "
                                 f"{high:g}, got {value!r}")
        values[name] = value
    return ConsoleSettings(**values)
