"""Turn a root tree into a bootable image: node side, kernel, provisioning initramfs, squashfs.

What goes into the tree (all under ``/usr/lib/dynprov``, so nothing of the image is replaced
except ``/etc/os-release``, and ``/etc/inittab`` when the image has no init system)::

    usr/lib/dynprov/init          PID 1 after the initramfs's switch_root (IMAGE_INIT below;
                                  the manifest's cmdline says init=/usr/lib/dynprov/init)
    usr/lib/dynprov/agent         the node agent (initramfs/agent): reports "ready"
    usr/lib/dynprov/lib.sh        its library (initramfs/lib.sh), udhcpc.script
    usr/lib/dynprov/env.sh        the agent's DYNPROV_LIB: dynprov's busybox applets first on PATH
    usr/lib/dynprov/bin/          busybox-static and its applets (wget, ip, udhcpc, timeout...):
                                  a minbase Debian or a container image has none of them
    etc/dynprov/packages          the requested packages (checked on the node with dpkg-query)
    etc/dynprov/check             the -check command, run on the node at boot
    etc/dynprov/modules           NIC modules to load if the network is not up yet
    etc/dynprov/slurm             -slurm only: the Slurm face is on (pxe.imagegen.slurm writes
                                  it, the Slurm node side and its start script)
    etc/os-release                the image's, plus IMAGE_ID=<label> (what the agent reports)
    lib/modules/<version>/        the kernel's modules: the boot set (NICs, disks, squashfs,
                                  overlay) and the indexes, or all of them (-all-modules)

Every path is resolved inside the tree (``pxe.bundle.resolve_in_tree``): a container image's
symbolic links cannot make the builder write outside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pxe import initramfs
from pxe.bundle import resolve_in_tree
from pxe.errors import DynprovError, InputError
from pxe.imagegen import kernel
from pxe.initramfs import KernelTree

DYNPROV = "usr/lib/dynprov"
INIT_PATH = f"/{DYNPROV}/init"
IMAGE_NIC_MODULES = ("e1000", "e1000e", "virtio_pci", "virtio_net")
COMPRESSORS = ("zstd", "gzip", "xz", "lz4")

IMAGE_INIT = r"""#!/usr/lib/dynprov/bin/busybox sh
# dynprov image init: PID 1 of an image made by fg-image-generate, started by the provisioning
# initramfs's switch_root (init=/usr/lib/dynprov/init on the image's kernel command line).
#  1. mount what the initramfs did not move in; hostname from dynprov.node
#  2. network: the initramfs's DHCP lease is kept; brought up here only if there is none
#  3. prove the image: the requested packages are installed (dpkg-query, from the image) and the
#     -check command runs (with the image's own /bin/sh and PATH); console + "progress" report
#  4. the agent reports "ready", or "failed" with the reason
#  5. exec the image's own init (systemd, sysvinit) if it has one, else busybox init with a root
#     shell on the console
D=/usr/lib/dynprov
PATH=$D/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
. $D/lib.sh

[ -e /proc/self ] || mount -t proc proc /proc
grep -q " /sys " /proc/mounts || mount -t sysfs sysfs /sys
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
grep -q " /run " /proc/mounts || mount -t tmpfs -o mode=0755 tmpfs /run
grep -q " /tmp " /proc/mounts || mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts /dev/shm
grep -q " /dev/pts " /proc/mounts || mount -t devpts devpts /dev/pts 2>/dev/null

dp_parse_cmdline
[ -n "$DP_NODE" ] && hostname "$DP_NODE"
ip link set lo up 2>/dev/null
iface=
for n in $(dp_interfaces 2>/dev/null); do
	[ -n "$(dp_ipv4 "$n")" ] && iface=$n && break
done
if [ -z "$iface" ]; then
	dp_load_modules /etc/dynprov/modules
	if dp_network_up $D/udhcpc.script; then iface=$DP_IFACE; else dp_log "network: $DP_ERROR"; fi
fi
label=$(dp_os_label /etc/os-release)
echo "dynprov: image $label is up on ${iface:-no network} $(dp_ipv4 "${iface:-lo}")"

