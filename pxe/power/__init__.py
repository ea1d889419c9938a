"""Power and boot-device control: IPMI (lanplus), Redfish, Wake-on-LAN, manual, in parallel.

    from pxe import power
    results = power.run(cfg, nodes, "netboot")          # nodes: Node objects or "n[001-512]"
    failed = {n: r for n, r in results.items() if not r.ok}

Actions: status on off soft-off cycle reset boot-network boot-disk netboot (and
boot-network-persistent, boot-disk-persistent). ``netboot`` = next boot from the network once
(with the UEFI flag for firmware "uefi" nodes), then power-cycle, or power on if off; for WoL
nodes, the magic packet. ``progress(result)`` is called once per finished node, from any thread.

This package imports nothing heavy: drivers (and cryptography, sushy, pyghmi) load on first use.
Layout: base.py (results, errors, one Protocol per concern), settings.py ([power] config),
secrets.py (BMC secrets file), fanout.py (the bounded fan-out), rmcp.py (our RMCP+ client),
ipmi.py, redfish.py, wol.py, manual.py (one driver each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pxe.power.base import ACTIONS, KINDS, PowerError, PowerResult

if TYPE_CHECKING:
    from pxe.config import Config
    from pxe.inventory import Node


def run(cfg: Config, nodes: str | Iterable[Node], action: str, *, workers: int | None = None,
        timeout: float | None = None, retries: int | None = None,
        progress: Callable[[PowerResult], None] | None = None,
        time_limit: float | None = None) -> dict[str, PowerResult]:
    """Do ``action`` on every node; a PowerResult per node name, in the order given.

    Per-node ``timeout`` (seconds per attempt) and ``retries`` (after a timeout or an unreachable
    BMC); ``workers`` bounds the thread pool of the per-node drivers. Defaults come from [power].
    Raises InputError for an unknown action, NotFound for unknown node names (nothing is done),
    SecretError for an unsafe secrets file (nothing is done). Every other failure is a result.
    ``time_limit`` (s) bounds the whole call instead of the bound derived from the settings; a
    node still running then gets a "timeout" result and nothing more is sent to it.
    """
    from pxe.power import fanout

    return fanout.run(cfg, nodes, action, workers=workers, timeout=timeout, retries=retries,
                      progress=progress, time_limit=time_limit)


__all__ = ["run", "PowerResult", "PowerError", "ACTIONS", "KINDS"]
