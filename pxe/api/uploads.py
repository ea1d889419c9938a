"""PUT /api/v1/images/{label}: an image bundle streamed into the repository, all or nothing.

- A second upload of a label while one is in progress gets 409 at once: a per-label flock in
  ``<state_dir>/api/locks`` (shared by every worker process; the kernel drops it if a worker
  dies). A label that already exists gets a new version (its owner or an admin; another
  user: 403 naming the owner).
- The body is refused with 413 before it is read when Content-Length says it is too big, and
  while it streams as soon as it passes the limit (``[api] max_upload_bytes``, at most
  ``[images] max_bundle_bytes``); the partial file is removed.
- The body goes into a private directory under the repository's ``.incoming`` (same file
  system), hashed on the way; then pxe.repository does what `fg-moab-image -upload` does
  (checks, customization, publication) with the API user as the owner in the audit log. The
  spooled file is hard-linked into its work area instead of being copied a second time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio.to_thread
from starlette.requests import Request

from pxe import repository, validate
from pxe.api.common import ApiError
from pxe.config import Config
from pxe.errors import DynprovError, InputError

FLUSH = 1 << 20


@dataclass
class Spooled:
    path: Path
    sha256: str
    size: int


class ApiRepository(repository.Repository):
    """The repository acting for an API user whose group membership the API has checked."""

    def __init__(self, cfg: Config, user: str, spooled: Spooled | None = None,
                 admin: bool = False):
        super().__init__(cfg)
        self.api_user = user
        self.spooled = spooled
        self.admin = admin

    def _require(self, action: str) -> str:
        return self.api_user

    def _is_admin(self, user: str) -> bool:
        return self.admin  # the API's own roles decided it (root or [api] admin_group)

    def _copy_in(self, fh: IO[bytes], dest: Path, name: str) -> tuple[str, int]:
        if self.spooled is not None:
            os.link(self.spooled.path, dest)
            return self.spooled.sha256, self.spooled.size
        return super()._copy_in(fh, dest, name)


def limit(cfg: Config, max_upload: int | None) -> int:
    bundle_max = repository.settings(cfg).max_bundle_bytes
    return min(bundle_max, max_upload) if max_upload else bundle_max


@contextlib.contextmanager
def label_lock(lock_dir: Path, label: str) -> Iterator[None]:
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"upload-{label}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ApiError(409, f"an upload of image {label!r} is in progress; "
                                "try again when it has finished") from None
        yield
    finally:
        os.close(fd)


async def receive(request: Request, label: str, groups: list[str], user: str,
                  admin: bool = False) -> dict[str, Any]:
    """Spool, check and publish one upload; ``admin``: the API's roles made the caller an
    admin (root or [api] admin_group), who may add a version to any user's label."""
    state = request.app.state
    cfg: Config = state.cfg
    validate.label(label, "image label")
    for g in groups:
        validate.label(g, "group")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/octet-stream", "application/x-tar"):
        raise ApiError(415, "the body must be the bundle file (Content-Type: "
                            f"application/octet-stream), not {ctype or 'nothing'!r}")
    most = limit(cfg, state.settings.max_upload_bytes)
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad Content-Length")
        if int(length) > most:
            raise ApiError(413, f"bundle of {length} bytes is larger than the limit of {most} "
                                "bytes ([api] max_upload_bytes / [images] max_bundle_bytes)")
    with label_lock(state.settings.api_dir / "locks", label):
        # One repository (and so one SQLite connection) per worker-thread call: a connection
        # belongs to the thread that opened it.
        taken = await anyio.to_thread.run_sync(_taken_by, cfg, user, label, admin)
        if taken is not None:  # another user's label (an owner's upload adds a version)
            raise ApiError(403, str(taken))
        repo = ApiRepository(cfg, user, admin=admin)
        await anyio.to_thread.run_sync(repo._prepare)
        work = Path(tempfile.mkdtemp(prefix="api.", dir=repo.incoming))
        try:
            spooled = await _spool(request, work / f"{label}.bundle", most)
            repo.spooled = spooled
            try:
                done = await anyio.to_thread.run_sync(repo.upload, spooled.path, label, groups)
            except InputError as exc:
                if "already exists" in str(exc):
                    raise ApiError(409, str(exc)) from None
                raise
        finally:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
    image = done.image
    return {"label": image.label, "os_name": image.os_name, "arch": image.arch,
            "mode": image.mode, "version": image.version, "bundle_sha256": done.bundle_sha256,
            "bundle_bytes": done.bundle_bytes, "customized": done.customized, "owner": image.owner,
            "uploaded_by": user}


def _taken_by(cfg: Config, user: str, label: str, admin: bool) -> DynprovError | None:
    repo = ApiRepository(cfg, user, admin=admin)
    if not repo._exists(label):
        return None
    try:
        repo._require_owner(user, label, "add a version to")
    except DynprovError as exc:
        return exc
    return None


async def _spool(request: Request, path: Path, most: int) -> Spooled:
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        async for chunk in request.stream():
            size += len(chunk)
            if size > most:
                raise ApiError(413, f"bundle larger than the limit of {most} bytes ([api] "
                                    "max_upload_bytes / [images] max_bundle_bytes); refused "
                                    "while streaming, nothing kept")
            digest.update(chunk)
            buffer += chunk
            if len(buffer) >= FLUSH:
                data, buffer = bytes(buffer), bytearray()
                await anyio.to_thread.run_sync(out.write, data)
        if buffer:
            await anyio.to_thread.run_sync(out.write, bytes(buffer))
        await anyio.to_thread.run_sync(out.flush)
        await anyio.to_thread.run_sync(os.fsync, out.fileno())
    if size == 0:
        raise ApiError(400, "empty body: send the bundle file")
    return Spooled(path, digest.hexdigest(), size)
