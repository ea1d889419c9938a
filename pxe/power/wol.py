"""Wake-on-LAN for nodes without a BMC: the magic packet, and nothing else pretended.

Magic packet: 6 bytes 0xFF, then the 6-byte MAC 16 times (102 bytes), one UDP datagram per MAC of
the node to ``power.wol_broadcast`` (default: the broadcast address of the provisioning subnet)
port ``power.wol_port`` (default 9). WoL can only wake a node: it cannot read the power state,
power off, reset or choose the boot device. Those answer "unsupported" with the reason, except
"off"/"soft-off" when the site sets ``power.soft_off_command`` (e.g. ssh ... poweroff).
"""

from __future__ import annotations

import socket
import subprocess

from pxe import validate
from pxe.errors import InputError
from pxe.inventory import Node
from pxe.power.base import Job, PowerError
from pxe.power.settings import Settings, soft_off_argv


def magic_packet(mac: str) -> bytes:
    """The 102-byte payload for ``mac`` (any common spelling; refused if malformed)."""
    raw = bytes.fromhex(validate.mac(mac).replace(":", ""))
    return b"\xff" * 6 + raw * 16


def send_magic(macs: list[str] | tuple[str, ...], address: str, port: int) -> int:
    packets = [magic_packet(m) for m in macs]  # every MAC checked before anything is sent
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for packet in packets:
            sock.sendto(packet, (address, port))
    return len(packets)


class WolDriver:
    name = "wol"

    def validate(self, node: Node, settings: Settings) -> list[str]:
        problems = []
        if not node.macs:
            problems.append("no MAC address to wake")
        for mac in node.macs:
            try:
                validate.mac(mac)
            except InputError as exc:
                problems.append(f"cannot send Wake-on-LAN: {exc}")
        return problems

    def _wake(self, job: Job, settings: Settings) -> str:
        job.go_ahead("Wake-on-LAN")
        try:
            n = send_magic(job.node.macs, settings.wol_broadcast, settings.wol_port)
        except InputError as exc:
            raise PowerError("error", f"cannot send Wake-on-LAN: {exc}") from None
        except OSError as exc:
            raise PowerError("unreachable", f"cannot send Wake-on-LAN to "
                                            f"{settings.wol_broadcast}:{settings.wol_port}: "
                                            f"{exc.strerror or exc}", retryable=True) from None
        return (f"magic packet sent to {n} MAC{'s' if n > 1 else ''} (a running node ignores it; "
                "WoL cannot confirm)")

    def _soft_off(self, job: Job, settings: Settings) -> str:
        if not settings.soft_off_command:
            raise PowerError("unsupported", "Wake-on-LAN cannot power a node off; set "
                                            "power.soft_off_command (e.g. [\"ssh\", \"root@{ip}\","
                                            " \"poweroff\"]) or do it by hand")
        argv = soft_off_argv(settings.soft_off_command, job.node.name, job.node.ip)
        job.go_ahead("soft-off command")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=settings.timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PowerError("timeout", f"soft-off command {argv[0]} still running after "
                                        f"{settings.timeout:g} s", retryable=True) from None
        except OSError as exc:
            raise PowerError("error", f"soft-off command {argv[0]}: {exc.strerror}") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise PowerError("error", f"soft-off command {argv[0]} exited {proc.returncode}"
                                      + (f": {detail[-1][:200]}" if detail else ""))
        return "soft-off command ran"

    def get_power_state(self, job: Job, settings: Settings) -> str:
        raise PowerError("unsupported", "Wake-on-LAN cannot read the power state (no BMC)")

    def set_power_state(self, job: Job, state: str, settings: Settings) -> str:
        if state == "on":
            return self._wake(job, settings)
        if state in ("off", "soft-off"):
            return self._soft_off(job, settings)
        raise PowerError("unsupported", f"Wake-on-LAN cannot {state} a node: only wake it "
                                        "(power on)")

    def netboot(self, job: Job, settings: Settings) -> str:
        # No BMC to set the boot device: the node's firmware boot order must start with the NIC.
        return self._wake(job, settings)

    def set_next_boot(self, job: Job, device: str, persistent: bool, settings: Settings) -> str:
        raise PowerError("unsupported", "Wake-on-LAN cannot choose the boot device; set the "
                                        "node's firmware boot order to network first")
