"""dnsmasq: checked with `dnsmasq --test -C FILE` before it is installed."""

from __future__ import annotations

from pathlib import Path

from pxe.dhcp.base import find_binary


class Dnsmasq:
    name = "dnsmasq"
    template = "dhcp/dnsmasq.conf.j2"

    def check_argv(self, path: Path) -> list[str]:
        return [find_binary("dnsmasq") or "dnsmasq", "--test", f"--conf-file={path}"]

    def validate(self) -> str | None:
        return None if find_binary("dnsmasq") else "dnsmasq not found (Debian: dnsmasq)"
