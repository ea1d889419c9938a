"""Tiny busybox test images ("centos5", "sles11", ...) that the demo and the e2e tests boot.

An image root is busybox-static + busybox init + our agent (initramfs/agent) + an
/etc/os-release whose IMAGE_ID is the label, packed as the root filesystem the provisioning
/init expects:

  stateless  tar.gz (default), tar.xz, tar or squashfs: /init unpacks or mounts it in RAM and
             switch_roots into /sbin/init; rcS finds the network up and runs the agent.
  stateful   disk.gz (default) or disk: a raw disk image, MBR (syslinux mbr.bin) + one FAT
             partition holding syslinux, the kernel and the image root as an initrd (with the NIC
             modules), so it boots from disk on SeaBIOS. Built with sfdisk, mtools and
             `syslinux --offset`: no loop mounts, no root. /init writes it to the node's disk and
             appends this boot's dynprov.* parameters to its syslinux APPEND line; the agent of
             the disk boot then reports "ready" with the same token.

`tools/make-test-image LABEL -o FILE [--mode stateful] [--kernel-root DIR] [--boot-dir DIR]`
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pxe import atomic, initramfs, validate
from pxe.errors import DynprovError, InputError
from pxe.fstree import Tree, compress

FORMATS = {"stateless": ("tar.gz", "tar.xz", "tar", "squashfs"), "stateful": ("disk.gz", "disk")}
# What the image's own rcS loads when it boots from disk (stateless: /init already did).
IMAGE_MODULES = ("e1000", "e1000e", "virtio_pci", "virtio_net")
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
MIB = 1 << 20

INITTAB = """\
# busybox init of a dynprov test image
::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot -f
::shutdown:/bin/sync
"""

SYSLINUX_CFG = """\
# dynprov test image {label}. The provisioning /init appends the dynprov.* parameters of the
# install boot to APPEND, so the installed system's agent can call home.
SERIAL 0 115200
DEFAULT dynprov
PROMPT 0
TIMEOUT 1
LABEL dynprov
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND console=tty0 console=ttyS0,115200
"""


def os_release(label: str, os_name: str) -> str:
    return (f'NAME="dynprov test image"\nID=dynprov-test\nIMAGE_ID={label}\n'
            f'PRETTY_NAME="{os_name} (dynprov test image {label})"\n')


def image_tree(label: str, *, os_name: str = "", kernel: initramfs.KernelTree | None = None,
               modules: Sequence[str] = IMAGE_MODULES,
               busybox: Path = initramfs.BUSYBOX) -> Tree:
    """The image's root: busybox, init + rcS, the agent, os-release; with ``kernel``, also the
    NIC modules (load order in /etc/dynprov/modules) for a boot without our initramfs."""
    label = validate.label(label)
    if os_name:
        validate.label(os_name, "OS name")
    tree = Tree()
    initramfs.add_base(tree)
    initramfs.add_busybox(tree, busybox)
    initramfs.add_dynprov_lib(tree)
    tree.add_file("usr/sbin/dynprov-agent", initramfs.shell_file("agent"), 0o755)
    tree.add_file("etc/init.d/rcS", initramfs.shell_file("image-rcS"), 0o755)
    tree.add_file("etc/inittab", INITTAB.encode())
    tree.add_file("etc/os-release", os_release(label, os_name or label).encode())
    tree.add_file("etc/hostname", f"{label}\n".encode())
    tree.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.add_file("etc/group", b"root:x:0:\n")
    tree.add_file("etc/profile", f'PS1="[{label} \\h] \\w # "\nexport PS1\n'.encode())
    if kernel is not None:
        initramfs.add_modules(tree, kernel, initramfs.resolve_modules(kernel, modules))
    return tree


def _run(argv: list[str], stdin: str | None = None) -> None:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                              input=stdin)
    except FileNotFoundError:
        raise DynprovError(f"{argv[0]} not found (tools/install-deps installs it)") from None
    if proc.returncode != 0:
        raise DynprovError(f"{' '.join(argv[:2])} failed: {(proc.stderr or proc.stdout).strip()}")


def squashfs_bytes(tree: Tree) -> bytes:
    with tempfile.TemporaryDirectory(prefix="dynprov-sqfs.") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        pseudo = tree.materialize(root)
        out = Path(tmp) / "rootfs.squashfs"
        argv = ["mksquashfs", str(root), str(out), "-noappend", "-all-root", "-comp", "gzip",
                "-no-progress", "-quiet", "-mkfs-time", "0", "-all-time", "0"]
        for definition in pseudo:
            argv += ["-p", definition]
        _run(argv)
        return out.read_bytes()


def disk_bytes(tree: Tree, kernel: initramfs.KernelTree, label: str) -> bytes:
    """MBR + one bootable FAT partition at 1 MiB with syslinux, the kernel and the root as
    an initrd. Made in a plain file with sfdisk / mformat / mcopy / syslinux --offset."""
    if not kernel.vmlinuz.is_file():
        raise InputError(f"{kernel.vmlinuz}: no kernel to put on the disk image")
    if not SYSLINUX_MBR.is_file():
        raise DynprovError(f"{SYSLINUX_MBR} missing (apt-get install syslinux-common)")
    tree.add_symlink("init", "/bin/busybox")  # the kernel runs /init of the initrd: busybox init
    initrd = compress(tree.cpio_bytes(), "gzip")
    vmlinuz = kernel.vmlinuz.read_bytes()
    part_mib = (len(initrd) + len(vmlinuz)) * 5 // 4 // MIB + 4
    with tempfile.TemporaryDirectory(prefix="dynprov-disk.") as tmp:
        work = Path(tmp)
        disk = work / "disk.img"
        with open(disk, "wb") as fh:
            fh.truncate((1 + part_mib) * MIB)
        _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)],
             stdin=f"label: dos\nstart=2048, size={part_mib * 2048}, type=e, bootable\n")
        (work / "vmlinuz").write_bytes(vmlinuz)
        (work / "initrd.img").write_bytes(initrd)
        (work / "syslinux.cfg").write_text(SYSLINUX_CFG.format(label=label))
        image = f"{disk}@@{MIB}"
        # 64 heads x 32 sectors: the partition (whole MiBs) is a whole number of cylinders.
        _run(["mformat", "-i", image, "-T", str(part_mib * 2048), "-h", "64", "-s", "32",
              "-H", "2048", "-v", "DYNPROV", "-N", "44594E50", "::"])
        for name in ("vmlinuz", "initrd.img", "syslinux.cfg"):
            _run(["mcopy", "-i", image, str(work / name), f"::{name}"])
        _run(["syslinux", "--offset", str(MIB), "--install", str(disk)])
        data = bytearray(disk.read_bytes())
    data[:440] = SYSLINUX_MBR.read_bytes()[:440]  # boot code only: keep the partition table
    return bytes(data)


@dataclass(frozen=True)
class Built:
    output: Path
    label: str
    mode: str
    fmt: str
    sha256: str
    size: int


def build(label: str, output: Path, *, mode: str = "stateless", fmt: str | None = None,
          os_name: str = "", kernel_root: Path | None = None,
          modules: Sequence[str] = IMAGE_MODULES, busybox: Path = initramfs.BUSYBOX) -> Built:
    """Build the test image ``label`` into ``output`` (the root filesystem file)."""
    import hashlib

    validate.choice(mode, tuple(FORMATS), "image mode")
    fmt = fmt or FORMATS[mode][0]
    if fmt not in FORMATS[mode]:
        raise InputError(f"format {fmt!r} is not for {mode} images "
                         f"(choose {', '.join(FORMATS[mode])})")
    kernel = initramfs.kernel_tree(Path(kernel_root)) if kernel_root else None
    if mode == "stateful" and kernel is None:
        raise InputError("a stateful (disk) test image needs --kernel-root: it boots its own "
                         "kernel from disk")
    tree = image_tree(label, os_name=os_name, kernel=kernel, modules=modules, busybox=busybox)
    if fmt.startswith("tar"):
        import io

        buf = io.BytesIO()
        tree.write_tar(buf, fmt.partition(".")[2])
        data = buf.getvalue()
    elif fmt == "squashfs":
        data = squashfs_bytes(tree)
    else:
        assert kernel is not None
        data = disk_bytes(tree, kernel, label)
        if fmt == "disk.gz":
            data = compress(data, "gzip")
    try:
        atomic.write_bytes(Path(output), data)
    except OSError as exc:
        raise DynprovError(f"cannot write {output}: {exc.strerror or exc}") from None
    return Built(Path(output), label, mode, fmt, hashlib.sha256(data).hexdigest(), len(data))


def boot_files(kernel_root: Path, boot_dir: Path) -> tuple[Path, Path]:
    """The kernel and the provisioning initramfs an image in the catalog boots with."""
    kernel = initramfs.kernel_tree(Path(kernel_root))
    boot_dir.mkdir(parents=True, exist_ok=True)
    vmlinuz = boot_dir / "vmlinuz"
    shutil.copyfile(kernel.vmlinuz, vmlinuz)
    initrd = boot_dir / "initrd.img"
    initramfs.build(kernel_root, initrd, version=kernel.version)
    return vmlinuz, initrd


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make-test-image",
        description="Build a tiny busybox test image (root filesystem file) for dynprov.",
        epilog="Exit status: 0 ok, 1 failed, 2 bad usage or input.")
    parser.add_argument("label", help="image label, also IMAGE_ID in /etc/os-release")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="FILE")
    parser.add_argument("--mode", default="stateless", choices=tuple(FORMATS))
    parser.add_argument("--format", dest="fmt", choices=sorted({f for v in FORMATS.values()
                                                                 for f in v}),
                        help="stateless: tar.gz (default) tar.xz tar squashfs; "
                             "stateful: disk.gz (default) disk")
    parser.add_argument("--os-name", default="", help="for PRETTY_NAME (default: the label)")
    parser.add_argument("--kernel-root", type=Path, metavar="DIR",
                        help="unpacked kernel (tools/fetch-kernel): needed for stateful images "
                             "and --boot-dir")
    parser.add_argument("--boot-dir", type=Path, metavar="DIR",
                        help="also write DIR/vmlinuz and DIR/initrd.img (provisioning initramfs)")
    args = parser.parse_args(argv)
    try:
        if args.boot_dir and not args.kernel_root:
            raise InputError("--boot-dir needs --kernel-root")
        built = build(args.label, args.output, mode=args.mode, fmt=args.fmt,
                      os_name=args.os_name, kernel_root=args.kernel_root)
        print(f"wrote {built.output} ({built.mode} {built.fmt}, {built.size // 1024} KiB, "
              f"sha256 {built.sha256})")
        if args.boot_dir:
            vmlinuz, initrd = boot_files(args.kernel_root, args.boot_dir)
            print(f"wrote {vmlinuz} and {initrd}")
            print(f"add it: pxe-stage images add {built.label} --kernel {vmlinuz} "
                  f"--initrd {initrd} --rootfs {built.output} --mode {built.mode} "
                  f"--cmdline console=ttyS0,115200")
    except DynprovError as exc:
        print(f"make-test-image: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
