"""The provisioning initramfs: busybox-static + NIC/disk modules (modules.dep order) + our /init.

Layout of the cpio (newc, gzip by default):
  init                      initramfs/init
  lib/dynprov/lib.sh        initramfs/lib.sh (shared with the agent)
  lib/dynprov/udhcpc.script initramfs/udhcpc.script (udhcpc configures nothing without -s)
  etc/dynprov/modules       module paths relative to lib/modules/VERSION, in load order
  etc/dynprov/build-info    kernel version, modules asked for
  lib/modules/VERSION/...   the modules (decompressed) and a modules.dep for them
  bin/busybox + one symlink per applet, dev/console
"""

from __future__ import annotations

import gzip
import lzma
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pxe import atomic
from pxe.errors import DynprovError, InputError
from pxe.fstree import Tree, compress

BUSYBOX = Path("/bin/busybox")

# NICs and disks of the virtual cluster and common servers, and what /init mounts with.
# virtio_pci is the PCI transport for virtio_net/virtio_blk (not a modules.dep dependency).
DEFAULT_MODULES = (
    "e1000", "e1000e", "virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi",
    "ata_piix", "ahci", "sd_mod", "squashfs", "loop", "overlay", "vfat", "nls_cp437", "nls_ascii",
)
_MODULE_SUFFIX = re.compile(r"\.ko(\.xz|\.gz|\.zst)?$")


