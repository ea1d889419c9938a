"""The OS image catalog (what the scheduler sees as OSLIST) and its content-addressed file store.

Files live once per content under ``<root>/blobs/<sha256>`` in the TFTP root (kernel, initrd)
and the HTTP root (kernel, initrd, root filesystem); boot configs point at those names, so an
image can never be half-replaced under a booting node.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pxe import atomic, db, validate
from pxe.config import Config
from pxe.errors import DynprovError, InputError, NotFound

BLOBS = "blobs"


@dataclass(frozen=True)
class Image:
    label: str
    kernel_sha: str
    initrd_sha: str | None = None
    rootfs_sha: str | None = None
    rootfs_name: str | None = None
    os_name: str = ""
    arch: str = "x86_64"
    mode: str = "stateless"
    cmdline: str = ""
    prov_seconds: int = 600
    owner: str = "root"
    created: float = 0.0

    def public(self) -> dict[str, Any]:
        return asdict(self)

    def blob_path(self, sha: str) -> str:
        """The path a boot loader asks for, relative to the TFTP or HTTP root."""
        return f"{BLOBS}/{sha}"


def check_kernel(path: Path) -> None:
    """Refuse anything that is not a Linux kernel: x86 bzImage ('HdrS') or arm64 Image."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(0x240)
    except OSError as exc:
        raise InputError(f"kernel {path}: {exc.strerror}") from None
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return
    if len(head) >= 0x3C and head[0x38:0x3C] == b"ARM\x64":
        return
    raise InputError(f"{path} is not a Linux kernel (no bzImage 'HdrS' header or arm64 Image magic)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _store(src: Path, roots: list[Path]) -> str:
    """Copy ``src`` into each root's blob store under its sha256, atomically. Returns the sha."""
    first = roots[0] / BLOBS
    first.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".incoming.", dir=first)
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.chmod(tmp, 0o644)
        sha = digest.hexdigest()
        os.replace(tmp, first / sha)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise DynprovError(f"cannot store {src}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    for root in roots[1:]:
        dest = root / BLOBS / sha
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_link = dest.parent / f".incoming.{sha}.{os.getpid()}"
        try:
            os.link(first / sha, tmp_link)  # same filesystem: no second copy
        except OSError:
            import shutil

            shutil.copyfile(first / sha, tmp_link)
            os.chmod(tmp_link, 0o644)
        os.replace(tmp_link, dest)
    return sha


class Catalog:
    def __init__(self, cfg: Config, conn: sqlite3.Connection | None = None):
        self.cfg = cfg
        self.conn = conn or db.connect(cfg.db_path)

    def all(self) -> list[Image]:
        return [self._row(r) for r in self.conn.execute("SELECT * FROM images ORDER BY label")]

    def labels(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT label FROM images ORDER BY label")]

    def get(self, label: str) -> Image:
        row = self.conn.execute("SELECT * FROM images WHERE label = ?", (label,)).fetchone()
        if row is None:
            raise NotFound(f"unknown image label {label!r}")
        return self._row(row)

    @staticmethod
    def _row(row: sqlite3.Row) -> Image:
        return Image(**{k: row[k] for k in row.keys()})

    def add(self, label: str, kernel: Path, initrd: Path | None = None,
            rootfs: Path | None = None, *, os_name: str = "", arch: str = "x86_64",
            mode: str = "stateless", cmdline: str = "", prov_seconds: int = 600,
            owner: str = "root", replace: bool = False) -> Image:
        """Check every input, copy files into the store, then record the image in one step."""
        label = validate.label(label)
        validate.choice(mode, validate.IMAGE_MODES, "image mode")
        validate.choice(arch, validate.ARCHES, "arch")
        cmdline = validate.cmdline(cmdline)
        if os_name:
            validate.label(os_name, "OS name")
        if not replace and self.conn.execute("SELECT 1 FROM images WHERE label = ?",
                                             (label,)).fetchone():
            raise InputError(f"image label {label!r} already exists")
        for what, path in (("kernel", kernel), ("initrd", initrd), ("root filesystem", rootfs)):
            if path is not None and not Path(path).is_file():
                raise InputError(f"{what} {path}: no such file")
        check_kernel(Path(kernel))
        if mode == "stateful" and rootfs is None:
            raise InputError("a stateful image needs a root filesystem to write to disk")
        with atomic.locked(self.lock_path):
            return self._add_locked(dict(
                label=label, kernel=Path(kernel), initrd=initrd, rootfs=rootfs, os_name=os_name,
                arch=arch, mode=mode, cmdline=cmdline, prov_seconds=prov_seconds, owner=owner,
                replace=replace))

    @property
    def lock_path(self) -> Path:
        """Serialises store + record + garbage collection, so GC never eats a fresh blob."""
        return self.cfg.paths.state_dir / "images.lock"

    def _add_locked(self, a: dict[str, Any]) -> Image:
        label, kernel, initrd, rootfs = a["label"], a["kernel"], a["initrd"], a["rootfs"]
        tftp, http = self.cfg.paths.tftp_root, self.cfg.paths.http_root
        kernel_sha = _store(Path(kernel), [tftp, http])
        initrd_sha = _store(Path(initrd), [tftp, http]) if initrd else None
        rootfs_sha = _store(Path(rootfs), [http]) if rootfs else None
        image = Image(label=label, kernel_sha=kernel_sha, initrd_sha=initrd_sha,
                      rootfs_sha=rootfs_sha, rootfs_name=Path(rootfs).name if rootfs else None,
                      os_name=a["os_name"] or label, arch=a["arch"], mode=a["mode"],
                      cmdline=a["cmdline"], prov_seconds=int(a["prov_seconds"]), owner=a["owner"],
                      created=time.time())
        with db.transaction(self.conn):
            if a["replace"]:
                self.conn.execute("DELETE FROM images WHERE label = ?", (label,))
            try:
                fields = image.public()
                self.conn.execute(
                    f"INSERT INTO images({', '.join(fields)}) "
                    f"VALUES ({', '.join('?' * len(fields))})", tuple(fields.values()))
            except sqlite3.IntegrityError:
                raise InputError(f"image label {label!r} already exists") from None
            db.log_event(self.conn, "image-added", detail=label)
        self._collect_garbage()
        return image

    def in_use(self, label: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT name FROM nodes WHERE desired_os = ? OR current_os = ? ORDER BY name",
            (label, label))
        return [r[0] for r in rows]

    def remove(self, label: str, force: bool = False) -> None:
        self.get(label)
        users = self.in_use(label)
        if users and not force:
            from pxe.nodeset import fold

            raise DynprovError(f"image {label!r} is used by node(s) {fold(users)}; "
                               "use --force to remove it anyway")
        with atomic.locked(self.lock_path):
            with db.transaction(self.conn):
                self.conn.execute("DELETE FROM images WHERE label = ?", (label,))
                db.log_event(self.conn, "image-removed", detail=label)
            self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete stored files that no image references any more (and stale temp files)."""
        live: set[str] = set()
        for row in self.conn.execute("SELECT kernel_sha, initrd_sha, rootfs_sha FROM images"):
            live.update(v for v in row if v)
        for root in (self.cfg.paths.tftp_root, self.cfg.paths.http_root):
            store = root / BLOBS
            if not store.is_dir():
                continue
            for entry in store.iterdir():
                stale_tmp = entry.name.startswith(".incoming.") and \
                    time.time() - entry.stat().st_mtime > 3600
                if (len(entry.name) == 64 and entry.name not in live) or stale_tmp:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
