"""ISC dhcpd: checked with `dhcpd -t -cf FILE` before it is installed."""

from __future__ import annotations

from pathlib import Path

from pxe.dhcp.base import find_binary


class IscDhcpd:
    name = "isc"
    template = "dhcp/dhcpd.conf.j2"

    def check_argv(self, path: Path) -> list[str]:
        # -t: test the config only; -q: no banner; a lease file is not needed for -t.
        return [find_binary("dhcpd") or "dhcpd", "-t", "-q", "-4", "-cf", str(path)]

    def validate(self) -> str | None:
        return None if find_binary("dhcpd") else "dhcpd not found (Debian: isc-dhcp-server)"
