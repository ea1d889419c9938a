"""The image repository behind `fg-moab-image`: uploaded bundles, published into the Catalog.

Layout under ``[images] repository_dir`` (default ``<state_dir>/images``), all root-owned::

    bundles/<label>.bundle    version 1's uploaded file, byte for byte (what ``-get`` returns)
    bundles/<label>.json      who uploaded it, when, its sha256, size, customization, manifest
    bundles/<label>@<N>.*     the same for version N >= 2 ('@' is never in a label)
    .incoming/                uploads in progress (same file system, so the final step is a rename)
    repository.lock           serialises uploads and deletes

An upload is all or nothing: the bundle is copied into ``.incoming`` (hashing it, counting it
against ``max_bundle_bytes``), checked and unpacked there (pxe.bundle), customized
(pxe.customize), and only then, under the lock, renamed into ``bundles/`` and added to the
Catalog; any failure (bad bundle, failing script, a full disk) removes what it wrote and leaves
the repository and the Catalog as they were.

Uploading a label that exists adds a version (pxe.imageversions): only the label's owner or an
admin may, as only they may delete or roll it back; ``[images] keep_versions`` bounds how many
are kept, and a pruned version's bundle goes with it.

Who may change it: root, or a member of ``[groups] image`` (default ``fgimage``) through the
sudoers rule of pxe.sudoers; the user's own files are read and written with the user's own
permissions (``as_caller``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from pxe import atomic, audit, authz, bundle, config, customize, db, imageversions, userfile, validate
from pxe.config import Config
from pxe.errors import DynprovError, InputError, NotFound
from pxe.images import CAP_KEYS, Catalog, Image, size_caps

log = logging.getLogger("dynprov.repository")

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# -- [images] settings --------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    repository_dir: Path
    max_bundle_bytes: int = 16 << 30
    customize_dir: Path = Path("/etc/dynprov/customize")
    customize_timeout: int = 1800
    provisioning_initrd: Path | None = None


_KEYS = ("repository_dir", "max_bundle_bytes", "customize_dir", "customize_timeout",
         "provisioning_initrd", "keep_versions", *CAP_KEYS.values())  # the size caps: pxe.images.size_caps


def settings(cfg: Config) -> Settings:
    """Read and check ``[images]``; every complaint names the file and the key."""
    raw = cfg.raw.get("images", {})

    def fail(key: str, problem: str) -> InputError:
        return InputError(f"{cfg.path}: {key}: {problem}")

    if not isinstance(raw, dict):
        raise fail("[images]", "must be a table")
    for key in raw:
        if key not in _KEYS:
            raise fail(f"images.{key}", f"unknown key (known: {', '.join(_KEYS)})")

    def path(key: str, default: Path | None) -> Path | None:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value.startswith("/"):
            raise fail(f"images.{key}", f"must be an absolute path, got {value!r}")
        return Path(value)

    def number(key: str, default: int, low: int) -> int:
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise fail(f"images.{key}", f"must be an integer >= {low}, got {value!r}")
        return value

    size_caps(cfg)
    imageversions.keep_versions(cfg)
    repo = path("repository_dir", cfg.paths.state_dir / "images")
    assert repo is not None
    return Settings(
        repository_dir=repo,
        max_bundle_bytes=number("max_bundle_bytes", Settings.max_bundle_bytes, 1024),
        customize_dir=path("customize_dir", Settings.customize_dir) or Settings.customize_dir,
        customize_timeout=number("customize_timeout", Settings.customize_timeout, 1),
        provisioning_initrd=path("provisioning_initrd", None),
    )


# -- running for a user through sudo (pxe.userfile) ------------------------------------------
_sudo_caller = userfile.sudo_caller
as_caller = userfile.as_caller


def load_config(explicit: str | None = None) -> Config:
    """Load the config; through sudo, only a file that no one but root can change."""
    path = config.locate(explicit)
    if _sudo_caller() is not None:
        from pxe.sudoers import unsafe_reasons

        problems = unsafe_reasons(path) if path.exists() else []
        if problems:
            raise authz.PermissionDenied(
                f"permission denied: through sudo only a root-owned configuration is used "
                f"({problems[0]})")
    return config.load(path)


def _open_source(path: Path) -> IO[bytes]:
    """The bundle to upload: a regular file the caller can read, not through a symlink."""
    return userfile.open_input(path, "bundle")


# -- the repository -------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One image as ``-list`` shows it."""

    label: str
    os_name: str
    arch: str
    mode: str
    owner: str
    created: float
    bundle_bytes: int | None = None
    bundle_sha256: str | None = None
    groups: list[str] = field(default_factory=list)
    customized: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)
    version: int = 1  # the current one (pxe.imageversions)
    versions: int = 1  # how many are kept

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Uploaded:
    image: Image
    bundle_sha256: str
    bundle_bytes: int
    customized: list[str]


