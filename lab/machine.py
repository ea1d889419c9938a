"""The virtual node a virtual BMC drives: a small protocol and an in-memory implementation.

A BMC (IPMI or Redfish emulator) only ever calls the six methods of ``Machine``; the QEMU-backed
machine of the lab (``lab/qemu.py``) implements the same protocol, so every BMC works with
either. Contract, kept deliberately small:

- ``power_state() -> "on" | "off"``.
- ``power_on()``: no-op when on. ``power_off()``: hard off (the plug), no-op when off.
- ``reset()``: warm reset of a running node; a node that is off stays off (as on hardware).
- ``boot_device() -> (device, persistent)`` with device ``"network"`` or ``"disk"``.
- ``set_boot_device(device, persistent=False)``: ``persistent=False`` means "the next boot only":
  the machine uses it for the next power-on or reset, then falls back to its persistent device.

Methods may be called from any thread; implementations must be thread-safe.
A machine may also have ``serial_path``: a file its serial port writes to, which the virtual
BMC sends over serial-over-LAN while a console is attached (QEMU's serial log, or a file a test
appends to). Soft off (ACPI power button) is not part of the protocol: a BMC maps it to ``power_off()`` unless
the machine also has a ``shutdown()`` method.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

PowerState = Literal["on", "off"]
BootDevice = Literal["network", "disk"]
BOOT_DEVICES: tuple[str, ...] = ("network", "disk")


@runtime_checkable
class Machine(Protocol):
    """What a virtual BMC needs from a node."""

    name: str

    def power_state(self) -> PowerState: ...

    def power_on(self) -> None: ...

    def power_off(self) -> None: ...

    def reset(self) -> None: ...

    def boot_device(self) -> tuple[BootDevice, bool]: ...

    def set_boot_device(self, device: BootDevice, persistent: bool = False) -> None: ...


@dataclass
class Boot:
    """One boot of a simulated machine: when, and from which device."""

    at: float
    device: BootDevice


@dataclass
class SimulatedMachine:
    """An in-memory node: records every boot and the device it used (for tests and demos)."""

    name: str
    state: PowerState = "off"
    persistent_device: BootDevice = "disk"
    next_device: BootDevice | None = None
    boots: list[Boot] = field(default_factory=list)
    serial_path: Path | None = None  # the node's serial output, which its BMC sends over SOL
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def power_state(self) -> PowerState:
        with self._lock:
            return self.state

    def power_on(self) -> None:
        with self._lock:
            if self.state == "off":
                self.state = "on"
                self._boot()

    def power_off(self) -> None:
        with self._lock:
            self.state = "off"

    def shutdown(self) -> None:
        """The ACPI power button: this simulated OS always obeys at once."""
        self.power_off()

    def reset(self) -> None:
        with self._lock:
            if self.state == "on":
                self._boot()

    def boot_device(self) -> tuple[BootDevice, bool]:
        with self._lock:
            if self.next_device is not None:
                return self.next_device, False
            return self.persistent_device, True

    def set_boot_device(self, device: BootDevice, persistent: bool = False) -> None:
        if device not in BOOT_DEVICES:
            raise ValueError(f"unknown boot device {device!r} (expected network or disk)")
        with self._lock:
            if persistent:
                self.persistent_device = device
                self.next_device = None
            else:
                self.next_device = device

    def _boot(self) -> None:  # caller holds the lock
        device = self.next_device or self.persistent_device
        self.next_device = None
        self.boots.append(Boot(at=time.time(), device=device))
