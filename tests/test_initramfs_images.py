"""The tiny test images (tools/make-test-image) and, in QEMU (TCG, user-mode network to a listener
on the host's 127.0.0.1), the provisioning initramfs booting them: stateless switch_root, stateful
install to disk then a SeaBIOS boot from that disk, and a sha256 mismatch."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from initramfs_support import (
    BUSYBOX,
    ROOT,
    Listener,
    kernel_root,
    running_listener,
)

from pxe import initramfs, testimage

MAKE = str(ROOT / "tools/make-test-image")
MIB = 1 << 20


@pytest.fixture(scope="session")
def kroot() -> Path:
    return kernel_root()


@pytest.fixture(scope="session")
def images(kroot: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """centos5 (stateless tar.gz, with kernel + initrd), c5sq (squashfs), sles11 (stateful)."""
    out = tmp_path_factory.mktemp("images")
    runs = {
        "centos5": ["centos5", "-o", str(out / "centos5.tar.gz"), "--kernel-root", str(kroot),
                    "--boot-dir", str(out / "boot")],
        "c5sq": ["c5sq", "--format", "squashfs", "-o", str(out / "c5sq.squashfs")],
        "sles11": ["sles11", "--mode", "stateful", "-o", str(out / "sles11.disk.gz"),
                   "--kernel-root", str(kroot), "--os-name", "SLES11"],
    }
    for label, argv in runs.items():
        proc = subprocess.run([MAKE, *argv], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (label, proc.stderr)
        assert "sha256 " in proc.stdout
    return {"centos5": out / "centos5.tar.gz", "c5sq": out / "c5sq.squashfs",
            "sles11": out / "sles11.disk.gz", "vmlinuz": out / "boot/vmlinuz",
            "initrd": out / "boot/initrd.img"}


@pytest.fixture
def listener() -> Iterator[Listener]:
    with running_listener() as srv:
        yield srv


def sh(*argv: str, data: bytes | None = None) -> str:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(list(argv), input=data, capture_output=True, check=True, timeout=120,
                          env=env).stdout.decode(errors="replace")


# --- the images ----------------------------------------------------------------------------

@pytest.mark.integration
def test_stateless_tarball(images: dict[str, Path], tmp_path: Path) -> None:
    names = set(sh("tar", "-tzf", str(images["centos5"])).split())
    for path in ("bin/busybox", "sbin/init", "etc/inittab", "etc/init.d/rcS", "etc/os-release",
                 "usr/sbin/dynprov-agent", "lib/dynprov/lib.sh", "lib/dynprov/udhcpc.script",
                 "dev/console"):
        assert path in names or path + "/" in names, path
    sh("tar", "-xzf", str(images["centos5"]), "-C", str(tmp_path), "etc/os-release")
    assert "IMAGE_ID=centos5\n" in (tmp_path / "etc/os-release").read_text()
    assert images["vmlinuz"].read_bytes()[0x202:0x206] == b"HdrS"
    assert "init" in sh("cpio", "-t", "--quiet", data=gzip.decompress(
        images["initrd"].read_bytes())).split()


@pytest.mark.integration
def test_squashfs_image(images: dict[str, Path]) -> None:
    if not shutil.which("unsquashfs"):
        pytest.skip("squashfs-tools not installed")
    listing = sh("unsquashfs", "-lls", "-d", "", str(images["c5sq"]))
    assert "/etc/os-release" in listing and "/usr/sbin/dynprov-agent" in listing
    console = next(line for line in listing.splitlines() if line.endswith("/dev/console"))
    assert console.startswith("crw-------") and "root/root" in console


@pytest.mark.integration
def test_stateful_disk_image(images: dict[str, Path], tmp_path: Path) -> None:
    """MBR + one bootable FAT partition at 1 MiB with syslinux, kernel and the root as initrd."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(gzip.decompress(images["sles11"].read_bytes()))
    raw = disk.read_bytes()
    assert raw[510:512] == b"\x55\xaa"
    assert raw[:440] == testimage.SYSLINUX_MBR.read_bytes()[:440]
    import json

    table = json.loads(sh("sfdisk", "--json", str(disk)))["partitiontable"]
    assert table["label"] == "dos" and len(table["partitions"]) == 1
    part = table["partitions"][0]
    assert part["start"] == 2048 and part.get("bootable") and part["type"] == "e"
    image = f"{disk}@@{MIB}"
    listing = sh("mdir", "-a", "-b", "-i", image, "::").lower().split()
    for name in ("::/ldlinux.sys", "::/ldlinux.c32", "::/vmlinuz", "::/initrd.img",
                 "::/syslinux.cfg"):
        assert name in listing, listing
    cfg = sh("mtype", "-i", image, "::syslinux.cfg")
    assert "INITRD /initrd.img" in cfg and "APPEND console=tty0 console=ttyS0,115200" in cfg
    sh("mcopy", "-i", image, "::initrd.img", str(tmp_path / "initrd.img"))
    root = sh("cpio", "-t", "--quiet",
              data=gzip.decompress((tmp_path / "initrd.img").read_bytes())).split()
    version = initramfs.kernel_tree(kernel_root()).version
    for path in ("init", "sbin/init", "etc/os-release", "etc/dynprov/modules",
                 f"lib/modules/{version}/kernel/drivers/net/virtio_net.ko"):
        assert path in root, path


