"""The image bundle: the one file a user uploads (format documented in docs/images.md).

A bundle is a tar archive (plain, gzip or xz) of flat, top-level regular files:

    manifest.json      what the image is, and the sha256 of every other member
    <kernel>           Linux kernel (x86 bzImage or arm64 Image), required
    <initrd>           optional initrd (default: the site's provisioning initramfs)
    <rootfs>           optional root filesystem: squashfs, or a tar (plain, gzip, xz);
                       required for stateful images

Reading one (``open_bundle``) never trusts the archive: member names are checked before
anything is written (no absolute paths, no ``..``, no links, no devices, no sub-directories, no
duplicates), members are streamed into files we create ourselves in a fresh directory, and
every byte is hashed against the manifest. Building one (``build_bundle``) starts from a root
tree (``rootfs_from_tree``) or from an exported container image (``tree_from_container``:
``docker save`` or an OCI image layout; layers applied in order, whiteouts honoured, every
path resolved inside the tree so a hostile layer cannot write outside it).

``python3 -m pxe.bundle`` (and ``tools/make-bundle``) is the builder's command line.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from pxe import atomic, validate
from pxe.errors import DynprovError, InputError
from pxe.images import check_kernel

FORMAT = "dynprov-bundle/1"
MANIFEST = "manifest.json"
MANIFEST_MAX = 64 * 1024
_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)

TREE_FORMATS = ("tar.gz", "tar.xz", "tar.bz2", "tar", "squashfs")  # what rootfs_from_tree packs
ARCH_FROM_OCI = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


# -- the manifest -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    label: str
    kernel: str
    sha256: dict[str, str]
    os_name: str = ""
    arch: str = "x86_64"
    mode: str = "stateless"
    cmdline: str = ""
    prov_seconds: int = 600
    initrd: str | None = None
    rootfs: str | None = None
    format: str = FORMAT

    _KEYS = ("format", "label", "os_name", "arch", "mode", "cmdline", "prov_seconds",
             "kernel", "initrd", "rootfs", "sha256")

    def to_json(self) -> bytes:
        data = {k: getattr(self, k) for k in self._KEYS}
        return (json.dumps(data, indent=2) + "\n").encode()

    def members(self) -> dict[str, str]:
        """Role -> member name, for the members this bundle has."""
        roles = {"kernel": self.kernel, "initrd": self.initrd, "rootfs": self.rootfs}
        return {role: name for role, name in roles.items() if name}

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        """Strictly read a manifest: every complaint names the key."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{MANIFEST}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{MANIFEST}: must be a JSON object")
        unknown = sorted(set(data) - set(cls._KEYS))
        if unknown:
            raise InputError(f"{MANIFEST}: unknown key(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(cls._KEYS)})")

        def get(key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
            if key not in data:
                if default is ...:
                    raise InputError(f"{MANIFEST}: missing key {key!r}")
                return default
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InputError(f"{MANIFEST}: {key}: wrong type {type(value).__name__}")
            return value

        def checked(key: str, check: Callable[[str], str], default: Any = ...) -> Any:
            value = get(key, (str, type(None)), default)
            if value is None:
                return None
            try:
                return check(value)
            except InputError as exc:
                raise InputError(f"{MANIFEST}: {key}: {exc}") from None

        fmt = get("format", str)
        if fmt != FORMAT:
            raise InputError(f"{MANIFEST}: format {fmt!r} is not supported (expected {FORMAT!r})")
        label = checked("label", lambda v: validate.label(v, "image label"))
        os_name = checked("os_name", lambda v: validate.label(v, "OS name") if v else v,
                          None) or label
        arch = checked("arch", lambda v: validate.choice(v, validate.ARCHES, "arch"), "x86_64")
        mode = checked("mode", lambda v: validate.choice(v, validate.IMAGE_MODES, "mode"),
                       "stateless")
        cmdline = checked("cmdline", validate.cmdline, "")
        prov_seconds = get("prov_seconds", int, 600)
        if not 30 <= prov_seconds <= 86400:
            raise InputError(f"{MANIFEST}: prov_seconds: {prov_seconds} is outside 30..86400")
        kernel = checked("kernel", member_name)
        if kernel is None:
            raise InputError(f"{MANIFEST}: no kernel: the key 'kernel' must name a member")
        initrd = checked("initrd", member_name, None)
        rootfs = checked("rootfs", member_name, None)
        names = [n for n in (kernel, initrd, rootfs) if n]
        if len(set(names)) != len(names):
            raise InputError(f"{MANIFEST}: kernel, initrd and rootfs must be different members")
        sums = get("sha256", dict)
        for name, digest in sums.items():
            member_name(name)
            if not isinstance(digest, str) or not _SHA.match(digest):
                raise InputError(f"{MANIFEST}: sha256: {name!r}: expected 64 lower-case hex digits")
        for name in names:
            if name not in sums:
                raise InputError(f"{MANIFEST}: sha256: no checksum for member {name!r}")
        if mode == "stateful" and not rootfs:
            raise InputError(f"{MANIFEST}: a stateful image needs a root filesystem ('rootfs')")
        return cls(label=label, kernel=kernel, sha256=dict(sums), os_name=os_name, arch=arch,
                   mode=mode, cmdline=cmdline, prov_seconds=prov_seconds, initrd=initrd,
                   rootfs=rootfs, format=fmt)


def _one_line(exc: BaseException) -> str:
    """An archive library's complaint on one line (tarfile lists every method it tried)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    tar = [x for x in lines if x.startswith("- method tar:")]
    return (tar[0][2:] if tar else " ".join(lines))[:200]


def member_name(name: str) -> str:
    """A bundle member's name: flat, [A-Za-z0-9._-], not the manifest's."""
    if not isinstance(name, str) or not _MEMBER.match(name) or ".." in name or name == MANIFEST:
        raise InputError(f"invalid member name {name!r}: use a top-level file name of letters, "
                         "digits, '.', '_' and '-'")
    return name


# -- checking tar members (shared by bundles, container layers and root filesystems) ----------
def _normalise(name: str, where: str) -> PurePosixPath | None:
    """A member path made relative and clean, or None for the archive root; refuse tar-slip."""
    if name.startswith("/"):
        raise InputError(f"{where}: member {name!r}: absolute path (tar-slip)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InputError(f"{where}: member {name!r}: path contains '..' (tar-slip)")
    return PurePosixPath(*parts) if parts else None


def _link_escapes(base: PurePosixPath, target: str) -> bool:
    """Does a link at ``base`` to ``target`` leave the archive's tree (lexically)?"""
    if target.startswith("/"):
        return True
    depth = len(base.parent.parts)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _special(member: tarfile.TarInfo) -> str | None:
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return f"special file (tar type {member.type!r})"
    return None


# -- reading a bundle -------------------------------------------------------------------------
@dataclass(frozen=True)
class Bundle:
    """A checked bundle, unpacked into ``directory``."""

    manifest: Manifest
    directory: Path
    kernel: Path
    initrd: Path | None
    rootfs: Path | None
    rootfs_kind: str | None


def open_bundle(path: Path, directory: Path, max_bytes: int | None = None,
                name: str | None = None) -> Bundle:
    """Check ``path`` as a bundle and unpack its members into the new directory ``directory``.

    ``name`` is what messages call the bundle (the user's file name; default ``path``'s).

    Raises InputError (bad content) or OSError (e.g. ENOSPC while writing) and leaves
    whatever it wrote in ``directory`` for the caller to remove.
    """
    path = Path(path)
    where = f"bundle {name or path.name}"
    directory.mkdir(mode=0o700)
    raw_manifest: bytes | None = None
    digests: dict[str, str] = {}
    total = 0
    try:
        tf = tarfile.open(path, mode="r:*")
    except _CORRUPT as exc:
        raise InputError(f"{where}: not a bundle: not a (gzip/xz) tar archive "
                         f"({_one_line(exc)})") from None
    with tf:
        try:
            for member in _members(tf):
                rel = _normalise(member.name, where)
                if rel is None:
                    if member.isdir():
                        continue
                    raise InputError(f"{where}: a member has an empty name {member.name!r}")
                name = str(rel)
                if member.issym() or member.islnk():
                    link_kind = "symbolic" if member.issym() else "hard"
                    target = member.linkname
                    if member.islnk():
                        escapes = target.startswith("/") or ".." in target.split("/")
                    else:
                        escapes = _link_escapes(rel, target)
                    if escapes:
                        raise InputError(f"{where}: member {name!r}: {link_kind} link to {target!r} "
                                         "points outside the bundle (tar-slip)")
                    raise InputError(f"{where}: member {name!r}: {link_kind} link; bundle members "
                                     "must be regular files")
                special = _special(member)
                if special:
                    raise InputError(f"{where}: member {name!r}: {special} not allowed in a bundle")
                if member.isdir() or "/" in name:
                    raise InputError(f"{where}: member {name!r}: bundles hold top-level files "
                                     "only, no directories")
                if name in digests or (name == MANIFEST and raw_manifest is not None):
                    raise InputError(f"{where}: member {name!r} appears twice")
                total += member.size
                if max_bytes is not None and total > max_bytes:
                    raise InputError(f"{where}: members add up to more than the limit of "
                                     f"{max_bytes} bytes ([images] max_bundle_bytes)")
                source = tf.extractfile(member)
                assert source is not None
                if name == MANIFEST:
                    if member.size > MANIFEST_MAX:
                        raise InputError(f"{where}: {MANIFEST} is larger than {MANIFEST_MAX} bytes")
                    raw_manifest = _read_exact(source, member.size, where, name)
                    continue
                try:
                    member_name(name)
                except InputError as exc:
                    raise InputError(f"{where}: {exc}") from None
                digests[name] = _write_member(source, member.size, directory / name, where)
        except _CORRUPT as exc:
            raise InputError(f"{where}: truncated or corrupt archive ({_one_line(exc)})") from None
    if raw_manifest is None:
        if not digests and total == 0:
            raise InputError(f"{where}: not a bundle: empty archive")
        raise InputError(f"{where}: no {MANIFEST}: not a dynprov bundle (see docs/images.md)")
    try:
        manifest = Manifest.parse(raw_manifest)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    for name in digests:
        if name not in manifest.sha256:
            raise InputError(f"{where}: member {name!r} is not listed in the manifest's sha256")
    for role, name in manifest.members().items():
        if name not in digests:
            what = "no kernel: " if role == "kernel" else ""
            raise InputError(f"{where}: {what}the manifest names {role} {name!r} but the "
                             "bundle has no such member")
    for name, digest in manifest.sha256.items():
        if name not in digests:
            raise InputError(f"{where}: the manifest lists {name!r} but the bundle has no "
                             "such member")
        if digests[name] != digest:
            raise InputError(f"{where}: checksum mismatch for member {name!r}: manifest says "
                             f"{digest[:16]}..., content is {digests[name][:16]}...")
    kernel = directory / manifest.kernel
    try:
        check_kernel(kernel)
    except InputError:
        raise InputError(f"{where}: member {manifest.kernel!r} is not a Linux kernel "
                         "(no bzImage 'HdrS' header or arm64 Image magic)") from None
    rootfs = directory / manifest.rootfs if manifest.rootfs else None
    kind = check_rootfs(rootfs, where, manifest.mode) if rootfs else None
    return Bundle(manifest=manifest, directory=directory, kernel=kernel,
                  initrd=directory / manifest.initrd if manifest.initrd else None,
                  rootfs=rootfs, rootfs_kind=kind)


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        member = tf.next()
        if member is None:
            return
        yield member


def _read_exact(source: IO[bytes], size: int, where: str, name: str) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise InputError(f"{where}: truncated archive (member {name!r} is cut short)")
    return data


def _write_member(source: IO[bytes], size: int, dest: Path, where: str) -> str:
    """Stream one member into a file we create (never through an existing path); return sha."""
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        left = size
        while left:
            chunk = source.read(min(left, 1 << 20))
            if not chunk:
                raise InputError(f"{where}: truncated archive (member {dest.name!r} is cut short)")
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


# -- root filesystems -------------------------------------------------------------------------
# What the provisioning /init (initramfs/) takes, recognised by content as it does (lib.sh
# dp_kind): stateless -> squashfs or a tar (plain, gzip, xz, bzip2) unpacked into tmpfs;
# stateful -> a raw disk image (MBR signature), plain or gzip/xz/bzip2, written to the disk.
STATELESS_KINDS = ("squashfs", "tar", "tar.gz", "tar.xz", "tar.bz2")
STATEFUL_KINDS = ("disk", "disk.gz", "disk.xz", "disk.bz2")
_COMPRESSED: dict[bytes, tuple[str, Callable[[Path, str], IO[bytes]]]] = {
    b"\x1f\x8b": ("gz", gzip.open), b"\xfd7zXZ\x00": ("xz", lzma.open),  # type: ignore[dict-item]
    b"BZh": ("bz2", bz2.open)}  # type: ignore[dict-item]


def rootfs_kind(path: Path, name: str | None = None) -> str | None:
    """One of STATELESS_KINDS / STATEFUL_KINDS by content (the node sees only blobs/<sha>)."""
    name = name or path.name
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head[:4] == b"hsqs":
        return "squashfs"
    suffix = ""
    for magic, (kind, opener) in _COMPRESSED.items():
        if head.startswith(magic):
            try:
                with opener(path, "rb") as inner:
                    head = inner.read(512)
            except (*_CORRUPT, OSError, EOFError) as exc:
                raise InputError(f"root filesystem {name!r}: corrupt {kind} data ({_one_line(exc)})") \
                    from None
            suffix = "." + kind
            break
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar" + suffix
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return "disk" + suffix
    return None


def check_rootfs(path: Path, where: str = "root filesystem", mode: str | None = None,
                 name: str | None = None) -> str:
    """Check a root filesystem member and return its kind.

    ``mode`` (stateless/stateful), when given, must match the kind: the node unpacks or mounts
    a stateless root, and writes a stateful one to its disk as it is. In a tar, absolute or
    ``..`` paths, hard links out of the tree, and paths that go through a symbolic link stored
    earlier in the same archive (the classic symlink tar-slip) are refused. Symlink *targets*
    may be absolute: in a root filesystem they mean the node's own root. Device files are
    allowed here (``dev/console``): only the node unpacks this.
    """
    name = name or path.name  # what the user called it, not our working copy
    label = f"{where}: root filesystem {name!r}"
    kind = rootfs_kind(path, name)
    if kind is None:
        raise InputError(f"{label} is neither squashfs, a tar archive nor a raw disk image "
                         "(plain, gzip, xz or bzip2)")
    if mode == "stateless" and kind not in STATELESS_KINDS:
        raise InputError(f"{label} is a raw disk image ({kind}): a stateless image needs "
                         "squashfs or a tar archive")
    if mode == "stateful" and kind not in STATEFUL_KINDS:
        raise InputError(f"{label} is {kind}: a stateful image needs a raw disk image (MBR, "
                         "optionally gzip/xz/bzip2), which the node writes to its disk")
    if not kind.startswith("tar"):
        return kind
    symlinks: set[PurePosixPath] = set()
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                rel = _normalise(member.name, label)
                if rel is None:
                    continue
                for parent in list(reversed(rel.parents))[1:]:
                    if parent in symlinks:
                        raise InputError(f"{label}: member {member.name!r} goes through the "
                                         f"symbolic link {str(parent)!r} (tar-slip)")
                if member.islnk() and (member.linkname.startswith("/")
                                       or ".." in member.linkname.split("/")):
                    raise InputError(f"{label}: member {member.name!r}: hard link to "
                                     f"{member.linkname!r} points outside the tree (tar-slip)")
                if member.issym():
                    symlinks.add(rel)
                else:
                    symlinks.discard(rel)
    except _CORRUPT as exc:
        raise InputError(f"{label}: truncated or corrupt tar archive ({_one_line(exc)})") from None
    return kind


# -- applying a tar into a tree, safely -------------------------------------------------------
def resolve_in_tree(root: Path, rel: PurePosixPath, follow_last: bool = True) -> Path:
    """The path ``rel`` names when ``root`` is the root directory: symlinks are followed as a
    chroot would (absolute targets start again at ``root``, ``..`` stops at it), so the result
    is always inside ``root``."""
    todo = [p for p in rel.parts if p not in ("", ".", "/")]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if (todo or follow_last) and here.is_symlink():
            hops += 1
            if hops > 40:
                raise InputError(f"too many levels of symbolic links in {str(rel)!r}")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(part)
    return root.joinpath(*done)


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@dataclass
class TreeWriter:
    """Applies tar archives (container layers, root filesystems) into one directory tree.

    Records each path's owner and mode so that a tree built without root privileges can
    still be packed with the right ownership (``rootfs_from_tree(owners=...)``).
    """

    root: Path
    devices: bool = False  # create device nodes (root only); else refuse them
    owners: dict[str, tuple[int, int, str, str]] = field(default_factory=dict)
    dir_modes: dict[Path, tuple[int, float]] = field(default_factory=dict)

    def apply(self, tf: tarfile.TarFile, where: str, whiteouts: bool = False) -> None:
        created: set[Path] = set()
        for member in tf:
            rel = _normalise(member.name, where)
            if rel is None:
                continue
            if whiteouts and rel.name.startswith(WHITEOUT):
                self._whiteout(rel, created)
                continue
            special = _special(member)
            if special and not (self.devices and (member.ischr() or member.isblk()
                                                  or member.isfifo())):
                raise InputError(f"{where}: member {member.name!r}: {special} not allowed")
            parent = resolve_in_tree(self.root, rel.parent)
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise InputError(f"{where}: member {member.name!r}: a parent is not a "
                                 "directory") from None
            dest = parent / rel.name
            self._place(tf, member, dest, where)
            created.add(dest)
            rel_key = str(dest.relative_to(self.root))
            self.owners[rel_key] = (member.uid, member.gid, member.uname, member.gname)

    def _whiteout(self, rel: PurePosixPath, created: set[Path]) -> None:
        parent = resolve_in_tree(self.root, rel.parent)
        if rel.name == OPAQUE:
            if parent.is_dir() and not parent.is_symlink():
                for child in parent.iterdir():
                    if child not in created:
                        _remove(child)
            return
        victim = rel.name[len(WHITEOUT):]
        if victim in ("", ".", ".."):
            return
        target = parent / victim
        if target not in created:
            _remove(target)
            self.owners.pop(str(target.relative_to(self.root)), None)

    def _place(self, tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path,
               where: str) -> None:
        mode = member.mode & 0o7777
        if member.isdir():
            if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                _remove(dest)
            dest.mkdir(mode=0o755, exist_ok=True)
            self.dir_modes[dest] = (mode, member.mtime)
            return
        if dest.is_symlink() or dest.exists():
            _remove(dest)
        if member.issym():
            os.symlink(member.linkname, dest)
        elif member.islnk():
            target = member.linkname
            if target.startswith("/") or ".." in target.split("/"):
                raise InputError(f"{where}: member {member.name!r}: hard link to {target!r} "
                                 "points outside the tree (tar-slip)")
            original = resolve_in_tree(self.root, PurePosixPath(target), follow_last=False)
            if original.is_symlink() or not original.is_file():
                raise InputError(f"{where}: member {member.name!r}: hard link to {target!r}, "
                                 "which is not a file stored before it")
            os.link(original, dest)
            return
        elif member.isreg():
            source = tf.extractfile(member)
            assert source is not None
            _write_member(source, member.size, dest, where)
        else:  # device or FIFO, allowed only with devices=True (and root for devices)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() \
                else stat.S_IFIFO
            os.mknod(dest, kind | mode, os.makedev(member.devmajor, member.devminor))
        if os.geteuid() == 0:
            os.lchown(dest, member.uid, member.gid)
        if not member.issym():
            os.chmod(dest, mode)  # after chown, which clears setuid/setgid bits
        if not member.issym():
            os.utime(dest, (member.mtime, member.mtime))

    def finish(self) -> None:
        """Set directory modes and times last (deepest first), after their contents exist."""
        for path in sorted(self.dir_modes, key=lambda p: len(p.parts), reverse=True):
            mode, mtime = self.dir_modes[path]
            if path.is_dir() and not path.is_symlink():
                os.chmod(path, mode)
                os.utime(path, (mtime, mtime))


def extract_rootfs(rootfs: Path, tree: Path) -> TreeWriter:
    """Unpack a tar root filesystem into ``tree`` safely (used by site customization)."""
    writer = TreeWriter(tree, devices=os.geteuid() == 0)
    try:
        with tarfile.open(rootfs, mode="r|*") as tf:
            writer.apply(tf, f"root filesystem {rootfs.name!r}")
    except _CORRUPT as exc:
        raise InputError(f"root filesystem {rootfs.name!r}: truncated or corrupt "
                         f"({_one_line(exc)})") from None
    writer.finish()
    return writer


# -- container images (docker save, OCI image layout) -----------------------------------------
@dataclass(frozen=True)
class ContainerImage:
    arch: str
    os_name: str
    layers: int
    owners: dict[str, tuple[int, int, str, str]]


class _HashingReader(io.RawIOBase):
    """Pass-through reader that hashes what goes by (layer digest check)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> str:
        while self.raw.read(1 << 20):
            pass
        return self.digest.hexdigest()


def tree_from_container(tarball: Path, tree: Path) -> ContainerImage:
    """Unpack an exported container image (``docker save`` or an OCI layout tar) into ``tree``."""
    where = f"container image {Path(tarball).name}"
    tree.mkdir(parents=True, exist_ok=True)
    try:
        outer = tarfile.open(tarball, mode="r:*")
    except _CORRUPT as exc:
        raise InputError(f"{where}: not a tar archive ({_one_line(exc)})") from None
    with outer:
        try:
            entries = {}
            for member in outer.getmembers():
                rel = _normalise(member.name, where)
                if rel is not None and member.isreg():
                    entries[str(rel)] = member
            layers, config = _container_layout(outer, entries, where)
            writer = TreeWriter(tree)
            for index, (blob, digest) in enumerate(layers, 1):
                _apply_layer(outer, entries, blob, digest, writer, f"{where}: layer {index}")
            writer.finish()
        except _CORRUPT as exc:
            raise InputError(f"{where}: truncated or corrupt archive ({_one_line(exc)})") from None
    arch = ARCH_FROM_OCI.get(str(config.get("architecture", "amd64")))
    if arch is None:
        raise InputError(f"{where}: architecture {config.get('architecture')!r} is not "
                         f"supported (supported: {', '.join(validate.ARCHES)})")
    return ContainerImage(arch=arch, os_name=os_release_name(tree), layers=len(layers),
                          owners=writer.owners)


def _json_member(outer: tarfile.TarFile, entries: dict[str, tarfile.TarInfo], name: str,
                 where: str) -> Any:
    member = entries.get(name)
    if member is None:
        raise InputError(f"{where}: no {name!r} in the archive")
    fh = outer.extractfile(member)
    assert fh is not None
    try:
        return json.loads(fh.read(16 << 20))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: {name}: not valid JSON ({exc})") from None


def _blob_name(digest: Any, where: str) -> str:
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise InputError(f"{where}: unsupported or malformed digest {digest!r}")
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _container_layout(outer: tarfile.TarFile, entries: dict[str, tarfile.TarInfo],
                      where: str) -> tuple[list[tuple[str, str | None]], dict[str, Any]]:
    """Return ([(layer member, expected sha256 or None)], image config)."""
    if "index.json" in entries:  # OCI image layout
        index = _json_member(outer, entries, "index.json", where)
        manifest = index
        for _ in range(4):  # an index may point at a nested index
            descriptors = manifest.get("manifests") if isinstance(manifest, dict) else None
            if not descriptors:
                break
            if not isinstance(descriptors, list):
                raise InputError(f"{where}: index.json: 'manifests' must be a list")
            chosen = next((d for d in descriptors if isinstance(d, dict) and
                           d.get("platform", {}).get("architecture") in (None, "amd64")),
                          descriptors[0])
            manifest = _json_member(outer, entries, _blob_name(chosen.get("digest"), where),
                                    where)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
            raise InputError(f"{where}: no image manifest with 'layers' found via index.json")
        config_desc = manifest.get("config") or {}
        config = _json_member(outer, entries, _blob_name(config_desc.get("digest"), where),
                              where)
        layers: list[tuple[str, str | None]] = []
        for layer in manifest["layers"]:
            name = _blob_name(layer.get("digest") if isinstance(layer, dict) else None, where)
            media = str(layer.get("mediaType", ""))
            if "zstd" in media:
                raise InputError(f"{where}: layer {name}: zstd-compressed layers are not "
                                 "supported; export the image with gzip layers")
            layers.append((name, name.rsplit("/", 1)[1]))
        return layers, config if isinstance(config, dict) else {}
    if "manifest.json" in entries:  # docker save
        manifest = _json_member(outer, entries, "manifest.json", where)
        if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
            raise InputError(f"{where}: manifest.json: expected a list of images")
        if len(manifest) > 1:
            raise InputError(f"{where}: holds {len(manifest)} images; export exactly one")
        image = manifest[0]
        raw_layers = image.get("Layers")
        if not isinstance(raw_layers, list):
            raise InputError(f"{where}: manifest.json: no 'Layers' list")
        layers = []
        for name in raw_layers:
            rel = _normalise(str(name), where)
            if rel is None:
                raise InputError(f"{where}: manifest.json: empty layer name")
            key = str(rel)
            digest = key.rsplit("/", 1)[1] if key.startswith("blobs/sha256/") else None
            layers.append((key, digest))
        config_name = image.get("Config")
        config = _json_member(outer, entries, str(_normalise(str(config_name), where)), where) \
            if config_name else {}
        return layers, config if isinstance(config, dict) else {}
    raise InputError(f"{where}: not an exported container image (no index.json for an OCI "
                     "layout, no manifest.json from `docker save`)")


def _apply_layer(outer: tarfile.TarFile, entries: dict[str, tarfile.TarInfo], blob: str,
                 digest: str | None, writer: TreeWriter, where: str) -> None:
    member = entries.get(blob)
    if member is None:
        raise InputError(f"{where}: {blob!r} is missing from the archive")
    raw = outer.extractfile(member)
    assert raw is not None
    head = raw.read(4)
    raw.seek(0)
    if head == b"\x28\xb5\x2f\xfd":
        raise InputError(f"{where}: zstd-compressed layers are not supported; export the "
                         "image with gzip layers")
    reader = _HashingReader(raw)
    buffered = io.BufferedReader(reader, 1 << 20)
    try:
        with tarfile.open(fileobj=buffered, mode="r|*") as layer:
            writer.apply(layer, where, whiteouts=True)
    except _CORRUPT as exc:
        raise InputError(f"{where}: truncated or corrupt layer ({_one_line(exc)})") from None
    while buffered.read(1 << 20):
        pass
    actual = reader.drain()
    if digest and actual != digest:
        raise InputError(f"{where}: checksum mismatch: layer {blob!r} has sha256 {actual[:16]}...")


def os_release_name(tree: Path) -> str:
    """``ID-VERSION_ID`` from the tree's os-release (e.g. debian-12), or ''."""
    for rel in ("etc/os-release", "usr/lib/os-release"):
        try:
            path = resolve_in_tree(tree, PurePosixPath(rel))
            text = path.read_text(errors="replace") if path.is_file() else ""
        except (OSError, InputError):
            continue
        values = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', text, re.M))
        name = "-".join(v for v in (values.get("ID"), values.get("VERSION_ID")) if v)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._-")[:64]
        if name:
            return name
    return ""


# -- building ---------------------------------------------------------------------------------
def rootfs_from_tree(tree: Path, out: Path, fmt: str = "tar.gz",
                     owners: dict[str, tuple[int, int, str, str]] | None = None) -> Path:
    """Pack a root tree as squashfs or tar(.gz/.xz), entries sorted (reproducible for a tree).

    Ownership: ``owners`` (recorded while building the tree) wins; else, when not run as
    root, everything is packed as owned by root (a tree made by a user is the user's).
    """
    tree = Path(tree)
    if not tree.is_dir():
        raise InputError(f"root tree {tree}: not a directory")
    validate.choice(fmt, TREE_FORMATS, "root filesystem format")
    if fmt == "squashfs":
        argv = ["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress",
                "-comp", "gzip"]
        if os.geteuid() != 0:
            argv.append("-all-root")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        except FileNotFoundError:
            raise DynprovError("mksquashfs not found (Debian package squashfs-tools)") from None
        if proc.returncode != 0:
            raise DynprovError(f"mksquashfs failed: {(proc.stderr or proc.stdout).strip()}")
        return out
    as_root = os.geteuid() != 0

    def fix(info: tarfile.TarInfo) -> tarfile.TarInfo:
        key = info.name
        if owners is not None and key in owners:
            info.uid, info.gid, info.uname, info.gname = owners[key]
        elif as_root:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
        return info

    mode = {"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz", "tar.bz2": "w:bz2"}[fmt]
    with tarfile.open(out, mode=mode, format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
        for path in _walk(tree):
            rel = str(path.relative_to(tree))
            try:
                tf.add(path, arcname=rel, recursive=False, filter=fix)
            except OSError as exc:
                raise DynprovError(f"cannot pack {path}: {exc.strerror or exc}") from None
    return out


def _walk(tree: Path) -> Iterator[Path]:
    stack = [tree]
    while stack:
        here = stack.pop()
        children = sorted(here.iterdir(), key=lambda p: p.name)
        for child in children:
            if stat.S_ISSOCK(child.lstat().st_mode):
                continue
            yield child
        stack.extend(c for c in reversed(children) if c.is_dir() and not c.is_symlink())


def find_kernel(tree: Path) -> Path | None:
    """The newest ``boot/vmlinuz-*`` in a root tree, if there is exactly one kernel family."""
    boot = resolve_in_tree(tree, PurePosixPath("boot"))
    if not boot.is_dir():
        return None
    kernels = sorted(p for p in boot.glob("vmlinuz-*") if p.is_file() and not p.is_symlink())
    return kernels[-1] if kernels else None


def build_bundle(out: Path, *, label: str, kernel: Path, initrd: Path | None = None,
                 rootfs: Path | None = None, os_name: str = "", arch: str = "x86_64",
                 mode: str = "stateless", cmdline: str = "", prov_seconds: int = 600) -> Manifest:
    """Write a bundle (uncompressed tar: the root filesystem is compressed already).

    Reproducible: fixed member order, owner and times. Written by temp file + rename.
    """
    check_kernel(Path(kernel))
    files: dict[str, Path] = {"vmlinuz": Path(kernel)}
    initrd_name = rootfs_name = None
    if initrd is not None:
        initrd_name = "initrd.img"
        files[initrd_name] = Path(initrd)
    if rootfs is not None:
        kind = check_rootfs(Path(rootfs), "build", mode)
        rootfs_name = f"rootfs.{kind}"
        files[rootfs_name] = Path(rootfs)
    from pxe.images import sha256_file

    manifest = Manifest(label=label, kernel="vmlinuz", initrd=initrd_name, rootfs=rootfs_name,
                        sha256={n: sha256_file(p) for n, p in files.items()},
                        os_name=os_name or label, arch=arch, mode=mode, cmdline=cmdline,
                        prov_seconds=prov_seconds)
    Manifest.parse(manifest.to_json())  # the same checks a reader makes
    with atomic.streamed(Path(out)) as fh, tarfile.open(fileobj=fh, mode="w",
                                                        format=tarfile.PAX_FORMAT) as tf:
        raw = manifest.to_json()
        tf.addfile(_info(MANIFEST, len(raw)), io.BytesIO(raw))
        for name, path in files.items():
            with open(path, "rb") as src:
                tf.addfile(_info(name, os.fstat(src.fileno()).st_size), src)
    return manifest


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = "root"
    return info


# -- the builder's command line (tools/make-bundle) ------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make-bundle",
        description="Build a dynprov image bundle (for `fg-moab-image -upload`) from a root "
                    "tree, an exported container image, or a ready root filesystem; or check one.",
        epilog="Examples:\n"
               "  make-bundle --label deb12 --root /srv/trees/deb12 -o deb12.bundle\n"
               "  docker save debian:12 > deb.tar\n"
               "  make-bundle --label deb12 --container deb.tar --kernel vmlinuz -o deb12.bundle\n"
               "  make-bundle --check deb12.bundle\n"
               "Format: docs/images.md. Exit status: 0 ok, 1 failed, 2 bad usage or input.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", type=Path, metavar="DIR", help="a root file system tree")
    src.add_argument("--container", "--oci", type=Path, metavar="TAR",
                     help="`docker save` / `podman save` output or an OCI image layout tar")
    src.add_argument("--rootfs", type=Path, metavar="FILE",
                     help="a ready root filesystem (squashfs or tar)")
    src.add_argument("--no-rootfs", action="store_true", help="kernel (and initrd) only")
    src.add_argument("--check", type=Path, metavar="BUNDLE", help="check a bundle, print its manifest")
    p.add_argument("--label", help="the image label (what users write in msub -l os=LABEL)")
    p.add_argument("--kernel", type=Path, help="kernel (default: the tree's boot/vmlinuz-*)")
    p.add_argument("--initrd", type=Path,
                   help="initrd (default: none; the site's provisioning initramfs is used)")
    p.add_argument("--os-name", default="", help="OS name (default: ID-VERSION_ID of os-release)")
    p.add_argument("--arch", choices=validate.ARCHES,
                   help="default: the container's, else x86_64")
    p.add_argument("--mode", choices=validate.IMAGE_MODES, default="stateless")
    p.add_argument("--cmdline", default="", help="kernel command line of the image")
    p.add_argument("--prov-seconds", type=int, default=600, help="expected provisioning time")
    p.add_argument("--format", dest="fmt", choices=TREE_FORMATS, default="tar.gz",
                   help="root filesystem format (default tar.gz)")
    p.add_argument("-o", "--output", type=Path, help="the bundle to write")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.check:
            with tempfile.TemporaryDirectory(prefix="make-bundle.") as work:
                found = open_bundle(args.check, Path(work) / "m")
                sys.stdout.write(found.manifest.to_json().decode())
            return 0
        if not args.label or not args.output:
            parser.error("--label and -o/--output are required to build a bundle")
        validate.label(args.label, "image label")
        with tempfile.TemporaryDirectory(prefix="make-bundle.") as work:
            _build_from_args(args, Path(work))
        print(f"make-bundle: wrote {args.output}")
        return 0
    except DynprovError as exc:
        print(f"make-bundle: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"make-bundle: {exc}", file=sys.stderr)
        return 1


def _build_from_args(args: argparse.Namespace, work: Path) -> None:
    tree: Path | None = None
    owners = None
    arch = args.arch or "x86_64"
    os_name = args.os_name
    rootfs: Path | None = args.rootfs
    if args.container:
        tree = work / "tree"
        image = tree_from_container(args.container, tree)
        owners, arch = image.owners, args.arch or image.arch
        os_name = os_name or image.os_name
    elif args.root:
        tree = args.root
        os_name = os_name or os_release_name(tree)
    if tree is not None and args.mode == "stateful":
        raise InputError("a stateful image needs a raw disk image, not a root tree: give "
                         "--rootfs DISK (e.g. from tools/make-test-image --mode stateful)")
    kernel = args.kernel or (find_kernel(tree) if tree else None)
    if kernel is None:
        raise InputError("no kernel: give --kernel (the tree has no boot/vmlinuz-*)")
    if tree is not None:
        rootfs = rootfs_from_tree(tree, work / f"rootfs.{args.fmt}", args.fmt, owners)
    build_bundle(args.output, label=args.label, kernel=kernel, initrd=args.initrd, rootfs=rootfs,
                 os_name=os_name, arch=arch, mode=args.mode, cmdline=args.cmdline,
                 prov_seconds=args.prov_seconds)


if __name__ == "__main__":
    sys.exit(main())
