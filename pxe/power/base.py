"""The shapes every power driver shares: results, errors, and one small Protocol per concern.

A driver is one module (``ipmi.py``, ``redfish.py``, ``wol.py``, ``manual.py``) chosen by the node's
``bmc_type``. Every concern has ``validate(node, settings)``, which returns the problems that would
stop an action (an empty list means "ready"), so one command can say per node what is missing
before anything is tried (``pxe-stage power validate NODES``).

Drivers that block per node (Redfish over HTTP, WoL, manual) implement ``PowerInterface`` and
``BootInterface``; ``fanout.py`` runs them on a bounded thread pool with per-node timeout and
retries. A driver that can drive many nodes at once itself (IPMI: one event loop for hundreds of
sessions) implements ``BatchInterface`` instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pxe.errors import DynprovError

if TYPE_CHECKING:
    from pxe.inventory import Node
    from pxe.power.settings import Settings

KINDS = ("timeout", "auth", "unreachable", "unsupported", "no-bmc", "error")
# The public actions of pxe.power.run(); the two "-persistent" ones are what
# `pxe-stage bootdev --persistent` uses.
ACTIONS = ("status", "on", "off", "soft-off", "cycle", "reset", "boot-network", "boot-disk",
           "netboot", "boot-network-persistent", "boot-disk-persistent")
POWER_STATES = ("on", "off", "soft-off", "cycle", "reset")


@dataclass(frozen=True)
class PowerResult:
    """The outcome of one action on one node. ``value`` on success (e.g. "on"), else ``error``
    (a sentence for the admin) and ``kind`` (one of ``KINDS``). Never holds a secret."""

    node: str
    ok: bool
    value: str | None = None
    error: str | None = None
    kind: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"node": self.node, "ok": self.ok, "value": self.value, "error": self.error,
                "kind": self.kind}


class PowerError(DynprovError):
    """A classified failure of one node; ``retryable`` ones (timeout, unreachable) are retried."""

    def __init__(self, kind: str, message: str, retryable: bool = False):
        super().__init__(message)
        assert kind in KINDS, kind
        self.kind = kind
        self.retryable = retryable


def boot_action(action: str) -> tuple[str, bool] | None:
    """('network'|'disk', persistent) for the boot-* actions, else None."""
    if not action.startswith("boot-"):
        return None
    device = action.split("-")[1]
    return device, action.endswith("-persistent")


@dataclass(frozen=True)
class Job:
    """One node to act on, with its BMC password already resolved (None when none is needed).

    ``cancelled`` is set when the call gives up on its nodes (its time limit): a driver thread
    still running then must not change the node, so drivers call ``go_ahead`` before every step
    that changes it (power, boot device, a magic packet, a soft-off command)."""

    node: Node
    secret: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)

    def go_ahead(self, step: str) -> None:
        if self.cancelled.is_set():
            raise PowerError("timeout", f"cancelled before {step}: the call's time limit was "
                                        "reached, so nothing more is sent to this node")

    def __repr__(self) -> str:  # never print the secret
        return f"Job({self.node.name})"


class PowerInterface(Protocol):
    def validate(self, node: Node, settings: Settings) -> list[str]: ...

    def get_power_state(self, job: Job, settings: Settings) -> str:
        """ "on" or "off"."""
        ...

    def set_power_state(self, job: Job, state: str, settings: Settings) -> str:
        """``state`` in POWER_STATES; "cycle" powers on a node that is off. Returns a summary."""
        ...

    def netboot(self, job: Job, settings: Settings) -> str:
        """Next boot from the network once (UEFI flag for UEFI nodes), then cycle, or on if off."""
        ...


class BootInterface(Protocol):
    def validate(self, node: Node, settings: Settings) -> list[str]: ...

    def set_next_boot(self, job: Job, device: str, persistent: bool, settings: Settings) -> str:
        """``device`` is "network" or "disk"; ``persistent=False`` means the next boot only."""
        ...


class ConsoleInterface(Protocol):
    def validate(self, node: Node, settings: Settings) -> list[str]: ...

    def attach(self, job: Job, settings: Settings, *, seconds: float | None = None) -> int:
        """Serial console on this terminal until the escape sequence (or ``seconds``)."""
        ...


class BatchInterface(Protocol):
    """A driver that acts on many nodes at once; ``done`` is called once per node."""

    def validate(self, node: Node, settings: Settings) -> list[str]: ...

    def run_many(self, jobs: Sequence[Job], action: str, settings: Settings,
                 done: Callable[[PowerResult], None],
                 cancelled: threading.Event | None = None) -> None: ...


def bmc_address_problems(node: Node) -> list[str]:
    """What is wrong with a node's BMC address, for the drivers that need one (IPMI, Redfish)."""
    from pxe import validate

    if not node.bmc_address:
        return ["no bmc_address"]
    try:
        validate.ipv4(node.bmc_address, "BMC address")
    except DynprovError as exc:
        return [str(exc)]
    return []