class Repository:
    def __init__(self, cfg: Config, conn: sqlite3.Connection | None = None):
        self.cfg = cfg
        self.settings = settings(cfg)
        self._conn = conn
        self.root = self.settings.repository_dir
        self.bundles = self.root / "bundles"
        self.incoming = self.root / ".incoming"
        self.lock_path = self.root / "repository.lock"

    # -- helpers ---------------------------------------------------------------------------
    @functools.cached_property
    def catalog(self) -> Catalog:
        """Opened on first use, so that a refusal (authz) comes before any database access."""
        try:
            return Catalog(self.cfg, self._conn)
        except (sqlite3.Error, PermissionError) as exc:
            raise DynprovError(f"cannot open the state database {db.where(self.cfg.database)}: {exc}; "
                               f"members of group {self.cfg.groups.image} run it as "
                               "`sudo fg-moab-image ...`") from None

    def _require(self, action: str) -> str:
        return authz.require_group(self.cfg.groups.image, action)

    def _prepare(self) -> None:
        try:
            for directory in (self.root, self.bundles, self.incoming):
                directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        except PermissionError:
            raise DynprovError(
                f"cannot write the image repository {self.root}: permission denied; members "
                f"of group {self.cfg.groups.image} run it as `sudo fg-moab-image ...`") from None

    def _version(self, label: str, version: int | None) -> int:
        """``version``, or the label's current one (1 for a label the catalog does not know)."""
        if version is not None:
            return version
        if label in self.catalog.labels():
            return self.catalog.get(label).version
        return 1

    def _stem(self, label: str, version: int | None) -> str:
        number = self._version(validate.label(label, "image label"), version)
        return label if number == 1 else f"{label}@{number}"

    def bundle_path(self, label: str, version: int | None = None) -> Path:
        """The uploaded bundle of a version (default: the current one)."""
        return self.bundles / f"{self._stem(label, version)}.bundle"

    def _meta_path(self, label: str, version: int | None = None) -> Path:
        return self.bundles / f"{self._stem(label, version)}.json"

    def _meta(self, label: str, version: int | None = None) -> dict[str, Any]:
        try:
            return json.loads(self._meta_path(label, version).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _exists(self, label: str) -> bool:
        return label in self.catalog.labels() or self.bundle_path(label, 1).exists()

    def _version_files(self, label: str) -> dict[int, list[Path]]:
        """The bundle files of every version of ``label`` on disk, by version."""
        out: dict[int, list[Path]] = {}
        if not self.bundles.is_dir():
            return out
        for path in self.bundles.iterdir():
            stem = path.name.rsplit(".", 1)[0]
            if path.suffix not in (".bundle", ".json"):
                continue
            if stem == label:
                out.setdefault(1, []).append(path)
            elif stem.startswith(f"{label}@") and stem[len(label) + 1:].isdigit():
                out.setdefault(int(stem[len(label) + 1:]), []).append(path)
        return out

    def sweep_bundles(self, label: str) -> list[Path]:
        """Remove the bundle files of versions of ``label`` the catalog no longer keeps (pruned,
        deleted, or the whole image removed), under the repository lock, so that an upload's
        bundle, renamed in just before its version is recorded, is never taken. Returns the
        files removed. For callers outside an upload or a delete (`pxe-stage images`)."""
        if not self.bundles.is_dir():
            return []
        with atomic.locked(self.lock_path):
            return self._sweep_locked(label)

    def _sweep_locked(self, label: str) -> list[Path]:
        """sweep_bundles with the repository lock held. Only ``<label>.*`` and ``<label>@N.*``
        are the label's; blobs shared with other images are the catalog's (Catalog GC)."""
        kept = set(imageversions.numbers(self.catalog.conn, label))
        removed = []
        for number, paths in sorted(self._version_files(label).items()):
            if number not in kept:
                for path in sorted(paths):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed.append(path)
        return removed

    def remove_image(self, label: str, force: bool = False) -> list[Path]:
        """`pxe-stage images remove LABEL` (root's tool: no owner rule): the catalog's rows and
        the blobs no other image references (Catalog.remove, refused while nodes use it unless
        ``force``), then the label's uploaded bundles. A label the catalog no longer knows but
        whose bundles are still here (removed before the bundles went along) loses those.
        Returns the bundle files removed."""
        validate.label(label, "image label")
        try:
            self.catalog.remove(label, force=force)
        except NotFound:
            if not self._version_files(label):
                raise
            customize.remove_log(self.cfg.paths.state_dir, label)  # bundles only: the log too
        return self.sweep_bundles(label)

    # -- ownership: the uploader, or root for `pxe-stage images add` and older images --------
    def owner_of(self, label: str) -> str:
        if label in self.catalog.labels():
            return self.catalog.get(label).owner
        return str(self._meta(label).get("owner") or "root")

    def admin_group(self) -> str:
        """The admins' unix group: ``[api] admin_group`` (default fgadmin), for the CLI too."""
        api = self.cfg.raw.get("api", {})
        group = api.get("admin_group", "fgadmin") if isinstance(api, dict) else "fgadmin"
        return group if isinstance(group, str) else "fgadmin"

    def _is_admin(self, user: str) -> bool:
        return user == "root" or self.admin_group() in authz.user_groups(user)

    def _require_owner(self, user: str, label: str, action: str) -> None:
        """Only an image's owner or an admin may delete (or force-delete) it, add a version to
        it or roll it back."""
        owner = self.owner_of(label)
        if user != owner and not self._is_admin(user):
            raise authz.PermissionDenied(
                f"permission denied: image {label!r} belongs to {owner}; only its owner or an "
                f"admin (root or group {self.admin_group()!r}) may {action} it (you are {user})")

    def users_of(self, label: str) -> tuple[list[str], list[int]]:
        """Nodes that run or are switching to ``label``, and provisioning runs asking for it."""
        nodes = self.catalog.in_use(label)
        runs = [r[0] for r in self.catalog.conn.execute(
            "SELECT id FROM runs WHERE label = ? AND finished IS NULL ORDER BY id", (label,))]
        return nodes, runs

    # -- upload ----------------------------------------------------------------------------
    def upload(self, source: Path, label: str | None = None,
               groups: Sequence[str] = ()) -> Uploaded:
        user = self._require("uploading an image")
        if label is not None:
            validate.label(label, "image label")
            if self._exists(label):  # a new version: refused early for another user's label
                self._require_owner(user, label, "add a version to")
        scripts = customize.select(self.settings.customize_dir, groups)
        fh = _open_source(Path(source))
        size = os.fstat(fh.fileno()).st_size
        if size > self.settings.max_bundle_bytes:  # measured before a byte is copied
            fh.close()
            raise InputError(f"{Path(source).name} is {size} bytes, larger than the limit of "
                             f"{self.settings.max_bundle_bytes} bytes ([images] max_bundle_bytes)")
        self._prepare()
        work: Path | None = None
        try:
            with fh:
                work = Path(tempfile.mkdtemp(prefix="upload.", dir=self.incoming))
                incoming = work / "bundle"
                sha, size = self._copy_in(fh, incoming, Path(source).name)
            found = bundle.open_bundle(incoming, work / "members", self.settings.max_bundle_bytes,
                                       name=Path(source).name)
            man = found.manifest
            label = label or man.label
            validate.label(label, "image label")
            rootfs, kind = found.rootfs, found.rootfs_kind
            customized: list[str] = []
            if kind in bundle.STATEFUL_KINDS and groups:
                raise InputError(f"-group {', '.join(groups)}: a raw disk image ({kind}) cannot "
                                 "be customized; customize it before building the disk")
            if scripts and rootfs is not None and kind in bundle.STATELESS_KINDS:
                rootfs, customized = customize.customize_rootfs(
                    rootfs, kind, work / "customize", scripts, label=label,
                    arch=man.arch, mode=man.mode,
                    log_path=customize.log_path(self.cfg.paths.state_dir, label),
                    timeout=self.settings.customize_timeout)
            elif groups and rootfs is None:
                raise InputError(f"-group {', '.join(groups)}: this image has no root "
                                 "filesystem to customize")
            initrd = found.initrd or self._provisioning_initrd(rootfs)
            meta = {"label": label, "bundle_sha256": sha, "bundle_bytes": size, "owner": user,
                    "uploaded": time.time(), "source_name": Path(source).name,
                    "groups": list(groups), "customized": customized,
                    "initrd": "bundle" if found.initrd else ("site" if initrd else None),
                    "manifest": json.loads(man.to_json())}
            image = self._publish(label, incoming, meta, found, initrd, rootfs, user)
        except OSError as exc:
            if exc.errno in _FULL:
                raise DynprovError(
                    f"upload of {Path(source).name} failed: no space left under {self.root} "
                    f"({exc.strerror}); the partial file was removed and nothing was "
                    "published") from None
            raise DynprovError(f"upload of {Path(source).name} failed: {exc}") from None
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        audit.append(self.cfg.paths.state_dir, user, "image-upload", label=label, sha256=sha,
                     bytes=size, groups=list(groups), customized=customized)
        self.publish_oslist()
        return Uploaded(image=image, bundle_sha256=sha, bundle_bytes=size,
                        customized=customized)

    def _copy_in(self, fh: IO[bytes], dest: Path, name: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        limit = self.settings.max_bundle_bytes
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                size += len(chunk)
                if size > limit:
                    raise InputError(f"{name} is larger than the limit of {limit} bytes "
                                     "([images] max_bundle_bytes)")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return digest.hexdigest(), size

    def _provisioning_initrd(self, rootfs: Path | None) -> Path | None:
        site = self.settings.provisioning_initrd
        if rootfs is None:
            return None
        if site is None:
            raise InputError("the bundle has a root filesystem but no initrd, and [images] "
                             "provisioning_initrd is not set: nothing would fetch the root "
                             "filesystem on the node")
        if not site.is_file():
            raise DynprovError(f"{self.cfg.path}: images.provisioning_initrd: {site}: no such "
                               "file (build the provisioning initramfs first)")
        return site

    def _publish(self, label: str, incoming: Path, meta: dict[str, Any], found: bundle.Bundle,
                 initrd: Path | None, rootfs: Path | None, user: str) -> Image:
        man = found.manifest
        with atomic.locked(self.lock_path):
            if self._exists(label):
                self._require_owner(user, label, "add a version to")
            number = imageversions.next_version(self.catalog.conn, label)
            final, meta_path = self.bundle_path(label, number), self._meta_path(label, number)
            try:
                atomic.write_text(meta_path, json.dumps({**meta, "version": number}, indent=2)
                                  + "\n", mode=0o640)
                os.replace(incoming, final)
                image = self.catalog.add(
                    label, found.kernel, initrd, rootfs, os_name=man.os_name, arch=man.arch,
                    mode=man.mode, cmdline=man.cmdline, prov_seconds=man.prov_seconds,
                    owner=user, version=number)
            except BaseException:
                for path in (final, meta_path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                raise
            self._sweep_locked(label)
        if number > 1:
            self._refresh_boot_files()
        return image

    def _refresh_boot_files(self) -> None:
        """Sites whose boot files are written out (``[boot] write_files``) get them re-rendered
        when a label's current version changes; serve renders per request anyway."""
        if self.cfg.boot.write_files:
            from pxe.setboot import render_all

            render_all(self.cfg, reload=False)

    # -- delete ----------------------------------------------------------------------------
    def delete(self, label: str, force: bool = False, version: int | None = None) -> list[str]:
        """Remove an image (every version) and its bundles, or with ``version`` one kept version
        that is not the current one; refused while nodes or runs use it unless ``force``.

        Returns the nodes that still used it (only non-empty with ``force``).
        """
        user = self._require("deleting an image")
        validate.label(label, "image label")
        with atomic.locked(self.lock_path) if self.root.is_dir() else contextlib.nullcontext():
            if not self._exists(label):
                raise NotFound(f"unknown image label {label!r}")
            self._require_owner(user, label, "force-delete" if force else "delete")
            if version is not None:
                if label not in self.catalog.labels():
                    raise NotFound(f"unknown image label {label!r}")
                nodes = self.catalog.remove_version(label, version, force=force)
                self._sweep_locked(label)
                audit.append(self.cfg.paths.state_dir, user, "image-delete", label=label,
                             version=version, force=force, in_use=nodes)
                return nodes
            nodes, runs = self.users_of(label)
            if (nodes or runs) and not force:
                from pxe.nodeset import fold

                why = []
                if nodes:
                    why.append(f"node(s) {fold(nodes)} run it or are switching to it")
                if runs:
                    why.append(f"provisioning run(s) {', '.join(map(str, runs))} asked for it")
                raise DynprovError(f"image {label!r} is in use: {'; '.join(why)}; "
                                   "use -force to delete it anyway")
            if label in self.catalog.labels():
                self.catalog.remove(label, force=True)
            self._sweep_locked(label)  # no version is kept now: every bundle of the label
            customize.remove_log(self.cfg.paths.state_dir, label)  # (the catalog's went above)
        audit.append(self.cfg.paths.state_dir, user, "image-delete", label=label, force=force,
                     in_use=nodes)
        self.publish_oslist()
        return nodes

    # -- versions ----------------------------------------------------------------------------
    def history(self, label: str) -> list[imageversions.Version]:
        """Every kept version of ``label`` (anyone may look, as at ``-list``)."""
        validate.label(label, "image label")
        return self.catalog.history(label)

    def rollback(self, label: str, version: int | None = None) -> tuple[int, int]:
        """Make a kept version current again (default: the previous one); the owner or an
        admin only. Returns (old, new)."""
        user = self._require("rolling back an image")
        validate.label(label, "image label")
        with atomic.locked(self.lock_path) if self.root.is_dir() else contextlib.nullcontext():
            if label not in self.catalog.labels():
                raise NotFound(f"unknown image label {label!r}")
            self._require_owner(user, label, "roll back")
            old, new = self.catalog.rollback(label, version)
        audit.append(self.cfg.paths.state_dir, user, "image-rollback", label=label,
                     version=new, previous=old)
        self._refresh_boot_files()
        self.publish_oslist()
        return old, new

    # -- list / get --------------------------------------------------------------------------
    def list(self) -> list[Entry]:
        entries = []
        for image in self.catalog.all():
            meta = self._meta(image.label)
            entries.append(Entry(
                label=image.label, os_name=image.os_name, arch=image.arch, mode=image.mode,
                owner=image.owner, created=image.created,
                bundle_bytes=meta.get("bundle_bytes"), bundle_sha256=meta.get("bundle_sha256"),
                groups=list(meta.get("groups", [])), customized=list(meta.get("customized", [])),
                in_use=self.catalog.in_use(image.label), version=image.version,
                versions=len(imageversions.numbers(self.catalog.conn, image.label))))
        return entries

    def get(self, label: str, output: str, version: int | None = None) -> tuple[str, int]:
        """Copy the uploaded bundle of the current version (or ``version``), checked against its
        recorded sha256, to ``output`` (``-`` = standard output), written with the caller's own
        permissions."""
        self._require("retrieving an image bundle")
        validate.label(label, "image label")
        if version is not None and label in self.catalog.labels():
            imageversions.row(self.catalog.conn, label, version)  # kept, or exit 2 naming them
        path = self.bundle_path(label, version)
        if not path.exists():
            if label in self.catalog.labels():
                raise NotFound(f"image {label!r} has no uploaded bundle for version "
                               f"{self._version(label, version)} (it was added with "
                               "`pxe-stage images add`)")
            raise NotFound(f"unknown image label {label!r}")
        expected = self._meta(label, version).get("bundle_sha256")
        with open(path, "rb") as src:
            if output == "-":
                sha, size = _copy(src, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            else:
                sha, size = self._write_as_caller(src, Path(output))
        if expected and sha != expected:
            if output != "-":
                with contextlib.suppress(OSError), as_caller():
                    Path(output).unlink()
            raise DynprovError(f"the stored bundle of {label!r} does not match its recorded "
                               f"sha256 (repository damaged?); {output} not written")
        return sha, size

    def _write_as_caller(self, src: IO[bytes], output: Path) -> tuple[str, int]:
        with as_caller() as user:
            parent = output.parent if str(output.parent) else Path(".")
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=parent)
            except PermissionError:
                raise authz.PermissionDenied(f"permission denied: user {user} cannot write "
                                             f"in {parent}") from None
            except FileNotFoundError:
                raise InputError(f"{parent}: no such directory") from None
            try:
                with os.fdopen(fd, "wb") as out:
                    result = _copy(src, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, output)
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                if isinstance(exc, PermissionError):
                    raise authz.PermissionDenied(f"permission denied: user {user} cannot "
                                                 f"write {output}") from None
                raise DynprovError(f"cannot write {output}: {exc.strerror or exc}") from None
            return result

    # -- publishing --------------------------------------------------------------------------
    def publish_oslist(self) -> None:
        """Tell the scheduler faces that the image catalog changed (pxe.hooks): the Moab face
        rewrites the WIKI report a ``file://`` CLUSTERQUERYURL reads (each node's OSLIST comes
        from the Catalog). ``cluster-query`` reads the Catalog at every poll anyway, so with
        either URL a new image is in the nodes' OSLIST at the scheduler's next poll."""
        from pxe import hooks

        try:
            hooks.announce(self.cfg, hooks.Event(hooks.IMAGES))
        except Exception as exc:  # noqa: BLE001 - the catalog change is committed already
            log.warning("could not tell the scheduler faces (their next poll will see it): %s",
                        exc)

    def init(self) -> Any:
        """``-init``: re-publish the OS list and re-render every boot config."""
        user = self._require("re-publishing the OS list")
        from pxe.setboot import render_all

        report = render_all(self.cfg)
        self.publish_oslist()
        audit.append(self.cfg.paths.state_dir, user, "image-init", images=len(self.catalog.all()))
        return report


def _copy(src: IO[bytes], out: IO[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        digest.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
