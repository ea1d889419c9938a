"""Helpers for the e2e tests (no tests here): a tiny busybox initramfs, serial logs on failure.

The initramfs is built ad hoc from Debian's busybox-static and the cached kernel's NIC modules
(shared facts: NIC drivers are modules; busybox 1.35's udhcpc needs ``-s SCRIPT`` and a carrier
before the first DISCOVER; ``wget -T`` segfaults, so ``timeout 5 wget``).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOTED = "DYNPROV-TEST-BOOTED"

# Shared facts #3: load order for the NICs the lab uses.
NIC_MODULES = {
    "e1000": ["e1000"],
    "virtio": ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
               "virtio_pci", "failover", "net_failover", "virtio_net"],
}

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    echo "DYNPROV-TEST: dhcp $ip"
    ;;
esac
exit 0
"""

INIT = """#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in MODULES; do insmod /lib/modules/$m.ko; done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
server=$(arg dynprov.server); node=$(arg dynprov.node); token=$(arg dynprov.token)
echo "DYNPROV-TEST: node=$node image=$(arg dynprov.image)"
ip link set eth0 up
i=0; while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i+1)); done
udhcpc -i eth0 -s /udhcpc.sh -q -n -t 10 -T 1
report() {
  [ -n "$server" ] && timeout 5 wget -q -O /dev/null \\
    --post-data "node=$node&token=$token&kind=$1&detail=$2" "$server/report"
}
report booting initramfs
report ready up
echo BOOTED_MARK
EXTRA
poweroff -f
"""


from tests.initramfs_support import kernel_root  # noqa: E402,F401 - one kernel fetcher


def kernel_image(root: Path) -> Path:
    return next((root / "boot").glob("vmlinuz-*"))


def _cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive from (path, mode, data); symlinks have mode 0o120777 and data=target."""
    buf = io.BytesIO()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        raw = name.encode() + b"\0"
        head = b"070701" + b"".join(f"{v:08X}".encode() for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0))
        buf.write(head + raw)
        buf.write(b"\0" * (-(110 + len(raw)) % 4))
        buf.write(data)
        buf.write(b"\0" * (-len(data) % 4))
        ino += 1
    return buf.getvalue()


def build_initramfs(out: Path, kroot: Path, nic: str = "e1000", extra: str = "") -> Path:
    """A gzip'd cpio: busybox, the NIC modules, /init that DHCPs, calls home, and powers off."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    moddir = next((kroot / "lib/modules").iterdir())
    dep = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, _ = line.partition(":")
        dep[Path(path).name.split(".ko")[0]] = moddir / path
    mods = NIC_MODULES[nic]
    entries: list[tuple[str, int, bytes]] = [(d, 0o40755, b"") for d in (
        "bin", "sbin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "newroot")]
    entries.append(("bin/busybox", 0o100755, busybox))
    applets = subprocess.run(["busybox", "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    entries += [(f"bin/{a}", 0o120777, b"busybox") for a in applets if a != "busybox"]
    for m in mods:
        entries.append((f"lib/modules/{m}.ko", 0o100644, dep[m].read_bytes()))
    init = INIT.replace("MODULES", " ".join(mods)).replace("BOOTED_MARK", BOOTED)
    init = init.replace("EXTRA", extra)
    entries.append(("init", 0o100755, init.encode()))
    entries.append(("udhcpc.sh", 0o100755, UDHCPC_SCRIPT.encode()))
    out.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=1))
    return out


@contextlib.contextmanager
def serial_logs_on_failure(paths: Iterable[Path] | Path, tail: int = 80) -> Iterator[None]:
    """Print the VMs' serial logs (last ``tail`` lines each) when the block fails."""
    try:
        yield
    except BaseException:
        base = [paths] if isinstance(paths, Path) else list(paths)
        logs: list[Path] = []
        for p in base:
            logs += sorted(p.glob("*.log")) if p.is_dir() else [p]
        for log in logs:
            try:
                lines = log.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            print(f"===== {log} (last {len(lines)} lines) =====")
            print("\n".join(lines))
        raise


def need_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    for tool in ("qemu-system-x86_64", "dnsmasq", "ip"):
        if not shutil.which(tool) and not shutil.which(tool, path="/usr/sbin:/sbin"):
            pytest.skip(f"{tool} not installed (tools/install-deps)")


# -- the full stack: a lab site with real images ------------------------------------------------
def build_test_image(cache: Path, label: str, mode: str = "stateless") -> dict[str, Path]:
    """tools/make-test-image LABEL (kernel, provisioning initrd, root file), cached per session."""
    out = cache / f"{label}-{mode}"
    rootfs = out / (f"{label}.tar.gz" if mode == "stateless" else f"{label}.disk.gz")
    if not rootfs.exists():
        out.mkdir(parents=True, exist_ok=True)
        kroot = kernel_root()
        proc = subprocess.run([str(ROOT / "tools/make-test-image"), label, "--mode", mode,
                               "-o", str(rootfs), "--kernel-root", str(kroot),
                               "--boot-dir", str(out)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"make-test-image {label}: {proc.stderr}")
    return {"kernel": out / "vmlinuz", "initrd": out / "initrd.img", "rootfs": rootfs}


def lab_config(nodes: str, netns_name: str) -> str:
    """The [lab] and [power] sections for a test site (the Redfish emulator speaks http)."""
    return (f'\n[power]\nredfish_scheme = "http"\ntimeout = 10\n'
            f'\n[lab]\nnetns = "{netns_name}"\nnodes = [\n{nodes}\n]\n')


def wiki_lines(text: str) -> dict[str, dict[str, str]]:
    """cluster-query output (``NODE ATTR=VALUE;ATTR="quoted; value"``) -> {node: {ATTR: value}}."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        fields, cur, quoted, escaped = [], "", False, False
        for ch in rest:
            if escaped:
                cur, escaped = cur + ch, False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = not quoted
            elif ch == ";" and not quoted:
                fields.append(cur)
                cur = ""
            else:
                cur += ch
        fields.append(cur)
        out[name] = dict(f.split("=", 1) for f in fields if "=" in f)
    return out