problem=
if [ -e /etc/dynprov/slurm ] && [ -x $D/slurm/start ]; then
	# -slurm: the munge key over the node's one-time token, then munged and slurmd (or their
	# systemd units), all before "ready"
	out=$($D/slurm/start 2>&1)
	rc=$?
	echo "$out"
	[ "$rc" = 0 ] || problem="slurm: $(echo "$out" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-300)"
fi
if [ -s /etc/dynprov/packages ]; then
	have= missing=
	for p in $(sed 's/=.*//' /etc/dynprov/packages); do
		v=$(dpkg-query -W -f '${db:Status-Abbrev}${Version}' "$p" 2>/dev/null)
		case $v in
		ii*) have="$have $p=${v#ii }" ;;
		*) missing="$missing $p" ;;
		esac
	done
	echo "dynprov: packages:$have${missing:+ MISSING:$missing}"
	dp_report progress "packages:$have" || true
	[ -n "$missing" ] && problem="requested package(s) not installed:$missing"
fi
if [ -s /etc/dynprov/check ]; then
	cmd=$(cat /etc/dynprov/check)
	out=$(cd / && env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
		timeout 120 /bin/sh -c "$cmd" </dev/null 2>&1)
	rc=$?
	echo "dynprov: check \`$cmd\` exit $rc:"
	echo "$out" | head -n 40
	first=$(echo "$out" | grep -v '^[[:space:]]*$' | head -n 3 | tr '\n' ' ' | cut -c1-300)
	dp_report progress "check $cmd: exit $rc: $first" || true
	[ "$rc" = 0 ] || problem="${problem:+$problem; }check '$cmd' exited $rc: $first"
fi
if [ -n "$problem" ]; then
	dp_report failed "$problem"
else
	DYNPROV_LIB=$D/env.sh $D/bin/busybox sh $D/agent
fi

if [ -x /sbin/init ] || [ -L /sbin/init ]; then
	echo "dynprov: starting the image's /sbin/init"
	exec /sbin/init
