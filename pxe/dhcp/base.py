"""What a DHCP backend must offer: its template, and how the daemon itself checks a config."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol


class DhcpBackend(Protocol):
    name: str
    template: str

    def check_argv(self, path: Path) -> list[str]:
        """The daemon's own syntax check of ``path`` as an argv list (never a shell string)."""

    def validate(self) -> str | None:
        """None if the daemon is installed, else what is missing."""


def find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