def module_name(path: str) -> str:
    """'kernel/drivers/net/virtio_net.ko.xz' -> 'virtio_net' (dashes read as underscores)."""
    return _MODULE_SUFFIX.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel package (tools/fetch-kernel) or a system root: ROOT/lib/modules/VER."""

    root: Path
    version: str

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"


def kernel_tree(root: Path, version: str | None = None) -> KernelTree:
    root = Path(root)
    base = root / "lib" / "modules"
    if not base.is_dir():
        raise InputError(f"{root}: no lib/modules (give the unpacked kernel package, "
                         "e.g. --kernel-root \"$(tools/fetch-kernel)\")")
    versions = sorted(d.name for d in base.iterdir() if (d / "modules.dep").is_file())
    if version is not None:
        if version not in versions:
            raise InputError(f"{root}: no modules.dep for kernel {version} "
                             f"(found: {', '.join(versions) or 'none'})")
        return KernelTree(root, version)
    if not versions:
        raise InputError(f"{base}: no kernel with a modules.dep (run depmod -b {root} VERSION)")
    if len(versions) > 1:
        raise InputError(f"{base}: several kernels ({', '.join(versions)}): choose one")
    return KernelTree(root, versions[0])


@dataclass
class ModuleIndex:
    """modules.dep (+ modules.builtin, modules.softdep "pre:") of one kernel."""

    paths: dict[str, str] = field(default_factory=dict)     # name -> path under moddir
    deps: dict[str, list[str]] = field(default_factory=dict)  # name -> dependency names
    builtin: set[str] = field(default_factory=set)
    pre: dict[str, list[str]] = field(default_factory=dict)   # softdep pre: names

    @classmethod
    def load(cls, tree: KernelTree) -> ModuleIndex:
        index = cls()
        for line in (tree.moddir / "modules.dep").read_text().splitlines():
            if ":" not in line:
                continue
            path, _, rest = line.partition(":")
            name = module_name(path.strip())
            index.paths[name] = path.strip()
            index.deps[name] = [module_name(d) for d in rest.split()]
        builtin = tree.moddir / "modules.builtin"
        if builtin.is_file():
            index.builtin = {module_name(p) for p in builtin.read_text().split()}
        aliases: dict[str, list[str]] = {}
        alias_file = tree.moddir / "modules.alias"
        if alias_file.is_file():
            for line in alias_file.read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "alias" and not any(c in words[1] for c in "*?["):
                    aliases.setdefault(words[1].replace("-", "_"), []).append(
                        words[2].replace("-", "_"))
        softdep = tree.moddir / "modules.softdep"
        if softdep.is_file():
            for line in softdep.read_text().splitlines():
                words = line.split()
                if len(words) < 3 or words[0] != "softdep" or "pre:" not in words:
                    continue
                name = words[1].replace("-", "_")
                start = words.index("pre:") + 1
                end = words.index("post:") if "post:" in words else len(words)
                for word in words[start:end]:
                    word = word.replace("-", "_")
                    for dep in aliases.get(word, [word]):  # modprobe loads every match
                        if dep in index.paths:
                            index.pre.setdefault(name, []).append(dep)
        return index

    def resolve(self, names: Iterable[str]) -> list[str]:
        """Module paths to load, every dependency before its user (modprobe's order).
        Built-in modules are skipped; an unknown name is an InputError."""
        order: list[str] = []
        done: set[str] = set()

        def visit(name: str, stack: tuple[str, ...]) -> None:
            if name in done or name in stack:
                return
            for dep in self.pre.get(name, []) + list(reversed(self.deps[name])):
                if dep in self.paths:
                    visit(dep, (*stack, name))
            done.add(name)
            order.append(self.paths[name])

        unknown = []
        for raw in names:
            name = raw.strip().replace("-", "_")
            if not name or (name in self.builtin and name not in self.paths):
                continue
            if name not in self.paths:
                unknown.append(raw)
                continue
            visit(name, ())
        if unknown:
            raise InputError(f"unknown kernel module(s): {', '.join(unknown)} "
                             "(not in modules.dep or modules.builtin)")
        return order


def resolve_modules(tree: KernelTree, names: Iterable[str]) -> list[str]:
    return ModuleIndex.load(tree).resolve(names)


def read_module(tree: KernelTree, path: str) -> tuple[str, bytes]:
    """A module's bytes, decompressed (busybox insmod loads plain .ko); returns (path.ko, data)."""
    src = tree.moddir / path
    try:
        if path.endswith(".ko.xz"):
            return path[:-3], lzma.decompress(src.read_bytes())
        if path.endswith(".ko.gz"):
            return path[:-3], gzip.decompress(src.read_bytes())
        if path.endswith(".ko.zst"):
            proc = subprocess.run(["zstd", "-dc", str(src)], capture_output=True, timeout=60)
            if proc.returncode != 0:
                raise DynprovError(f"zstd -d {src}: {proc.stderr.decode(errors='replace')}")
            return path[:-4], proc.stdout
        return path, src.read_bytes()
    except FileNotFoundError:
        raise DynprovError(f"module {src} is listed in modules.dep but missing") from None
    except OSError as exc:
        raise DynprovError(f"cannot read {src}: {exc.strerror or exc}") from None


def add_modules(tree: Tree, kernel: KernelTree, paths: Sequence[str]) -> list[str]:
    """Copy modules into lib/modules/VERSION of ``tree`` with a modules.dep for busybox modprobe
    and etc/dynprov/modules (the load order /init and rcS insmod). Returns the written paths."""
    index = ModuleIndex.load(kernel)
    base = f"lib/modules/{kernel.version}"
    written: list[str] = []
    renamed: dict[str, str] = {}
    for path in paths:
        dest, data = read_module(kernel, path)
        tree.add_file(f"{base}/{dest}", data)
        renamed[module_name(path)] = dest
        written.append(dest)
    dep_lines = [f"{renamed[name]}: " + " ".join(renamed[d] for d in index.deps[name] if d in renamed)
                 for name in renamed]
    tree.add_file(f"{base}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    tree.add_file("etc/dynprov/modules", ("\n".join(written) + "\n").encode())
    return written


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP program header (needs no ld.so)."""
    import struct

    with open(path, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF":
            return False
        bits64, little = head[4] == 2, head[5] == 1
        end = "<" if little else ">"
        if bits64:
            phoff, = struct.unpack(end + "Q", head[32:40])
            phentsize, phnum = struct.unpack(end + "HH", head[54:58])
        else:
            phoff, = struct.unpack(end + "I", head[28:32])
            phentsize, phnum = struct.unpack(end + "HH", head[42:46])
        for i in range(phnum):
            fh.seek(phoff + i * phentsize)
            p_type, = struct.unpack(end + "I", fh.read(4))
            if p_type == 3:  # PT_INTERP
                return False
    return True


def add_busybox(tree: Tree, busybox: Path = BUSYBOX) -> int:
    """bin/busybox (must be static: nothing else is in an initramfs) + a symlink per applet."""
    busybox = Path(busybox)
    if not busybox.is_file():
        raise DynprovError(f"{busybox}: no such file (apt-get install busybox-static)")
    if not is_static_elf(busybox):
        raise DynprovError(f"{busybox} is not a static executable (install busybox-static)")
    proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise DynprovError(f"{busybox} --list-full failed: {proc.stderr.strip()}")
    tree.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    count = 0
    for applet in proc.stdout.split():
        applet = applet.strip("/")
        if applet and applet != "bin/busybox" and applet not in tree:
            tree.add_symlink(applet, "/bin/busybox")
            count += 1
    return count


def add_base(tree: Tree) -> None:
    """The directories every root needs and /dev/console (the kernel opens it for init's stdio
    before anything mounts devtmpfs)."""
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "etc", "sbin", "usr/bin",
              "usr/sbin"):
        tree.add_dir(d)
    tree.add_dir("tmp", 0o1777)
    tree.add_chardev("dev/console", 5, 1, 0o600)
    tree.add_chardev("dev/null", 1, 3, 0o666)


def shell_file(name: str) -> bytes:
    """One of the shell sources under initramfs/ (packaged as pxe.assets.initramfs)."""
    from pxe import assets

    path = assets.initramfs() / name
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DynprovError(f"cannot read {path}: {exc.strerror or exc}") from None


def add_dynprov_lib(tree: Tree) -> None:
    tree.add_file("lib/dynprov/lib.sh", shell_file("lib.sh"), 0o644)
    tree.add_file("lib/dynprov/udhcpc.script", shell_file("udhcpc.script"), 0o755)


@dataclass(frozen=True)
class BuildResult:
    output: Path
    kernel_version: str
    modules: list[str]
    size: int


def build_tree(kernel: KernelTree, modules: Sequence[str] = DEFAULT_MODULES,
               busybox: Path = BUSYBOX) -> tuple[Tree, list[str]]:
    paths = resolve_modules(kernel, modules)
    tree = Tree()
    add_base(tree)
    add_busybox(tree, busybox)
    add_dynprov_lib(tree)
    tree.add_file("init", shell_file("init"), 0o755)
    tree.add_dir("newroot")
    written = add_modules(tree, kernel, paths)
    tree.add_file("etc/dynprov/build-info",
                  (f"kernel={kernel.version}\nmodules={','.join(modules)}\n").encode())
    return tree, written


def build(kernel_root: Path, output: Path, *, modules: Sequence[str] = DEFAULT_MODULES,
          version: str | None = None, busybox: Path = BUSYBOX,
          compression: str = "gzip") -> BuildResult:
    """Build the provisioning initramfs for the kernel under ``kernel_root`` into ``output``."""
    kernel = kernel_tree(Path(kernel_root), version)
    tree, written = build_tree(kernel, modules, busybox)
    data = compress(tree.cpio_bytes(), compression)
    try:
        atomic.write_bytes(Path(output), data)
    except OSError as exc:
        raise DynprovError(f"cannot write {output}: {exc.strerror or exc}") from None
    return BuildResult(Path(output), kernel.version, written, len(data))


def parse_module_list(text: str) -> list[str]:
    """'e1000, virtio_net' -> ['e1000', 'virtio_net'] (names are checked against modules.dep)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise InputError(f"bad module name {name!r}")
    return names
