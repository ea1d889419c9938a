"""A service node's blob cache: a blob missing here is fetched from the primary by its hash.

Blobs are content-addressed (``blobs/<sha256>``, pxe.images), so the name says what the bytes
must be: a service node (`serve --segment NAME`) that is asked for one it lacks GETs
``<[segment] primary_url>/blobs/<sha256>``, hashes while it writes a hidden temp file in its own
store (``blobs/.fetch.*``: the file servers never serve hidden names), and renames it into place
only when the sha256 matches - a wrong, short or oversized answer is thrown away and the client
gets 404, never an unverified byte. Bounded: ``fetch_max_mb`` bytes and ``fetch_seconds`` for the
whole fetch (also for waiting behind another worker fetching the same blob: one fetch per blob
at a time, under an flock). The other served root gets a hard link (or a verified copy). It is a
cache, not a copy job: a blob is fetched when a loader asks for it over HTTP, or when a node of
the segment enters a run for an image (prefetch(), from the serve's heartbeat: TFTP clients
cannot wait for a fetch), never before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pxe.images import BLOBS
from pxe.segments import SegmentSettings

log = logging.getLogger("dynprov.blobcache")

SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^blobs/([0-9a-f]{64})$")
CHUNK = 1 << 20


class FetchError(Exception):
    """The blob could not be fetched and verified (the reason is logged; the client gets 404)."""


def wanted(name: str) -> str | None:
    """The sha256 if ``name`` (a clean relative path) is a blob's, else None."""
    m = _NAME.match(name)
    return m.group(1) if m else None


def fetch(seg: SegmentSettings, sha: str, roots: list[Path]) -> Path:
    """Make ``<roots[0]>/blobs/<sha>`` exist with verified content (fetching it from the primary
    if needed) and link it into the other roots; returns its path. Raises FetchError."""
    if not SHA256.match(sha):
        raise FetchError(f"not a sha256: {sha[:80]!r}")
    if not seg.primary_url:
        raise FetchError("no [segment] primary_url to fetch from")
    store = roots[0] / BLOBS
    dest = store / sha
    store.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + seg.fetch_seconds
    with _one_fetch(store, sha, end):
        if not dest.exists():  # another worker may have fetched it while we waited
            _download(seg, sha, store, dest, end)
    for root in roots[1:]:
        _link(dest, root / BLOBS / sha)
    return dest


@contextlib.contextmanager
def _one_fetch(store: Path, sha: str, end: float):
    """One fetch per blob at a time (the workers of one server share the store)."""
    fd = os.open(store / f".fetch.{sha}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise FetchError(f"blob {sha}: another fetch of it did not end in time") \
                        from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # the lock file stays (hidden; removing it would race a waiting worker)


def _download(seg: SegmentSettings, sha: str, store: Path, dest: Path, end: float) -> None:
    assert seg.primary_url is not None
    url = urlsplit(seg.primary_url)
    connection = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    left = max(0.1, end - time.monotonic())
    conn = connection(url.hostname, url.port, timeout=min(30.0, left))
    fd, tmp = tempfile.mkstemp(prefix=".fetch.", dir=store)
    digest, size = hashlib.sha256(), 0
    try:
        try:
            conn.request("GET", f"/{BLOBS}/{sha}", headers={"Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise FetchError(f"blob {sha}: the primary answered HTTP {resp.status}")
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > seg.fetch_max_bytes:
                raise FetchError(f"blob {sha}: {length} bytes is more than fetch_max_mb allows")
            with os.fdopen(fd, "wb") as out:
                fd = -1
                while True:
                    if time.monotonic() >= end:
                        raise FetchError(f"blob {sha}: not fetched within "
                                         f"{seg.fetch_seconds:g} s")
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > seg.fetch_max_bytes:
                        raise FetchError(f"blob {sha}: more than fetch_max_mb bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"blob {sha}: fetching from {seg.primary_url}: {exc}") from None
        if digest.hexdigest() != sha:
            raise FetchError(f"blob {sha}: the primary sent {size} bytes whose sha256 is "
                             f"{digest.hexdigest()}: thrown away")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        _sync_dir(store)
        log.info("blob %s: fetched %d bytes from %s, verified", sha, size, seg.primary_url)
    finally:
        conn.close()
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link(src: Path, dest: Path) -> None:
    """The blob in another root: a hard link, or a copy checked again (temp + rename)."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".fetch.{dest.name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        if _sha256(tmp) != dest.name:
            os.unlink(tmp)
            raise FetchError(f"blob {dest.name}: the copy into {dest.parent} does not verify") \
                from None
        os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def serve_missing(seg: SegmentSettings, roots: list[Path], name: str
                  ) -> tuple[int, os.stat_result, str] | None:
    """The file servers' hook for a missing file: a blob of a service node -> fetched, verified
    and opened like any served file ((fd, stat, name), the caller owns fd); else None."""
    from pxe.serve import files

    rel = files.clean_name(name)
    sha = wanted(rel)
    if sha is None or not seg.name or not seg.primary_url:
        return None
    try:
        fetch(seg, sha, roots)
    except (FetchError, OSError) as exc:
        log.error("%s", exc)
        return None
    try:
        return files.open_file(files.root_of(roots[0]), rel)
    except (files.Missing, files.Refused, OSError) as exc:
        log.error("blob %s: fetched but cannot be opened: %s", sha, exc)
        return None


def needed(conn: Any, segment: str) -> set[str]:
    """The blobs the segment's nodes in a run are about to boot (kernel, initrd, root image)."""
    from pxe import states

    rows = conn.execute(
        "SELECT DISTINCT i.kernel_sha, i.initrd_sha, i.rootfs_sha FROM run_nodes rn "
        "JOIN runs r ON r.id = rn.run_id JOIN images i ON i.label = r.label "
        f"WHERE r.finished IS NULL AND rn.state IN ({states.ACTIVE_SQL}) AND "
        "COALESCE((SELECT s.segment FROM node_segments s WHERE s.node = rn.node), '') = ?",
        (segment,)).fetchall()
    return {sha for row in rows for sha in row if sha and SHA256.match(sha)}


def prefetch(seg: SegmentSettings, roots: list[Path], shas: set[str]) -> list[str]:
    """Fetch (and verify) the blobs of ``shas`` missing here, before a loader asks for them over
    TFTP, which cannot wait for a fetch; returns the ones fetched. Never raises."""
    done = []
    for sha in sorted(shas):
        if all((root / BLOBS / sha).exists() for root in roots):
            continue
        try:
            fetch(seg, sha, roots)
            done.append(sha)
        except (FetchError, OSError) as exc:
            log.error("prefetch: %s", exc)
    return done
