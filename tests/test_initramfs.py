"""The provisioning initramfs: module resolution, the cpio it builds, and its shell library run with
busybox sh on the host against a call-home listener on 127.0.0.1 (tests/test_initramfs_images.py
builds the test images and boots both in QEMU)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Site
from initramfs_support import (
    BUSYBOX,
    LIB,
    SHELL_DIR,
    Listener,
    bbsh,
    busybox_path,
    kernel_root,
    running_listener,
)

from pxe import initramfs
from pxe.errors import DynprovError, InputError
from pxe.fstree import Tree

SHA_A = "a" * 64


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kroot() -> Path:
    return kernel_root()


@pytest.fixture(scope="session")
def built_initramfs(kroot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("initramfs") / "initrd.img"
    initramfs.build(kroot, out)
    return out


@pytest.fixture(scope="session")
def bbpath(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_path(tmp_path_factory.mktemp("bb"))


@pytest.fixture
def listener() -> Iterator[Listener]:
    with running_listener() as srv:
        yield srv


def fake_kernel(root: Path, dep: str, builtin: str = "", softdep: str = "",
                alias: str = "") -> initramfs.KernelTree:
    moddir = root / "lib/modules/9.9.9-test"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(dep)
    (moddir / "modules.builtin").write_text(builtin)
    (moddir / "modules.softdep").write_text(softdep)
    (moddir / "modules.alias").write_text(alias)
    for line in dep.splitlines():
        path = moddir / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF module " + path.name.encode())
    return initramfs.kernel_tree(root)


def cpio_list(archive: Path, verbose: bool = False) -> list[str]:
    """The system's cpio -t over the (gzip) archive."""
    raw = gzip.decompress(archive.read_bytes())
    proc = subprocess.run(["cpio", "-t", *(["-v"] if verbose else []), "--quiet"], input=raw,
                          capture_output=True, timeout=60, check=True)
    return proc.stdout.decode().splitlines()


# --- module resolution ----------------------------------------------------------------------

@pytest.mark.unit
def test_resolve_orders_dependencies_first_and_skips_builtins(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path, (
        "kernel/net/nic-a.ko: kernel/lib/mid.ko kernel/lib/base.ko\n"
        "kernel/lib/mid.ko: kernel/lib/base.ko\n"
        "kernel/lib/base.ko:\n"
        "kernel/fs/fsx.ko.xz: kernel/lib/base.ko\n"
        "kernel/crypto/crc_fast.ko:\nkernel/crypto/crc_generic.ko:\n"
        "kernel/lib/crcuser.ko:\n"),
        builtin="kernel/net/packet/af_packet.ko\n",
        softdep="# comment\nsoftdep crcuser pre: crc-alias post: mid\n",
        alias="alias crc-alias crc_fast\nalias crc-alias crc_generic\nalias pci:v* nic_a\n")
    order = initramfs.resolve_modules(kernel, ["nic-a", "af_packet", "fsx", "crcuser", "mid"])
    assert order == ["kernel/lib/base.ko", "kernel/lib/mid.ko", "kernel/net/nic-a.ko",
                     "kernel/fs/fsx.ko.xz", "kernel/crypto/crc_fast.ko",
                     "kernel/crypto/crc_generic.ko", "kernel/lib/crcuser.ko"]
    with pytest.raises(InputError, match="unknown kernel module.*nosuch"):
        initramfs.resolve_modules(kernel, ["nic_a", "nosuch"])


@pytest.mark.unit
def test_module_names_and_lists() -> None:
    assert initramfs.module_name("kernel/crypto/crct10dif-pclmul.ko.zst") == "crct10dif_pclmul"
    assert initramfs.parse_module_list("e1000, virtio_net,,") == ["e1000", "virtio_net"]
    for bad in ("e1000;reboot", "../x", "a b"):
        with pytest.raises(InputError, match="bad module name"):
            initramfs.parse_module_list(bad)


@pytest.mark.unit
def test_kernel_tree_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no lib/modules"):
        initramfs.kernel_tree(tmp_path)
    for version in ("1.0", "2.0"):
        (tmp_path / "lib/modules" / version).mkdir(parents=True)
        (tmp_path / "lib/modules" / version / "modules.dep").write_text("")
    with pytest.raises(InputError, match="several kernels"):
        initramfs.kernel_tree(tmp_path)
    assert initramfs.kernel_tree(tmp_path, "2.0").version == "2.0"
    with pytest.raises(InputError, match="no modules.dep for kernel 3.0"):
        initramfs.kernel_tree(tmp_path, "3.0")