@pytest.mark.integration
def test_agent_runs_inside_the_image(images: dict[str, Path], listener: Listener,
                                     tmp_path: Path) -> None:
    """Unpack the real image and run its own agent (its busybox, its lib) in a chroot."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    root = tmp_path / "root"
    root.mkdir()
    sh("tar", "-xzf", str(images["centos5"]), "-C", str(root))
    env = listener.cmdline_env(tmp_path, image="centos5")
    shutil.copy(env["DYNPROV_CMDLINE_FILE"], root / "tmp/cmdline")
    proc = subprocess.run(["chroot", str(root), "/usr/sbin/dynprov-agent"],
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "DYNPROV_CMDLINE_FILE": "/tmp/cmdline"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    facts = listener.reports[0].pop("facts")  # lib.sh dp_facts (no /proc in this chroot)
    assert facts.startswith("cpus ")
    assert listener.reports == [{"node": "n001", "token": "tok-123_ABC", "kind": "ready",
                                 "detail": "centos5"}]


@pytest.mark.integration
def test_make_test_image_bad_input(tmp_path: Path) -> None:
    cases = [
        (["bad/label", "-o", str(tmp_path / "x")], "invalid label"),
        (["sles11", "--mode", "stateful", "-o", str(tmp_path / "x")], "needs --kernel-root"),
        (["c5", "--format", "disk", "-o", str(tmp_path / "x")], "not for stateless"),
        (["c5", "-o", str(tmp_path / "x"), "--boot-dir", str(tmp_path)], "needs --kernel-root"),
    ]
    for argv, message in cases:
        proc = subprocess.run([MAKE, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert message in proc.stderr.lower() or message in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.integration
def test_images_are_reproducible(tmp_path: Path) -> None:
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    testimage.build("centos5", a)
    testimage.build("centos5", b)
    assert a.read_bytes() == b.read_bytes()
    assert BUSYBOX.read_bytes() in gzip.decompress(a.read_bytes())


# --- booting them in QEMU (TCG) ------------------------------------------------------------

def qemu_available() -> None:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86 not installed (tools/install-deps)")


class Vm:
    """One QEMU guest, serial console to a file; killed by PID on exit."""

    def __init__(self, argv: list[str], serial: Path):
        self.serial = serial
        self.stderr = open(serial.with_suffix(".qemu-stderr"), "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-m", "512", "-display", "none", "-monitor", "none",
             "-no-reboot", "-serial", f"file:{serial}", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr)

    def log(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.stderr.close()


def boot(argv: list[str], serial: Path, listener: Listener, until: set[str],
         timeout: float = 300, then_log: str = "") -> Vm:
    """Run a guest until a report of a kind in ``until`` arrives (and then ``then_log`` shows on
    its console) or QEMU exits; bounded by ``timeout``."""
    vm = Vm(argv, serial)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and vm.proc.poll() is None:
            if any(r["kind"] in until for r in listener.reports) and then_log in vm.log():
                break
            time.sleep(0.5)
        else:
            if vm.proc.poll() is None:
                raise AssertionError(f"no {until} report in {timeout:.0f} s:\n{vm.log()[-3000:]}")
    finally:
        vm.stop()
    return vm


def cmdline(listener: Listener, image: str, mode: str, blob: Path, token: str) -> str:
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    listener.blobs[f"blobs/{sha}"] = blob.read_bytes()
    port = listener.url.rsplit(":", 1)[1]
    return (f"console=ttyS0,115200 dynprov.server=http://10.0.2.2:{port} dynprov.node=n001 "
            f"dynprov.image={image} dynprov.mode={mode} dynprov.rootfs=blobs/{sha} "
            f"dynprov.sha256={sha} dynprov.token={token}")


def netboot_argv(images: dict[str, Path], append: str, nic: str = "virtio-net-pci") -> list[str]:
    # user-mode network: the guest's 10.0.2.2 is the host's 127.0.0.1
    return ["-kernel", str(images["vmlinuz"]), "-initrd", str(images["initrd"]),
            "-append", append, "-netdev", "user,id=n0", "-device", f"{nic},netdev=n0"]


@pytest.mark.e2e
def test_boot_stateless_switch_root(images: dict[str, Path], listener: Listener,
                                    tmp_path: Path) -> None:
    qemu_available()
    append = cmdline(listener, "centos5", "stateless", images["centos5"], "tok-sl")
    vm = boot(netboot_argv(images, append), tmp_path / "serial.log", listener, {"ready", "failed"})
    kinds = [(r["kind"], r["detail"]) for r in listener.reports]
    assert [k for k, _ in kinds] == ["booting", "progress", "ready"], (kinds, vm.log()[-3000:])
    assert kinds[0][1].startswith("initramfs on eth0 10.0.2.15")
    assert kinds[-1] == ("ready", "centos5")
    assert {r["token"] for r in listener.reports} == {"tok-sl"}
    # /init and the image's agent send the hardware facts (QEMU's default NIC MAC, its memory).
    from pxe import hwfacts

    for report in (listener.reports[0], listener.reports[-1]):
        facts = hwfacts.parse(report["facts"])
        assert {"name": "eth0", "mac": "52:54:00:12:34:56"} in facts["nics"], report["facts"]
        assert facts["cpus"] >= 1 and facts["memory_mib"] > 64
    log = vm.log()
    assert "switch_root into centos5" in log and "centos5 is up on eth0" in log
    assert "Kernel panic" not in log


@pytest.mark.e2e
def test_boot_stateful_install_then_disk(images: dict[str, Path], listener: Listener,
                                         tmp_path: Path) -> None:
    """Install boot (e1000) writes the disk and reboots; the disk then boots on SeaBIOS and its
    agent reports ready with the token /init put on its syslinux APPEND line."""
    qemu_available()
    disk = tmp_path / "node.disk"
    with open(disk, "wb") as fh:
        fh.truncate(64 * MIB)
    drive = ["-drive", f"file={disk},format=raw,if=virtio"]
    append = cmdline(listener, "sles11", "stateful", images["sles11"], "tok-sf")
    vm = boot(netboot_argv(images, append, nic="e1000") + drive, tmp_path / "install.log",
              listener, {"failed"})
    assert vm.proc.returncode == 0, vm.log()[-3000:]  # -no-reboot: the guest's reboot ends QEMU
    kinds = [r["kind"] for r in listener.reports]
    assert kinds == ["booting", "progress", "installed"], (listener.reports, vm.log()[-3000:])
    assert listener.reports[-1]["detail"] == "wrote sles11 to /dev/vda"
    # The next boot from disk (NIC ROM off: SeaBIOS would PXE-boot it even with order=c).
    vm = boot(["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=",
               "-boot", "order=c", *drive], tmp_path / "disk.log", listener, {"ready", "failed"})
    assert "facts" in listener.reports[-1] and listener.reports[-1].pop("facts")
    assert listener.reports[-1] == {"node": "n001", "token": "tok-sf", "kind": "ready",
                                    "detail": "sles11"}, vm.log()[-3000:]
    assert "dynprov.token=tok-sf" in vm.log()  # the kernel shows the command line it got


@pytest.mark.e2e
def test_boot_checksum_mismatch_reports_failed(images: dict[str, Path], listener: Listener,
                                               tmp_path: Path) -> None:
    qemu_available()
    append = cmdline(listener, "centos5", "stateless", images["centos5"], "tok-bad")
    sha = append.split("dynprov.sha256=")[1].split()[0]
    append = append.replace(f"dynprov.sha256={sha}", f"dynprov.sha256={'0' * 64}")
    vm = boot(netboot_argv(images, append), tmp_path / "serial.log", listener,
              {"ready", "failed"}, then_log="leaving a shell on the console")
    assert [r["kind"] for r in listener.reports] == ["booting", "failed"]
    assert listener.reports[-1]["detail"] == f"sha256 mismatch: got {sha}, expected {'0' * 64}"
    log = vm.log()
    assert "leaving a shell on the console" in log and "Kernel panic" not in log
