"""A real TFTP server (tftpd-hpa on 127.0.0.1) serves the staged tree: fetch what a PXE client asks for."""

import os
import shutil
import socket
import subprocess
import time

import pytest

from pxe.images import Catalog
from pxe.inventory import Inventory, build
from pxe.setboot import render_all, set_boot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("in.tftpd", path="/usr/sbin"), reason="needs tftpd-hpa"),
]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tftpd(site):
    root = site.cfg.paths.tftp_root
    root.mkdir(parents=True, exist_ok=True)
    port = free_udp_port()
    proc = subprocess.Popen(["/usr/sbin/in.tftpd", "--foreground", "--address", f"127.0.0.1:{port}",
                             "--secure", "--user", "root", "--blocksize", "1468", str(root)])
    time.sleep(0.3)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def fetch(port: int, name: str) -> bytes:
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--tftp-blksize", "1408",
                          f"tftp://127.0.0.1:{port}/{name}"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_pxe_client_names_fetch_byte_for_byte(site, tftpd, kernel, tmp_path):
    # tftpd-hpa serves files: the site writes its loader configs as files.
    site.config_path.write_text(site.config_path.read_text() + "\n[boot]\nwrite_files = true\n")
    cfg = site.cfg
    Inventory(cfg).add([
        build(cfg, {"name": "bios1", "mac": "52:54:00:aa:00:01", "ip": "198.18.0.11"}),
        build(cfg, {"name": "uefi1", "mac": "52:54:00:aa:00:02", "ip": "198.18.0.12",
                    "firmware": "uefi"}),
    ])
    initrd = tmp_path / "initrd"
    initrd.write_bytes(os.urandom(300_000))
    image = Catalog(cfg).add("centos5", kernel, initrd)
    render_all(cfg)
    set_boot(cfg, "bios1,uefi1", "centos5")
    root = cfg.paths.tftp_root
    # What pxelinux asks for, then what GRUB asks for (shared grub.cfg, then the per-MAC file).
    for name in ("pxelinux.0", "ldlinux.c32", "pxelinux.cfg/01-52-54-00-aa-00-01",
                 "pxelinux.cfg/default", "grubx64.efi", "grub/grub.cfg",
                 "grub/grub.cfg-52:54:00:aa:00:02", f"blobs/{image.kernel_sha}",
                 f"blobs/{image.initrd_sha}"):
        assert fetch(tftpd, name) == (root / name).read_bytes(), name
    assert fetch(tftpd, f"blobs/{image.initrd_sha}") == initrd.read_bytes()
    assert f"KERNEL blobs/{image.kernel_sha}" in fetch(tftpd, "pxelinux.cfg/01-52-54-00-aa-00-01").decode()
