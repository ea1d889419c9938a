"""What a DHCP backend must offer: its template, and how the daemon itself checks a config."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pxe.programs import find_binary  # noqa: F401 - where the backends import it from


class DhcpBackend(Protocol):
    name: str
    template: str

    def check_argv(self, path: Path) -> list[str]:
        """The daemon's own syntax check of ``path`` as an argv list (never a shell string)."""

    def validate(self) -> str | None:
        """None if the daemon is installed, else what is missing."""
