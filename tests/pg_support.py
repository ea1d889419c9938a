"""A throw-away PostgreSQL cluster for the tests (helpers, no tests here).

initdb in a fresh temp dir as the unprivileged ``postgres`` user (Debian's package creates it;
the server refuses to run as root), Unix socket in that dir only (listen_addresses = ''),
peer authentication (root and postgres only; no TCP at all), C collation so
ORDER BY sorts as SQLite's byte order. Stopped (pg_ctl stop -m immediate) and removed after.
One cluster per pytest process; each site gets its own database with a random name.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path


def _pg_bin() -> Path:
    """Debian's newest installed server (/usr/lib/postgresql/<major>/bin), or DYNPROV_PG_BIN."""
    if os.environ.get("DYNPROV_PG_BIN"):
        return Path(os.environ["DYNPROV_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PG_USER = "postgres"
START_TIMEOUT = 60


def _as_user(argv: list[str], **kwargs) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", PG_USER, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT, **kwargs)


class Cluster:
    """One running PostgreSQL server in a temp dir; ``url(db)`` is what [state] url takes."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL is not installed ({PG_BIN}/initdb missing; "
                               "tools/install-deps installs it)")
        self.root = Path(tempfile.mkdtemp(prefix="dynprov-pg-", dir="/tmp"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.sock.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_USER)
            for p in (self.root, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.log = self.root / "server.log"
        self._stores_db = ""
        out = _as_user([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", PG_USER,
                        "--auth=peer", "--locale=C", "--encoding=UTF8", "--no-sync"])
        if out.returncode != 0:
            self.remove()
            raise RuntimeError(f"initdb failed: {out.stderr.strip()}")
        # Peer authentication on the socket: root (the commands) and postgres (this helper's
        # admin) connect as the superuser; any other local user is refused, as an unprivileged
        # user cannot write the SQLite file (tests/test_bad_input_cli.py checks both).
        (self.data / "pg_hba.conf").write_text("local all all peer map=dynprov\n")
        (self.data / "pg_ident.conf").write_text(
            f"dynprov root {PG_USER}\ndynprov {PG_USER} {PG_USER}\n")
        if os.geteuid() == 0:
            for name in ("pg_hba.conf", "pg_ident.conf"):
                os.chown(self.data / name, pw.pw_uid, pw.pw_gid)
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(f"listen_addresses = ''\nunix_socket_directories = '{self.sock}'\n"
                     "unix_socket_permissions = 0777\nfsync = off\nsynchronous_commit = off\n"
                     "full_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n")
        self.start()

    def start(self) -> None:
        out = _as_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                        "-w", "-t", str(START_TIMEOUT), "start"])
        if out.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {out.stderr.strip()} "
                               f"{self.log.read_text()[-500:] if self.log.exists() else ''}")

    def stop(self, mode: str = "fast") -> None:
        _as_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop"])

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again (clients see their connections dropped)."""
        self.stop(mode)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql:///{database}?host={self.sock}&user={PG_USER}"

    def psql(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = "dynprov_" + secrets.token_hex(6)
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def new_store(self) -> str:
        """A fresh, empty state store as a [state] url: a schema of its own in one shared
        database (search_path in the URL), much cheaper than a database per test."""
        if not self._stores_db:
            self._stores_db = self.create_database()
        schema = "s_" + secrets.token_hex(6)
        self.psql(f'CREATE SCHEMA "{schema}"', self._stores_db)
        return f"{self.url(self._stores_db)}&options=-csearch_path%3D{schema}"

    def drop_store(self, url: str) -> None:
        """The store behind ``url`` disappears (as a dropped database would)."""
        schema = url.rsplit("%3D", 1)[1]
        self.psql(f'DROP SCHEMA "{schema}" CASCADE', self._stores_db)

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def dump(url: str) -> bytes:
    """Every table's rows, in order: the PostgreSQL counterpart of SQLite's iterdump()."""
    import psycopg

    lines = []
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() ORDER BY table_name")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}" ORDER BY 1'):
                lines.append(f"{table}: {row!r}")
    return "\n".join(lines).encode()


_shared: Cluster | None = None


def shared() -> Cluster:
    """The process's cluster, started on first use (conftest stops it at the session's end)."""
    global _shared
    if _shared is None:
        _shared = Cluster()
    return _shared


def stop_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.remove()
        _shared = None


def enabled() -> bool:
    """DYNPROV_TEST_STATE=postgresql: every site of the run keeps its state in PostgreSQL."""
    return os.environ.get("DYNPROV_TEST_STATE", "sqlite") == "postgresql"
