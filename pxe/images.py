"""The OS image catalog (what the scheduler sees as OSLIST) and its content-addressed file store.

Files live once per content under ``<root>/blobs/<sha256>`` in the TFTP root (kernel, initrd)
and the HTTP root (kernel, initrd, root filesystem); boot configs point at those names, so an
image can never be half-replaced under a booting node.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from pxe import atomic, db, validate
from pxe.config import Config
from pxe.errors import DynprovError, InputError, NotFound
from pxe.records import Record, asdict

TYPE_CHECKING = False  # not typing's: on every command's path (typing costs ~2 ms)
if TYPE_CHECKING:
    from typing import IO, Any

    from pxe import imageversions

BLOBS = "blobs"


class Image(Record):
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
    version: int = 1  # pxe.imageversions: which kept version is current

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
    check_kernel_header(head, str(path))


def check_kernel_header(head: bytes, name: str) -> None:
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return
    if len(head) >= 0x3C and head[0x38:0x3C] == b"ARM\x64":
        return
    raise InputError(f"{name} is not a Linux kernel (no bzImage 'HdrS' header or arm64 Image magic)")


def sha256_file(path: Path) -> str:
    import hashlib  # (OpenSSL's, ~2 ms to load) only when a blob is hashed

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- [images] size caps ---------------------------------------------------------------------
CAP_KEYS = {"kernel": "max_kernel_bytes", "initrd": "max_initrd_bytes",
            "rootfs": "max_rootfs_bytes"}
CAP_DEFAULTS = {"kernel": 256 << 20, "initrd": 4 << 30, "rootfs": 64 << 30}
WHAT = {"kernel": "kernel", "initrd": "initrd", "rootfs": "root filesystem"}
PROV_SECONDS = (30, 86400)


def size_caps(cfg: Config) -> dict[str, int]:
    """``[images] max_kernel_bytes / max_initrd_bytes / max_rootfs_bytes``, checked."""
    raw = cfg.raw.get("images", {})
    raw = raw if isinstance(raw, dict) else {}
    caps = {}
    for role, key in CAP_KEYS.items():
        value = raw.get(key, CAP_DEFAULTS[role])
        if not isinstance(value, int) or isinstance(value, bool) or value < 1024:
            raise InputError(f"{cfg.path}: images.{key}: must be an integer >= 1024, "
                             f"got {value!r}")
        caps[role] = value
    return caps


def check_prov_seconds(value: object, what: str = "--prov-seconds") -> int:
    """A provisioning time a person gave: a whole number of seconds within 30..86400."""
    low, high = PROV_SECONDS
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(f"{what} {value!r} is outside {low}..{high} seconds")
    return value


# -- the blob store ---------------------------------------------------------------------------
class _Staged(Record, frozen=False):
    """One input copied into a private temp file inside the first root's blob store."""

    role: str
    tmp: Path
    sha: str
    roots: list[Path]


