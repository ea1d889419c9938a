"""Helpers for the power and virtual-BMC tests (no tests here): free ports, a site with nodes,
a virtual BMC process, a Redfish emulator thread, a UDP listener. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lab.machine import SimulatedMachine
from lab.ports import free_udp_base  # noqa: F401 - re-exported for the tests
from lab.redfish_emulator import RedfishServer, make_server
from lab.vbmc import VbmcProcess
from pxe.config import Config
from pxe.inventory import Inventory, Node, build

PASSWORD = "s3cret-pw"
USER = "admin"


def dead_udp_ports(count: int) -> list[int]:
    """Ports with nothing listening (bound once, then released): ICMP port unreachable."""
    base = free_udp_base(count)
    return list(range(base, base + count))


def write_secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def power_config(site: Any, **power: Any) -> Config:
    """Append a [power] section to the throw-away site's config and return the loaded config."""
    lines = ["", "[power]"]
    for key, value in power.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            lines.append(f"{key} = {value}")
    with open(site.config_path, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    write_secret_file(site.root / "bmc-secrets", f'default = "{PASSWORD}"\n')
    return site.cfg


def add_nodes(cfg: Config, rows: list[dict[str, Any]]) -> list[Node]:
    nodes = [build(cfg, row) for row in rows]
    Inventory(cfg).add(nodes)
    return nodes


def ipmi_rows(prefix: str, ports: list[int], firmware: str = "bios",
              start_mac: int = 1) -> list[dict[str, Any]]:
    return [{"name": f"{prefix}{i + 1:03d}", "mac": f"52:54:00:10:{(start_mac + i) >> 8:02x}:"
                                                    f"{(start_mac + i) & 0xFF:02x}",
             "bmc_type": "ipmi", "bmc_address": "127.0.0.1", "bmc_port": port,
             "bmc_user": USER, "firmware": firmware}
            for i, port in enumerate(ports)]


@contextlib.contextmanager
def vbmc(tmp_path: Path, nodes: str, count: int, **kwargs: Any) -> Iterator[VbmcProcess]:
    """Virtual BMCs for ``nodes`` (a node set of ``count`` names) on free consecutive ports."""
    pw = write_secret_file(tmp_path / f"vbmc-pw-{random.randrange(10**9)}", PASSWORD + "\n")
    journal = tmp_path / f"journal-{random.randrange(10**9)}.jsonl"
    for _ in range(5):  # a port taken between the probe and the bind: try another range
        base = free_udp_base(count)
        proc = VbmcProcess(nodes, base, pw, user=USER, journal=journal, **kwargs)
        try:
            proc.__enter__()
        except RuntimeError:
            continue
        try:
            yield proc
        finally:
            proc.close()
        return
    raise RuntimeError("could not start the virtual BMCs")


@contextlib.contextmanager
def redfish(machines: dict[str, SimulatedMachine]) -> Iterator[RedfishServer]:
    server = make_server(machines, USER, PASSWORD, address="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class UdpListener:
    """Collects datagrams sent to 127.0.0.1:<port> (the WoL tests' receiver)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5.0)
        self.port = self.sock.getsockname()[1]

    def receive(self, count: int) -> list[bytes]:
        return [self.sock.recvfrom(2048)[0] for _ in range(count)]

    def pending(self) -> int:
        self.sock.setblocking(False)
        n = 0
        try:
            for _ in range(1000):
                self.sock.recvfrom(2048)
                n += 1
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5.0)
        return n

    def close(self) -> None:
        self.sock.close()
