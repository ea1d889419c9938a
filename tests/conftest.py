"""Shared fixtures: a throw-away dynprov site in a temp dir (config, state, TFTP/HTTP roots)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pxe import config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pg_support  # noqa: E402  (tests/ is not a package)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Site:
    root: Path
    config_path: Path

    @property
    def cfg(self) -> config.Config:
        return config.load(self.config_path)

    def run(self, *argv: str, check: bool = False, cmd: str = "pxe-stage",
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a console script of ours as a real process against this site."""
        env = {**os.environ, "DYNPROV_CONFIG": str(self.config_path)}
        module = {"pxe-stage": "pxe.cli.main", "fg-pool": "pxe.cli.fg_pool",
                  "os-switch": "msm_plugin.os_switch", "cluster-query": "msm_plugin.cluster_query",
                  "node-power": "msm_plugin.node_power", "fg-moab": "msm_plugin.fg_moab",
                  "dynprov-lab": "lab.cli"}.get(cmd)
        full = [sys.executable, "-m", module, *argv] if module else [cmd, *argv]
        proc = subprocess.run(full, capture_output=True, text=True, env=env, input=input,
                              timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} {' '.join(argv)} -> {proc.returncode}\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def lab(self, *argv: str, **kwargs) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
        """Run `dynprov-lab` (the virtual cluster, package lab/) against this site."""
        return self.run(*argv, cmd="dynprov-lab", **kwargs)

    def snapshot(self) -> dict[str, bytes]:
        """Every file under the site (minus SQLite's shared-memory files and the checked-config
        cache, pxe.configcache: derived from dynprov.toml, not state): to prove nothing changed."""
        out = {}
        for path in sorted(self.root.rglob("*")):
            if not path.is_file() or path.name.endswith(("-shm", "-wal", "-journal", ".lock")) \
                    or path.name == "config.cache":
                continue
            if path.suffix == ".db":
                # Through SQLite, never open()/close(): closing a plain descriptor on the file
                # would drop the POSIX locks this process's own connections hold.
                import sqlite3

                conn = sqlite3.connect(path)
                try:
                    out[str(path.relative_to(self.root))] = "\n".join(conn.iterdump()).encode()
                finally:
                    conn.close()
                continue
            out[str(path.relative_to(self.root))] = path.read_bytes()
        url = self.cfg.state.url
        if url:
            out["[state] url"] = pg_support.dump(url)
        return out


def make_site(root: Path, backend: str = "dnsmasq") -> Site:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dynprov.toml"
    # The faces subscribe through their entry points (pyproject.toml); named here as well so
    # the tests do not depend on how this checkout was installed (pxe.hooks drops duplicates).
    # The Slurm face's subscriber does nothing without a [slurm] section.
    path.write_text(config.example(root, backend=backend)
                    + '\n[hooks]\nsubscribers = ["msm_plugin.wiki:on_event", '
                    '"slurm_plugin.down:on_event"]\n' + state_section())
    return Site(root=root, config_path=path)


def state_section() -> str:
    """'' (the SQLite file) unless DYNPROV_TEST_STATE=postgresql: then a fresh database in the
    run's throw-away PostgreSQL cluster (tests/pg_support.py)."""
    if not pg_support.enabled():
        return ""
    return f'\n[state]\nurl = "{pg_support.shared().new_store()}"\n'


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    pg_support.stop_shared()


# Tests that are about SQLite itself, left out (deselected, not skipped) of the PostgreSQL run.
SQLITE_ONLY = {
    "tests/test_import_budget.py::test_set_boot_render_imports_nothing_it_does_not_use":
        "the warm path of an SQLite site; on PostgreSQL the command imports psycopg, which "
        "brings dataclasses, inspect and ast (bench_state measures that backend)",
    "tests/test_wal_checkpoint.py": "SQLite's WAL and its checkpoints (PostgreSQL checkpoints "
    "by itself)",
    "tests/test_db_migrations.py": "upgrades SQLite files of older releases (table rebuilds, "
    "PRAGMA user_version); PostgreSQL starts at the baseline, test_state_store.py runs the "
    "later migrations and the version check on both",
    "tests/test_bad_input_cli.py::test_unexpected_error_is_one_line_with_exit_1":
        "a corrupt SQLite file",
    "tests/test_state_store.py": "runs every test on both backends itself",
    "tests/test_wiki_common_sql.py::test_sql_lines_equal_python_lines":
        "cluster-query's one-query fast path is SQLite's dialect (PostgreSQL takes the Python "
        "path, which this test compares it with)",
    "tests/test_pools_authz.py::test_member_may_move_and_is_named_in_the_audit_log":
        "the member writes through the state dir's group permissions (the SQLite file); "
        "PostgreSQL grants by database role (its refusal: test_bad_input_cli.py)",
    "tests/test_wiki_common_sql.py::test_commit_bumps_the_stamp_and_the_key":
        "the -stamp file next to an SQLite database (PostgreSQL: test_state_store.py)",
}


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    if not pg_support.enabled():
        return
    keep, drop = [], []
    for item in items:
        where = item.nodeid.split("[")[0]
        sqlite_only = where in SQLITE_ONLY or where.split("::")[0] in SQLITE_ONLY
        (drop if sqlite_only else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def state_target(tmp_path: Path) -> Path | str:
    """What db.connect opens for a test that needs a bare database (no site): an SQLite file,
    or under DYNPROV_TEST_STATE=postgresql a fresh PostgreSQL database."""
    if pg_support.enabled():
        return pg_support.shared().new_store()
    return tmp_path / "state.db"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With DYNPROV_NO_SKIP=1 (tools/test, CI) a skipped test fails: CI must not pass by skipping
    what a missing package or a broken install would otherwise hide."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("DYNPROV_NO_SKIP") == "1" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under DYNPROV_NO_SKIP=1: {reason}"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


@pytest.fixture
def isc_site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site", backend="isc")


def fake_bzimage(path: Path, payload: bytes = b"") -> Path:
    """A file with a valid x86 boot-protocol header ('HdrS' at 0x202): enough for catalog checks."""
    head = bytearray(0x400)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = struct.pack("<H", 0x020F)
    path.write_bytes(bytes(head) + payload)
    return path


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    return fake_bzimage(tmp_path / "vmlinuz", os.urandom(4096))