@pytest.mark.unit
def test_compressed_modules_are_stored_plain(tmp_path: Path) -> None:
    import lzma

    kernel = fake_kernel(tmp_path, "kernel/a.ko.xz:\nkernel/b.ko.gz: kernel/a.ko.xz\n")
    (kernel.moddir / "kernel/a.ko.xz").write_bytes(lzma.compress(b"AAA"))
    (kernel.moddir / "kernel/b.ko.gz").write_bytes(gzip.compress(b"BBB"))
    tree = Tree()
    written = initramfs.add_modules(tree, kernel, initramfs.resolve_modules(kernel, ["b"]))
    assert written == ["kernel/a.ko", "kernel/b.ko"]
    files = dict(tree)
    assert files["lib/modules/9.9.9-test/kernel/a.ko"].data == b"AAA"
    assert files["etc/dynprov/modules"].data == b"kernel/a.ko\nkernel/b.ko\n"
    assert b"kernel/b.ko: kernel/a.ko" in files["lib/modules/9.9.9-test/modules.dep"].data


@pytest.mark.unit
def test_tree_refuses_escapes_and_static_check() -> None:
    tree = Tree()
    for bad in ("../etc/passwd", "a/../../b", "/"):
        with pytest.raises(DynprovError, match="bad path"):
            tree.add_file(bad, b"x")
    if BUSYBOX.is_file():
        assert initramfs.is_static_elf(BUSYBOX)
    assert not initramfs.is_static_elf(Path("/bin/ls"))  # dynamically linked on Debian
    assert not initramfs.is_static_elf(LIB)


@pytest.mark.integration
def test_real_modules_dep_order(kroot: Path) -> None:
    """virtio needs its whole chain, in the order facts.md found on this kernel."""
    kernel = initramfs.kernel_tree(kroot)
    index = initramfs.ModuleIndex.load(kernel)
    names = [initramfs.module_name(p) for p in index.resolve(["virtio_pci", "virtio_net"])]
    assert names == ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                     "virtio_pci", "failover", "net_failover", "virtio_net"]
    order = [initramfs.module_name(p) for p in index.resolve(initramfs.DEFAULT_MODULES)]
    assert len(order) == len(set(order))
    for i, name in enumerate(order):  # every hard dependency is loaded before its user
        assert set(index.deps[name]) <= set(order[:i]), name
    for wanted in ("e1000", "virtio_blk", "sd_mod", "squashfs", "loop", "overlay", "vfat"):
        assert wanted in order


# --- the built initramfs ---------------------------------------------------------------------

@pytest.mark.integration
def test_initramfs_cpio_listing(built_initramfs: Path, kroot: Path) -> None:
    version = initramfs.kernel_tree(kroot).version
    names = cpio_list(built_initramfs)
    for path in ("init", "bin/busybox", "bin/sh", "sbin/switch_root", "sbin/udhcpc",
                 "lib/dynprov/lib.sh", "lib/dynprov/udhcpc.script", "etc/dynprov/modules",
                 "dev/console", f"lib/modules/{version}/kernel/drivers/net/virtio_net.ko",
                 f"lib/modules/{version}/kernel/drivers/net/ethernet/intel/e1000/e1000.ko",
                 f"lib/modules/{version}/modules.dep", "newroot"):
        assert path in names, path
    verbose = {line.split(" -> ")[0].split()[-1]: line
               for line in cpio_list(built_initramfs, verbose=True)}
    assert verbose["dev/console"].startswith("crw-------")
    assert verbose["init"].startswith("-rwxr-xr-x")
    assert verbose["bin/sh"].startswith("lrwxrwxrwx") and verbose["bin/sh"].endswith(
        "-> /bin/busybox")
    lsinitramfs = shutil.which("lsinitramfs")
    if lsinitramfs:  # initramfs-tools-core's reader agrees
        out = subprocess.run([lsinitramfs, str(built_initramfs)], capture_output=True, text=True,
                             timeout=120, check=True).stdout.split()
        assert {"init", "bin/busybox", "etc/dynprov/modules"} <= set(out)


@pytest.mark.integration
def test_initramfs_unpacks_with_cpio(built_initramfs: Path, kroot: Path,
                                     tmp_path: Path) -> None:
    subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"],
                   input=gzip.decompress(built_initramfs.read_bytes()), cwd=tmp_path,
                   check=True, timeout=60, capture_output=True)
    version = initramfs.kernel_tree(kroot).version
    order = (tmp_path / "etc/dynprov/modules").read_text().split()
    expected = initramfs.resolve_modules(initramfs.kernel_tree(kroot), initramfs.DEFAULT_MODULES)
    assert order == expected
    for path in order:
        assert (tmp_path / "lib/modules" / version / path).read_bytes() == \
            (kroot / "lib/modules" / version / path).read_bytes()
    assert (tmp_path / "init").read_bytes() == (SHELL_DIR / "init").read_bytes()
    assert os.access(tmp_path / "init", os.X_OK)
    assert os.readlink(tmp_path / "bin/sh") == "/bin/busybox"


