"""What a DHCP backend must offer: its template, and how the daemon itself checks a config."""

from __future__ import annotations

from pathlib import Path

from pxe.programs import find_binary  # noqa: F401 - where the backends import it from

TYPE_CHECKING = False  # not typing's (~3 ms): every DHCP check imports this module
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object


class DhcpBackend(Protocol):
    name: str
    template: str

    def check_argv(self, path: Path) -> list[str]:
        """The daemon's own syntax check of ``path`` as an argv list (never a shell string)."""

    def validate(self) -> str | None:
        """None if the daemon is installed, else what is missing."""