fi
exec $D/bin/busybox init
"""

ENV_SH = """\
# fg-image-generate: the agent's library (DYNPROV_LIB) with dynprov's busybox applets first on
# PATH, so the agent finds wget, timeout and od whatever the image has.
PATH=/usr/lib/dynprov/bin:$PATH
export PATH
. /usr/lib/dynprov/lib.sh
"""

INITTAB = """\
# written by fg-image-generate: this image has no init system; busybox init runs a root shell
# on the console (the image's own /bin/sh)
::respawn:/usr/lib/dynprov/bin/cttyhack /bin/sh -l
::ctrlaltdel:/usr/lib/dynprov/bin/reboot -f
::shutdown:/usr/lib/dynprov/bin/sync
"""


# -- writing into a tree that may hold hostile symbolic links --------------------------------------
def _dest(tree: Path, rel: str) -> Path:
    """Where ``rel`` lands in ``tree`` (parents resolved inside it, created as needed); an
    existing file or symbolic link there is removed first."""
    path = PurePosixPath(rel)
    parent = resolve_in_tree(tree, path.parent)
    if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
        raise DynprovError(f"image tree: /{path.parent} is not a directory")
    parent.mkdir(parents=True, exist_ok=True)
    dest = parent / path.name
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        raise DynprovError(f"image tree: /{rel} exists and is not a file")
    return dest


def put_file(tree: Path, rel: str, data: bytes, mode: int = 0o644) -> Path:
    dest = _dest(tree, rel)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(dest, mode)
    return dest


def put_symlink(tree: Path, rel: str, target: str) -> None:
    os.symlink(target, _dest(tree, rel))


def read_text(tree: Path, rel: str) -> str | None:
    path = resolve_in_tree(tree, PurePosixPath(rel))
    try:
        return path.read_text(errors="replace") if path.is_file() else None
    except OSError:
        return None


# -- the node side ------------------------------------------------------------------------------
def os_release(text: str | None, label: str, os_name: str) -> str:
    """The image's os-release with IMAGE_ID=<label> (the agent reports it as the image)."""
    lines = [ln for ln in (text or "").splitlines()
             if not ln.startswith(("IMAGE_ID=", "IMAGE_VERSION="))]
    if not any(ln.startswith("ID=") for ln in lines):
        lines.append(f"ID={os_name.split('-')[0] or 'linux'}")
    lines.append(f"IMAGE_ID={label}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class NodeSide:
    has_init: bool
    applets: int


def add_node_side(tree: Path, *, label: str, os_name: str, packages: Sequence[str] = (),
                  check: str = "", busybox: Path = initramfs.BUSYBOX) -> NodeSide:
    """Install the init, the agent, busybox and the proof data into ``tree``."""
    busybox = Path(busybox)
    if not busybox.is_file() or not initramfs.is_static_elf(busybox):
        raise DynprovError(f"{busybox}: a static busybox is needed (apt-get install busybox-static)")
    proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise DynprovError(f"{busybox} --list failed: {proc.stderr.strip()}")
    put_file(tree, f"{DYNPROV}/bin/busybox", busybox.read_bytes(), 0o755)
    applets = [a for a in proc.stdout.split() if a and "/" not in a and a != "busybox"]
    for applet in applets:
        put_symlink(tree, f"{DYNPROV}/bin/{applet}", "busybox")
    put_file(tree, f"{DYNPROV}/lib.sh", initramfs.shell_file("lib.sh"))
    put_file(tree, f"{DYNPROV}/udhcpc.script", initramfs.shell_file("udhcpc.script"), 0o755)
    put_file(tree, f"{DYNPROV}/agent", initramfs.shell_file("agent"), 0o755)
    put_file(tree, f"{DYNPROV}/env.sh", ENV_SH.encode())
    put_file(tree, f"{DYNPROV}/init", IMAGE_INIT.encode(), 0o755)
    put_file(tree, "etc/dynprov/packages", "".join(f"{p}\n" for p in packages).encode())
    put_file(tree, "etc/dynprov/check", (check + "\n").encode() if check else b"")
    put_file(tree, "etc/os-release",
             os_release(read_text(tree, "etc/os-release") or read_text(tree, "usr/lib/os-release"),
                        label, os_name).encode())
    sbin_init = resolve_in_tree(tree, PurePosixPath("sbin/init"), follow_last=False)
    has_init = sbin_init.is_symlink() or sbin_init.is_file()
    if not has_init:
        put_file(tree, "etc/inittab", INITTAB.encode())
    return NodeSide(has_init=has_init, applets=len(applets))


# -- the kernel ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    tree: KernelTree   # root/boot/vmlinuz-VER and root/lib/modules/VER (symlinks into the image)
    source: str        # "image" (its own linux-image package), "cached" or "given"


def image_kernel(tree: Path, link_dir: Path) -> Kernel | None:
    """The image's own kernel (boot/vmlinuz-VER with lib/modules/VER/modules.dep), if any,
    as a KernelTree of symbolic links in ``link_dir`` that point at resolved paths."""
    boot = resolve_in_tree(tree, PurePosixPath("boot"))
    if not boot.is_dir():
        return None
    for vmlinuz in sorted(boot.glob("vmlinuz-*"), reverse=True):
        version = vmlinuz.name[len("vmlinuz-"):]
        if not vmlinuz.is_file() or vmlinuz.is_symlink() or "/" in version:
            continue
        moddir = resolve_in_tree(tree, PurePosixPath("lib/modules") / version)
        if not (moddir / "modules.dep").is_file():
            continue
        (link_dir / "boot").mkdir(parents=True, exist_ok=True)
        (link_dir / "lib" / "modules").mkdir(parents=True, exist_ok=True)
        (link_dir / "boot" / vmlinuz.name).symlink_to(vmlinuz)
        (link_dir / "lib" / "modules" / version).symlink_to(moddir)
        return Kernel(KernelTree(link_dir, version), "image")
    return None


def cached_kernel(timeout: float = 900) -> Kernel:
    """Debian's current amd64 kernel package, fetched once into a cache (pxe.imagegen.kernel)."""
    try:
        root = kernel.fetch(timeout=timeout)
    except DynprovError as exc:
        raise DynprovError(f"cannot fetch a kernel: {exc} (or add linux-image-amd64 to -packages, "
                           "or give -kernel-root DIR)") from exc
    return Kernel(initramfs.kernel_tree(root), "cached")


def add_modules(tree: Path, kernel: Kernel, everything: bool = False) -> int:
    """Copy the kernel's modules into the image (not needed when they are the image's own):
    the boot set (NICs, disks, squashfs, overlay) and every index file, or all of them.
    Also writes etc/dynprov/modules (NIC modules, in load order). Returns the files copied."""
    kt = kernel.tree
    nic = initramfs.resolve_modules(kt, IMAGE_NIC_MODULES)
    put_file(tree, "etc/dynprov/modules", "".join(f"{p}\n" for p in nic).encode())
    if kernel.source == "image":
        return 0
    rel = f"lib/modules/{kt.version}"
    count = 0
    if everything:
        base = _dest(tree, rel)
        shutil.copytree(kt.moddir, base, symlinks=True)
        return sum(1 for _ in base.rglob("*.ko*"))
    wanted = initramfs.resolve_modules(kt, initramfs.DEFAULT_MODULES)
    for index in sorted(kt.moddir.glob("modules.*")):
        if index.is_file():
            put_file(tree, f"{rel}/{index.name}", index.read_bytes())
            count += 1
    for path in wanted:
        put_file(tree, f"{rel}/{path}", (kt.moddir / path).read_bytes())
        count += 1
    return count


def provisioning_initrd(kernel: Kernel, out: Path) -> initramfs.BuildResult:
    """The provisioning initramfs (pxe.initramfs) for exactly this kernel: its modules must
    match the kernel the node boots, so the bundle carries its own."""
    return initramfs.build(kernel.tree.root, out, version=kernel.tree.version)


def vmlinuz(kernel: Kernel) -> Path:
    path = kernel.tree.vmlinuz
    if not path.exists():
        raise DynprovError(f"{path}: no kernel image")
    return path


# -- the root filesystem ----------------------------------------------------------------------------
def squash(tree: Path, out: Path, compressor: str = "zstd",
           owners: dict[str, tuple[int, int, str, str]] | None = None,
           timeout: float = 3600) -> Path:
    """Pack ``tree`` as squashfs. As root (or without recorded owners) with mksquashfs on the
    tree; a tree unpacked without root with its recorded owners goes through a tar and sqfstar,
    so files keep the owners the container image gave them."""
    if compressor not in COMPRESSORS:
        raise InputError(f"unknown squashfs compressor {compressor!r} (known: {', '.join(COMPRESSORS)})")
    if os.geteuid() == 0 or owners is None:
        argv = ["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress",
                "-comp", compressor]
        if os.geteuid() != 0:
            argv.append("-all-root")
        _run(argv, timeout)
        return out
    from pxe.bundle import rootfs_from_tree

    with tempfile.TemporaryDirectory(prefix="squash.", dir=out.parent) as tmp:
        tar = rootfs_from_tree(tree, Path(tmp) / "root.tar", "tar", owners)
        with open(tar, "rb") as fh:
            _run(["sqfstar", "-quiet", "-no-progress", "-comp", compressor, str(out)], timeout,
                 stdin=fh)
    return out


def _run(argv: list[str], timeout: float, stdin: object = None) -> None:
    try:
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, text=True,  # type: ignore[arg-type]
                              timeout=timeout)
    except FileNotFoundError:
        raise DynprovError(f"{argv[0]} not found (Debian package squashfs-tools)") from None
    if proc.returncode != 0:
        text = (proc.stderr or proc.stdout).strip()
        if "No space left" in text:
            raise OSError(28, f"No space left on device ({argv[0]})")
        raise DynprovError(f"{argv[0]} failed: {text[-800:]}")
