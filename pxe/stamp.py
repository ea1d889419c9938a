"""The change stamp: a small file next to the state database that writers rewrite after COMMIT.

Readers that keep a copy derived from the database (cluster-query's report file, the boot
configs `pxe-stage serve` renders per request, the REST API's cached answers, the run driver's
announcements to the faces: db.content_stamp) key the copy on it: one open + read, no SQLite
connection and no parsing of SQLite's private files (-shm headers). Read the stamp BEFORE
reading the database: a copy is then never older than the key it is stored under.
A PostgreSQL store keeps its stamp in the database instead (pxe.dbbackend_pg; db.change_counter),
so that every server reads the same one.
"""

from __future__ import annotations

import os

SUFFIX = "-stamp"
WIDTH = 32


def path_for(db_path: str | os.PathLike[str]) -> str:
    return os.fspath(db_path) + SUFFIX


def new_value() -> str:
    """A stamp value no earlier one equals (the file's and PostgreSQL's stamp row alike)."""
    import time  # not on the readers' path (cluster-query imports this module)

    # os.urandom as secrets.token_hex does, without importing secrets (hmac, OpenSSL's hashes)
    return f"{time.time_ns():x}.{os.urandom(6).hex()}"


def bump(db_path: str | os.PathLike[str]) -> None:
    """Give the stamp a new value (a fixed-width overwrite in place: one write, no rename)."""
    value = new_value().ljust(WIDTH).encode()[:WIDTH]
    fd = os.open(path_for(db_path), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, value, 0)
    finally:
        os.close(fd)


def read(db_path: str | os.PathLike[str]) -> str:
    """The current stamp ("" if there is none yet: never equal to a stored key)."""
    try:
        fd = os.open(path_for(db_path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.pread(fd, WIDTH, 0).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