def _stage(fh: IO[bytes], role: str, name: str, roots: list[Path], cap: int) -> _Staged:
    """Copy an opened input into ``<roots[0]>/blobs/.incoming.*``, hashing it and refusing it
    past ``cap`` bytes (a file can grow after it was measured); the temp file never stays."""
    store = roots[0] / BLOBS
    store.mkdir(parents=True, exist_ok=True)
    import tempfile  # with shutil, random...: only when an image is added

    fd, tmp = tempfile.mkstemp(prefix=".incoming.", dir=store)
    import hashlib

    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as fout:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                size += len(chunk)
                if size > cap:
                    raise InputError(f"{WHAT[role]} {name} is larger than the limit of {cap} "
                                     f"bytes ([images] {CAP_KEYS[role]})")
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.chmod(tmp, 0o644)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise DynprovError(f"cannot store {name}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return _Staged(role, Path(tmp), digest.hexdigest(), roots)


def _commit(staged: _Staged) -> str:
    """Rename a staged copy to ``blobs/<sha>`` in each of its roots (hard links when they share
    a file system, else a copy, each by temp + rename)."""
    sha, first = staged.sha, staged.roots[0] / BLOBS
    os.replace(staged.tmp, first / sha)
    for root in staged.roots[1:]:
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
        self.conn = conn or db.connect(cfg.database)
        self.pruned: list[int] = []  # the versions the last add() pruned (keep_versions)

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
            owner: str = "root", version: int | None = None,
            from_user: bool = False) -> Image:
        """Check every input, copy files into the store, then record the image in one step.

        A label that exists gets a new version (1, 2, 3... pxe.imageversions), which becomes
        current; the label keeps its owner, the version records ``owner`` as its uploader, and
        versions beyond ``[images] keep_versions`` that no node uses are pruned. ``version``:
        the number the caller expects (the repository names the bundle file after it); another
        number means a concurrent upload took it, and nothing is recorded.

        Inputs are opened once (regular files only, never through a final symlink) and copied
        from those descriptors, each against its ``[images]`` size cap, measured before copying
        and counted while copying. ``from_user``: the paths come from a person (`pxe-stage
        images add`): they are opened with that person's own rights (SUDO_USER under sudo), the
        root filesystem is checked as a bundle's is, and prov_seconds must be 30..86400.
        Any failure leaves the store and the catalog as they were.
        """
        label = validate.label(label)
        validate.choice(mode, validate.IMAGE_MODES, "image mode")
        validate.choice(arch, validate.ARCHES, "arch")
        cmdline = validate.cmdline(cmdline)
        if os_name:
            validate.label(os_name, "OS name")
        if from_user:
            check_prov_seconds(prov_seconds)
        from pxe import imageversions, userfile  # not on set-boot's path (only get() is)

        keep = imageversions.keep_versions(self.cfg)
        if mode == "stateful" and rootfs is None:
            raise InputError("a stateful image needs a root filesystem to write to disk")
        caps = size_caps(self.cfg)
        paths = {"kernel": kernel, "initrd": initrd, "rootfs": rootfs}
        with contextlib.ExitStack() as stack:
            opened: dict[str, IO[bytes]] = {}
            for role, path in paths.items():
                if path is None:
                    continue
                fh = stack.enter_context(
                    userfile.open_input(Path(path), WHAT[role], as_user=from_user,
                                        follow_links=not from_user))
                size = os.fstat(fh.fileno()).st_size
                if size > caps[role]:
                    raise InputError(f"{WHAT[role]} {path}: {size} bytes is larger than the "
                                     f"limit of {caps[role]} bytes ([images] {CAP_KEYS[role]})")
                opened[role] = fh
            check_kernel_header(os.pread(opened["kernel"].fileno(), 0x240, 0), str(kernel))
            with atomic.locked(self.lock_path):
                return self._add_locked(dict(
                    label=label, opened=opened, paths=paths, caps=caps, os_name=os_name,
                    arch=arch, mode=mode, cmdline=cmdline, prov_seconds=prov_seconds,
                    owner=owner, version=version, keep=keep, from_user=from_user))

    @property
    def lock_path(self) -> Path:
        """Serialises store + record + garbage collection, so GC never eats a fresh blob."""
        return self.cfg.paths.state_dir / "images.lock"

    def _add_locked(self, a: dict[str, Any]) -> Image:
        label, paths, opened = a["label"], a["paths"], a["opened"]
        tftp, http = self.cfg.paths.tftp_root, self.cfg.paths.http_root
        staged: list[_Staged] = []
        try:
            for role, fh in opened.items():
                roots = [http] if role == "rootfs" else [tftp, http]
                staged.append(_stage(fh, role, str(paths[role]), roots, a["caps"][role]))
            if a["from_user"] and paths["rootfs"] is not None:
                from pxe.bundle import check_rootfs

                check_rootfs(staged[-1].tmp, "--rootfs", a["mode"], name=str(paths["rootfs"]))
            shas = {s.role: _commit(s) for s in staged}
            image = Image(label=label, kernel_sha=shas["kernel"], initrd_sha=shas.get("initrd"),
                          rootfs_sha=shas.get("rootfs"),
                          rootfs_name=Path(paths["rootfs"]).name if paths["rootfs"] else None,
                          os_name=a["os_name"] or label, arch=a["arch"], mode=a["mode"],
                          cmdline=a["cmdline"], prov_seconds=int(a["prov_seconds"]),
                          owner=a["owner"], created=time.time())
            with db.transaction(self.conn):
                image = self._record(image, a["version"], a["keep"])
        except BaseException:
            for s in staged:
                with contextlib.suppress(FileNotFoundError):
                    s.tmp.unlink()
            self._collect_garbage()  # blobs renamed in but never recorded
            raise
        self._collect_garbage()
        return image

    def _record(self, image: Image, expected: int | None, keep: int) -> Image:
        """Inside the transaction: the new version, made current; then the retention prune."""
        from pxe import imageversions  # (with pxe.states) not on set-boot's path

        label, conn = image.label, self.conn
        number = imageversions.next_version(conn, label)
        if expected is not None and expected != number:
            raise DynprovError(f"another upload of {label!r} took version {number - 1} "
                               "meanwhile; nothing was recorded, try again")
        owner = conn.execute("SELECT owner FROM images WHERE label = ?", (label,)).fetchone()
        fields = {**image.public(), "version": number}
        imageversions.record(conn, fields)
        if owner is None:
            conn.execute(f"INSERT INTO images({', '.join(fields)}) "
                         f"VALUES ({', '.join('?' * len(fields))})", tuple(fields.values()))
        else:
            imageversions.make_current(conn, label, number)
        self.pruned = imageversions.prune(conn, label, keep)
        db.log_event(conn, "image-added", detail=f"{label} version {number}")
        return Image(**{**fields, "owner": owner[0] if owner else image.owner})

    # -- versions (pxe.imageversions) -----------------------------------------------------
    def history(self, label: str) -> list[imageversions.Version]:
        """Every kept version of ``label``, oldest first, with blob sizes and node counts."""
        from pxe import imageversions  # (with pxe.states) not on set-boot's path

        now = self.get(label).version
        running = imageversions.running(self.conn, label)
        booted = imageversions.booted(self.conn, label)
        out = []
        for r in self.conn.execute("SELECT * FROM image_versions WHERE label = ? "
                                   "ORDER BY version", (label,)):
            sizes = {role: self._blob_size(r[f"{role}_sha"], role)
                     for role in ("kernel", "initrd", "rootfs")}
            out.append(imageversions.Version(
                label=label, version=r["version"], created=r["created"], owner=r["owner"],
                kernel_sha=r["kernel_sha"], initrd_sha=r["initrd_sha"], rootfs_sha=r["rootfs_sha"],
                sizes=sizes, current=r["version"] == now, running=running.get(r["version"], []),
                booted=booted.get(r["version"], 0)))
        return out

    def _blob_size(self, sha: str | None, role: str) -> int | None:
        if not sha:
            return None
        root = self.cfg.paths.http_root if role == "rootfs" else self.cfg.paths.tftp_root
        try:
            return (root / BLOBS / sha).stat().st_size
        except OSError:
            return None

    def rollback(self, label: str, version: int | None = None) -> tuple[int, int]:
        """Make a kept version current again (default: the newest one older than the current
        one), in one UPDATE; returns (old, new). Running nodes keep what they booted."""
        from pxe import imageversions  # (with pxe.states) not on set-boot's path

        with atomic.locked(self.lock_path), db.transaction(self.conn):
            old = imageversions.current(self.conn, label)
            new = imageversions.previous(self.conn, label) if version is None else version
            imageversions.row(self.conn, label, new)  # exists, or InputError naming the kept ones
            if new == old:
                raise InputError(f"version {new} of image {label!r} is already the current one")
            imageversions.make_current(self.conn, label, new)
            db.log_event(self.conn, "image-rollback", detail=f"{label} version {old} -> {new}")
        return old, new

    def remove_version(self, label: str, version: int, force: bool = False) -> list[str]:
        """Delete one kept version that is not the current one; refused while nodes run it or a
        run is booting it unless ``force``. Returns the nodes that still ran it."""
        from pxe import imageversions  # (with pxe.states) not on set-boot's path

        with atomic.locked(self.lock_path):
            with db.transaction(self.conn):
                now = imageversions.current(self.conn, label)
                imageversions.row(self.conn, label, version)
                if version == now:
                    raise InputError(f"version {version} is the current version of {label!r}; "
                                     "roll back to another version first, or delete the label")
                nodes = imageversions.running(self.conn, label).get(version, [])
                if not force and (nodes or version in imageversions.pending(self.conn, label)):
                    from pxe.nodeset import fold

                    who = f"node(s) {fold(nodes)} run it" if nodes else "a provisioning run " \
                        "is booting it"
                    raise DynprovError(f"version {version} of image {label!r} is in use: {who}; "
                                       "use force to delete it anyway")
                self.conn.execute("DELETE FROM image_versions WHERE label = ? AND version = ?",
                                  (label, version))
                db.log_event(self.conn, "image-version-removed", detail=f"{label} version {version}")
            self._collect_garbage()
        return nodes

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
                self.conn.execute("DELETE FROM image_versions WHERE label = ?", (label,))
                db.log_event(self.conn, "image-removed", detail=label)
            self._collect_garbage()
            from pxe import customize  # not on set-boot's path

            customize.remove_log(self.cfg.paths.state_dir, label)  # its last version went

    def _collect_garbage(self) -> None:
        """Delete stored files that no kept image version references (and stale temp files)."""
        from pxe import imageversions  # (with pxe.states) not on set-boot's path

        live = imageversions.live_blobs(self.conn)
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
