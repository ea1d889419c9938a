"""State-change announcements: the toolkit says what changed; scheduler faces subscribe.

The toolkit knows no scheduler. When nodes, images or pools change it calls
``announce(cfg, Event(kind, nodes))``; each subscriber (a callable ``fn(cfg, event)``) does what
its scheduler needs: the Moab face rewrites its ``file://`` WIKI report, a Slurm face may update
node features or states. A subscriber that fails is logged and never fails the change (which is
committed already); subscribers must be quick and must not write the state database.

Subscribers come from, in this order, without duplicates:
    - entry points in the group ``dynprov.hooks`` (``name = "package.module:function"``), unless
      ``[hooks] entry_points = false``;
    - ``[hooks] subscribers = ["package.module:function", ...]`` in the site configuration.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pxe.errors import InputError

if TYPE_CHECKING:
    from pxe.config import Config

log = logging.getLogger("dynprov.hooks")

GROUP = "dynprov.hooks"
NODES, IMAGES, POOLS = "nodes", "images", "pools"
KINDS = (NODES, IMAGES, POOLS)
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

Subscriber = Callable[["Config", "Event"], object]


@dataclass(frozen=True)
class Event:
    """What changed: ``kind`` (nodes: run or node states; images: the catalog; pools: pool
    membership) and, when known, which nodes (empty: any or all)."""

    kind: str
    nodes: tuple[str, ...] = ()
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")


def _settings(cfg: Config) -> tuple[bool, list[str]]:
    raw = (getattr(cfg, "raw", None) or {}).get("hooks", {})
    if not isinstance(raw, dict):
        raise InputError(f"{cfg.path}: [hooks] must be a table")
    unknown = set(raw) - {"entry_points", "subscribers"}
    if unknown:
        raise InputError(f"{cfg.path}: hooks.{sorted(unknown)[0]}: unknown key "
                         "(known: entry_points, subscribers)")
    use_eps = raw.get("entry_points", True)
    if not isinstance(use_eps, bool):
        raise InputError(f"{cfg.path}: hooks.entry_points: must be true or false")
    subs = raw.get("subscribers", [])
    if not isinstance(subs, list) or not all(isinstance(s, str) and _TARGET.match(s)
                                             for s in subs):
        raise InputError(f"{cfg.path}: hooks.subscribers: must be a list of "
                         "\"package.module:function\" strings")
    return use_eps, subs


@functools.cache
def _entry_points() -> tuple[str, ...]:
    """The installed subscribers (scanning the installed distributions once per process)."""
    from importlib.metadata import entry_points

    return tuple(ep.value for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name))


def targets(cfg: Config) -> list[str]:
    """The subscribers' ``module:function`` names for this site, in calling order."""
    use_eps, subs = _settings(cfg)
    out: list[str] = []
    if use_eps:
        out += list(_entry_points())
    for target in subs:
        if target not in out:
            out.append(target)
    return out


def resolve(target: str) -> Subscriber:
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{target} is not callable")
    return fn  # type: ignore[no-any-return]


def announce(cfg: Config, event: Event) -> list[str]:
    """Call every subscriber with the event; returns the ones that failed (logged)."""
    failed = []
    for target in targets(cfg):
        try:
            resolve(target)(cfg, event)
        except Exception as exc:  # noqa: BLE001 - a face's failure never undoes the change
            log.warning("hook %s failed on %s event: %s", target, event.kind, exc)
            failed.append(target)
    return failed