@pytest.mark.integration
def test_cli_build_and_modules(kroot: Path, tmp_path: Path, site: Site) -> None:
    out = tmp_path / "small.img"
    proc = site.run("initramfs", "build", "--kernel-root", str(kroot), "-o", str(out),
                    "--modules", "e1000", "--compress", "xz", check=True)
    assert "1 modules" in proc.stdout and out.read_bytes()[:6] == b"\xfd7zXZ\x00"
    proc = site.run("initramfs", "modules", "--kernel-root", str(kroot), "--modules",
                    "virtio_net", "--json", check=True)
    assert "virtio_ring.ko" in proc.stdout
    bad = site.run("initramfs", "build", "--kernel-root", str(kroot), "-o", str(out),
                   "--modules", "nosuchmod")
    assert bad.returncode == 2 and "unknown kernel module(s): nosuchmod" in bad.stderr
    bad = site.run("initramfs", "build", "--kernel-root", str(tmp_path), "-o", str(out))
    assert bad.returncode == 2 and "no lib/modules" in bad.stderr


# --- the shell library, run with busybox sh --------------------------------------------------

@pytest.mark.integration
def test_shell_files_parse(bbpath: Path) -> None:
    for name in ("init", "lib.sh", "agent", "image-rcS", "udhcpc.script"):
        proc = subprocess.run([str(BUSYBOX), "sh", "-n", str(SHELL_DIR / name)],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, (name, proc.stderr)


@pytest.mark.integration
def test_parse_cmdline(bbpath: Path, tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(
        "BOOT_IMAGE=/vmlinuz console=ttyS0,115200 dynprov.server=http://10.0.0.1:8080/ "
        "dynprov.node=n001 dynprov.image=centos5 dynprov.mode=stateless "
        f"dynprov.rootfs=blobs/{SHA_A} dynprov.sha256={SHA_A.upper()} dynprov.token=T0k "
        "dynprov.unknown=x BOOTIF=01-52-54-00-12-34-56 init=/bin/sh *\n")
    proc = bbsh(bbpath, 'dp_parse_cmdline; for v in SERVER NODE IMAGE MODE ROOTFS SHA256 TOKEN '
                        'BOOTIF INIT DISK; do eval "echo $v=\\$DP_$v"; done',
                env={"DYNPROV_CMDLINE_FILE": str(cmdline)})
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert got == {"SERVER": "http://10.0.0.1:8080", "NODE": "n001", "IMAGE": "centos5",
                   "MODE": "stateless", "ROOTFS": f"blobs/{SHA_A}", "SHA256": SHA_A,
                   "TOKEN": "T0k", "BOOTIF": "01-52-54-00-12-34-56", "INIT": "/bin/sh",
                   "DISK": ""}


@pytest.mark.integration
@pytest.mark.parametrize("field,value,ok", [
    ("server", "http://10.0.0.1:8080", True), ("server", "http://[fd00::1]:80", True),
    ("server", "https://x", False), ("server", "http://x/$(reboot)", False),
    ("server", "", False), ("node", "n001", True), ("node", "n;reboot", False),
    ("node", "-n", False), ("image", "centos5.x_64-b", True), ("image", "a/b", False),
    ("mode", "stateful", True), ("mode", "both", False),
    ("token", "Ab-_.~9", True), ("token", "a&kind=ready", False), ("token", "", False),
    ("rootfs", f"blobs/{SHA_A}", True), ("rootfs", "../etc/shadow", False),
    ("rootfs", "/etc/shadow", False), ("rootfs", "a/../../x", False),
    ("sha256", SHA_A, True), ("sha256", SHA_A[:63], False), ("sha256", "g" * 64, False),
])
def test_cmdline_values_checked(bbpath: Path, field: str, value: str, ok: bool) -> None:
    proc = bbsh(bbpath, f'dp_valid {field} "$V" && echo OK || echo "BAD $DP_ERROR"',
                env={"V": value})
    assert proc.stdout.startswith("OK") is ok, proc.stdout


@pytest.mark.integration
def test_report_posts_the_contract_form(bbpath: Path, listener: Listener,
                                        tmp_path: Path) -> None:
    detail = "wrote centos5 to /dev/vda: 100% & done=yes é"
    proc = bbsh(bbpath, 'dp_parse_cmdline; dp_report booting "$D"; echo rc=$?',
                env={**listener.cmdline_env(tmp_path), "D": detail})
    assert "rc=0" in proc.stdout, proc.stderr
    assert listener.reports == [{"node": "n001", "token": "tok-123_ABC", "kind": "booting",
                                 "detail": detail}]
    assert listener.content_types == ["application/x-www-form-urlencoded"]
    assert "dynprov: reported booting" in proc.stderr


@pytest.mark.integration
def test_report_refused_is_not_retried(bbpath: Path, listener: Listener,
                                       tmp_path: Path) -> None:
    for fields, code in (({"token": "used-token"}, "403"), ({"node": "nosuchnode"}, "404")):
        env = listener.cmdline_env(tmp_path, **fields)
        listener.reports.clear()
        proc = bbsh(bbpath, "dp_parse_cmdline; dp_report ready centos5; echo rc=$?",
                    env={**env, "DYNPROV_REPORT_TRIES": "3"})
        assert "rc=1" in proc.stdout and code in proc.stderr and "refused" in proc.stderr
        assert len(listener.reports) == 1


@pytest.mark.integration
def test_report_unreachable_is_bounded(bbpath: Path, listener: Listener,
                                       tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    proc = bbsh(bbpath, "dp_parse_cmdline; dp_report booting x; echo rc=$?",
                env={**listener.cmdline_env(tmp_path, server=dead), "DYNPROV_REPORT_TRIES": "3"})
    assert "rc=2" in proc.stdout and proc.stderr.count("failed") == 3
    # A server that accepts but never answers: `timeout` ends each attempt.
    listener.hang_seconds = 4
    proc = bbsh(bbpath, "dp_parse_cmdline; dp_report booting x; echo rc=$?",
                env={**listener.cmdline_env(tmp_path), "DYNPROV_REPORT_TRIES": "2",
                     "DYNPROV_REPORT_TIMEOUT": "1"})
    assert "rc=2" in proc.stdout and "attempt 2/2 failed" in proc.stderr
    assert time.monotonic() - t0 < 30


@pytest.mark.integration
def test_cannot_report_without_token(bbpath: Path, tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("dynprov.server=http://127.0.0.1:9 dynprov.node=n1\n")
    proc = bbsh(bbpath, "dp_parse_cmdline; dp_report booting x; echo rc=$?",
                env={"DYNPROV_CMDLINE_FILE": str(tmp_path / "cmdline")})
    assert "rc=1" in proc.stdout and "missing or malformed dynprov.token" in proc.stderr


@pytest.mark.integration
def test_fetch_verify_and_kinds(bbpath: Path, listener: Listener, tmp_path: Path) -> None:
    tar = io.BytesIO()
    tree = Tree()
    tree.add_file("etc/os-release", b"IMAGE_ID=centos5\n")
    tree.add_symlink("sbin/init", "/bin/busybox")
    tree.write_tar(tar, "gz")
    blob = tar.getvalue()
    sha = hashlib.sha256(blob).hexdigest()
    listener.blobs[f"blobs/{sha}"] = blob
    env = listener.cmdline_env(tmp_path, rootfs=f"blobs/{sha}", sha256=sha)
    root = tmp_path / "root"
    root.mkdir()
    proc = bbsh(bbpath, 'dp_parse_cmdline; dp_fetch "$DP_SERVER/$DP_ROOTFS" "$F" || exit 3; '
                        'dp_verify "$F" "$DP_SHA256" || exit 4; dp_kind "$F"; '
                        'dp_unpack_tar "$F" "$R" || { echo "$DP_ERROR"; exit 5; }; '
                        'dp_verify "$F" "$(echo $DP_SHA256 | tr a-f 0-5)"; echo "$DP_ERROR"',
                env={**env, "F": str(tmp_path / "rootfs"), "R": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "gzip"
    assert "sha256 mismatch: got " + sha in proc.stdout
    assert (root / "etc/os-release").read_text() == "IMAGE_ID=centos5\n"
    assert os.readlink(root / "sbin/init") == "/bin/busybox"
    proc = bbsh(bbpath, 'dp_fetch "$U" "$F"; echo "rc=$? $DP_ERROR"',
                env={"U": f"{listener.url}/blobs/{SHA_A}", "F": str(tmp_path / "x"),
                     "DYNPROV_FETCH_TRIES": "3"})
    assert "rc=1 cannot fetch" in proc.stdout and "404" in proc.stdout
    assert not (tmp_path / "x").exists()
    samples = {"tar": b"\0" * 257 + b"ustar\x0000" + b"\0" * 254, "unknown": b"hello" * 200,
               "squashfs": b"hsqs" + b"\0" * 100, "xz": b"\xfd7zXZ\x00" + b"\0" * 10,
               "disk": b"\0" * 510 + b"\x55\xaa", "zstd": b"\x28\xb5\x2f\xfd" + b"\0" * 8}
    for kind, data in samples.items():
        (tmp_path / kind).write_bytes(data)
        out = bbsh(bbpath, f'dp_kind "{tmp_path / kind}"').stdout.strip()
        assert out == kind


@pytest.mark.integration
def test_write_disk_and_patch_bootcfg(bbpath: Path, tmp_path: Path) -> None:
    disk = os.urandom(4096 - 2) + b"\x55\xaa"
    disk = disk[:510] + b"\x55\xaa" + disk[512:]
    (tmp_path / "disk.gz").write_bytes(gzip.compress(disk))
    (tmp_path / "notdisk.gz").write_bytes(gzip.compress(b"\0" * 1024))
    proc = bbsh(bbpath, 'dp_write_disk "$T/disk.gz" "$T/dev" || exit 3; '
                        'dp_write_disk "$T/notdisk.gz" "$T/dev2"; echo "rc=$? $DP_ERROR"',
                env={"T": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dev").read_bytes() == disk
    assert "rc=1 stateful root filesystem is not a disk image" in proc.stdout
    cfg = tmp_path / "syslinux.cfg"
    cfg.write_text("DEFAULT dynprov\nLABEL dynprov\n  KERNEL /vmlinuz\n"
                   "  APPEND console=ttyS0,115200 dynprov.token=old  \n")
    env = {"DYNPROV_CMDLINE_FILE": str(tmp_path / "cmdline"), "C": str(cfg)}
    (tmp_path / "cmdline").write_text(
        f"dynprov.server=http://10.0.2.2:8080 dynprov.node=d1 dynprov.image=sles11 "
        f"dynprov.mode=stateful dynprov.rootfs=blobs/{SHA_A} dynprov.sha256={SHA_A} "
        "dynprov.token=new-tok\n")
    for _ in range(2):  # idempotent
        proc = bbsh(bbpath, 'dp_parse_cmdline; dp_patch_bootcfg "$C"', env=env)
        assert proc.returncode == 0, proc.stderr
    assert cfg.read_text().splitlines()[-1] == (
        "  APPEND console=ttyS0,115200 dynprov.server=http://10.0.2.2:8080 dynprov.node=d1 "
        "dynprov.image=sles11 dynprov.mode=stateful dynprov.token=new-tok")


@pytest.mark.integration
def test_agent_reports_ready_with_label(bbpath: Path, listener: Listener,
                                        tmp_path: Path) -> None:
    osr = tmp_path / "os-release"
    osr.write_text('NAME="dynprov test image"\nID=dynprov-test\nIMAGE_ID="centos5"\n')
    env = {"PATH": str(bbpath), "DYNPROV_LIB": str(LIB), "DYNPROV_OS_RELEASE": str(osr),
           "DYNPROV_REPORT_PAUSE": "0"}
    agent = [str(BUSYBOX), "sh", str(SHELL_DIR / "agent")]

    def run(**fields: str) -> subprocess.CompletedProcess:
        return subprocess.run(agent, env={**env, **listener.cmdline_env(tmp_path, **fields)},
                              capture_output=True, text=True, timeout=60)

    assert run().returncode == 0
    facts = listener.reports[-1].pop("facts")  # this host's /proc and /sys (lib.sh: dp_facts)
    assert facts.startswith("cpus ") and "\nmemory_kib " in facts
    assert listener.reports[-1] == {"node": "n001", "token": "tok-123_ABC", "kind": "ready",
                                    "detail": "centos5"}
    wrong = run(image="sles11")
    assert wrong.returncode == 1
    assert listener.reports[-1]["kind"] == "failed"
    assert listener.reports[-1]["detail"] == "booted image centos5, expected sles11"
    assert run(token="used-token").returncode == 1
    (tmp_path / "cmdline").write_text("console=ttyS0 quiet\n")
    before = len(listener.reports)
    plain = subprocess.run(agent, env={**env, "DYNPROV_CMDLINE_FILE": str(tmp_path / "cmdline")},
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and "nothing to report" in plain.stderr
    assert len(listener.reports) == before
