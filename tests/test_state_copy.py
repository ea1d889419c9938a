"""`pxe-stage state copy`: a populated SQLite site moved into a real PostgreSQL store
(tests/pg_support.py), all or nothing, verified, the password never shown."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pg_support
import pytest

from pxe import claims, config, db, hwfacts, pools, reports, run, segments, servers, setboot, statecopy
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from tests.conftest import Site, fake_bzimage

PASSWORD = "Sw0rdf1sh-not-shown"


@pytest.fixture(scope="module")
def cluster() -> pg_support.Cluster:
    return pg_support.shared()


def sqlite_site(root: Path) -> Site:
    """A site on its SQLite file whatever DYNPROV_TEST_STATE says: the copy's source."""
    root.mkdir(parents=True)
    path = root / "dynprov.toml"
    path.write_text(config.example(root))
    return Site(root=root, config_path=path)


def store_url(cluster: pg_support.Cluster, as_parameter: bool = False) -> str:
    """A fresh store whose URL carries a password, in the authority or as libpq's parameter
    (peer authentication ignores it)."""
    url = cluster.new_store()
    assert url.startswith("postgresql:///")
    if as_parameter:
        return f"{url}&password={PASSWORD}"
    return url.replace("postgresql:///", f"postgresql://{pg_support.PG_USER}:{PASSWORD}@/", 1)


def populate(site: Site, tmp: Path) -> int:
    """Something in every table: nodes with MACs, BMCs, a segment and hardware facts, an image
    with two versions, a finished run with its events, a pool, settings, a discovered machine,
    an agent, a stopped server and an expired claim. Returns the finished run's id."""
    cfg = site.cfg
    cat = Catalog(cfg)
    for i in range(2):
        cat.add("centos7", fake_bzimage(tmp / f"vmlinuz-{i}", os.urandom(1024)), owner="alice")
    cat.add("sles15", fake_bzimage(tmp / "vmlinuz-s", os.urandom(1024)))
    Inventory(cfg).add([build(cfg, {"name": f"n{i:03d}", "mac": f"52:54:00:00:00:{i:02x}",
                                    "ip": f"198.18.0.{10 + i}", "bmc_type": "ipmi",
                                    "bmc_address": "127.0.0.1", "bmc_port": 6230 + i,
                                    "bmc_user": "admin", "bmc_secret": "bmc-key"})
                        for i in range(1, 4)])
    conn = db.connect(cfg.database)
    req = run.request(cfg, conn, ["n001"], "centos7", mode="ondemand")
    setboot.set_boot(cfg, ["n001"], "centos7")
    token = conn.execute("SELECT boot_token FROM nodes WHERE name = 'n001'").fetchone()[0]
    reports.record_report(conn, "n001", token, "booting")
    reports.record_report(conn, "n001", token, "ready")
    run.expire(cfg, conn)  # closes the run whose nodes are all final, as the driver does
    pools.create(cfg, conn, "gpu", user="root")
    segments.assign(conn, ["n003"], "east")
    now = time.time()
    with db.transaction(conn):
        hwfacts.store(conn, "n001", {"cpus": 4, "memory_mb": 8192})
        db.set_setting(conn, "site-note", "moved 'soon' 100%")
        conn.execute("INSERT INTO discovered(mac, ip, facts, first_seen, last_seen) "
                     "VALUES (?, ?, ?, ?, ?)", ("52:54:00:ff:00:01", "198.18.0.99", "{}", now,
                                                now + 0.125))
        conn.execute("INSERT INTO agents(node, token_sha, seq, adopted) VALUES (?, ?, ?, ?)",
                     ("n002", "ab" * 32, 7, now))
        db.log_event(conn, "gone", "n002", "an event deleted below: its id is never reused")
    servers.beat(conn, "serve/old/-/1", servers.SERVE, "", now - 3600)
    servers.stopped(conn, "serve/old/-/1", now - 3500)
    claims.claim(conn, "driver/old", [(req.run_id, "n001")], lease=10, now=now - 3600)
    with db.transaction(conn):
        conn.execute("DELETE FROM events WHERE kind = 'gone'")
    finished = conn.execute("SELECT finished FROM runs WHERE id = ?", (req.run_id,)).fetchone()
    assert finished[0] is not None, "the run did not finish"
    conn.close()
    return req.run_id


def target_config(site: Site, url: str) -> Site:
    """The same site (roots, blobs) with its state in PostgreSQL."""
    path = site.root / "dynprov-pg.toml"
    path.write_text(site.config_path.read_text() + f'\n[state]\nurl = "{url}"\n')
    return Site(root=site.root, config_path=path)


def rows_of(target: Path | str) -> dict[str, list[tuple]]:
    """Every table's rows, sorted, the stores' bookkeeping aside."""
    conn = db.connect(target, create=False)
    try:
        if db.is_postgresql(conn):
            tables = [r[0] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()")]
        else:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%'")]
        out = {}
        for table in sorted(set(tables) - {"schema_version", "dynprov_stamp"}):
            cols = sorted(d[0] for d in conn.execute(f"SELECT * FROM {table} LIMIT 0").description)
            out[table] = sorted((tuple(r) for r in conn.execute(
                f"SELECT {', '.join(cols)} FROM {table}")), key=repr)
        return out
    finally:
        conn.close()


def tables_in(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema()")]


def copy(site: Site, *argv: str):  # type: ignore[no-untyped-def]
    proc = site.run("state", "copy", *argv)
    assert PASSWORD not in proc.stdout + proc.stderr
    return proc


def reads(site: Site, run_id: int) -> list[str]:
    """What the admin sees of the nodes, images and history."""
    out = []
    for argv in (("nodes", "list", "--json"), ("nodes", "show", "n[001-003]", "--json"),
                 ("images", "list", "--json"), ("images", "history", "centos7", "--json"),
                 ("run", "list", "--json"), ("run", "show", str(run_id), "--json")):
        proc = site.run(*argv, check=True)
        out.append(proc.stdout)
    return out


# -- integration: real PostgreSQL ------------------------------------------------------------------
@pytest.mark.integration
def test_a_populated_site_is_copied_whole_and_reads_the_same(cluster, tmp_path):
    site = sqlite_site(tmp_path / "site")
    run_id = populate(site, tmp_path)
    url = store_url(cluster)
    db.connect(url).close()  # an empty schema (a command ran against it first) is no state
    before = site.snapshot()
    proc = copy(site, "--to", url)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the password in --to is visible" in proc.stderr
    assert "***" in proc.stdout and "committed" in proc.stdout
    source_rows = rows_of(site.cfg.db_path)
    for table, rows in source_rows.items():  # every table, each with its count
        assert any(line.split()[:3] == [table, str(len(rows)), str(len(rows))]
                   for line in proc.stdout.splitlines()), (table, proc.stdout)
    assert all(source_rows[t] for t in ("nodes", "macs", "image_versions", "runs", "run_nodes",
                                         "events", "node_segments", "servers", "run_claims"))
    assert rows_of(url) == source_rows
    snapshot = {k: v for k, v in site.snapshot().items() if k != "state/audit.log"}
    assert snapshot == {k: v for k, v in before.items() if k != "state/audit.log"}

    moved = target_config(site, url)
    assert reads(moved, run_id) == reads(site, run_id)
    # New ids continue after the copied ones and the deleted event's (SQLite's high-water mark).
    lite = sqlite3.connect(site.cfg.db_path)
    top = dict(lite.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    lite.close()
    pg = db.connect(url)
    with db.transaction(pg):
        new_run = pg.execute("INSERT INTO runs(label, mode, created) VALUES ('x', 'ondemand', 1) "
                             "RETURNING id").fetchone()[0]
        new_event = pg.execute("INSERT INTO events(ts, kind) VALUES (1, 'k') "
                               "RETURNING id").fetchone()[0]
    pg.close()
    assert (new_run, new_event) == (top["runs"] + 1, top["events"] + 1)
    audit = [json.loads(line) for line in (site.root / "state" / "audit.log").read_text()
             .splitlines()]
    assert audit[-1]["action"] == "state-copy" and PASSWORD not in json.dumps(audit)


@pytest.mark.integration
def test_a_second_copy_is_refused_and_replace_says_what_it_drops(cluster, tmp_path):
    site = sqlite_site(tmp_path / "site")
    populate(site, tmp_path)
    url = store_url(cluster, as_parameter=True)
    assert copy(site, "--to", url).returncode == 0
    with db.transaction(conn := db.connect(site.cfg.db_path)):
        conn.execute("UPDATE nodes SET groups = 'changed' WHERE name = 'n002'")
    conn.close()
    before, source_before = pg_support.dump(url), site.snapshot()
    proc = copy(site, "--to", url)
    assert proc.returncode == 1
    assert "already holds a dynprov state; --replace drops" in proc.stderr
    assert "nothing was changed (rows: " in proc.stderr and "nodes 3" in proc.stderr
    assert "--replace" in proc.stderr and len(proc.stderr.strip().splitlines()) == 2  # + warning
    assert pg_support.dump(url) == before
    assert site.snapshot() == source_before

    proc = copy(site, "--to", url, "--replace", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"table": "nodes", "rows": 3} in out["dropped"]
    assert out["target"].endswith("&password=***")
    assert rows_of(url) == rows_of(site.cfg.db_path)


@pytest.mark.integration
def test_a_failure_mid_copy_leaves_the_target_as_it_was(cluster, tmp_path):
    site = sqlite_site(tmp_path / "site")
    populate(site, tmp_path)
    # A MAC of a node that does not exist: SQLite took it with its foreign keys off,
    # PostgreSQL refuses it when macs is copied, after nodes, images, runs... went in.
    lite = sqlite3.connect(site.cfg.db_path)
    lite.execute("INSERT INTO macs(mac, node, idx) VALUES ('52:54:00:00:00:99', 'ghost', 0)")
    lite.commit()
    lite.close()
    url = store_url(cluster)
    proc = copy(site, "--to", url)
    assert proc.returncode == 1
    assert "the copy failed and was rolled back, the target is as it was" in proc.stderr
    assert "macs" in proc.stderr and len(proc.stderr.strip().splitlines()) == 2
    assert tables_in(url) == []

    # A target holding an earlier copy keeps it whole, --replace or not.
    clean = sqlite_site(tmp_path / "clean")
    populate(clean, tmp_path / "clean")
    assert copy(clean, "--to", url).returncode == 0
    before = pg_support.dump(url)
    proc = copy(site, "--to", url, "--replace")
    assert proc.returncode == 1 and "rolled back" in proc.stderr
    assert pg_support.dump(url) == before


@pytest.mark.integration
def test_a_live_serve_or_claim_refuses_the_copy(cluster, tmp_path):
    site = sqlite_site(tmp_path / "site")
    run_id = populate(site, tmp_path)
    url = store_url(cluster)
    conn = db.connect(site.cfg.db_path)
    servers.beat(conn, "serve/boot1/-/4242", servers.SERVE, "")
    proc = copy(site, "--to", url)
    assert proc.returncode == 1
    assert "writer(s) active on the source: serve/boot1/-/4242 (heartbeat" in proc.stderr
    assert tables_in(url) == []
    servers.stopped(conn, "serve/boot1/-/4242")
    claims.claim(conn, "driver/boot1/-/4243/x", [(run_id, "n001")], lease=600)
    proc = copy(site, "--to", url)
    assert proc.returncode == 1 and "1 run node(s) claimed by driver/boot1" in proc.stderr
    assert tables_in(url) == []
    conn.close()


@pytest.mark.integration
def test_a_target_in_use_or_from_a_newer_dynprov_is_refused_even_with_replace(cluster, tmp_path):
    site = sqlite_site(tmp_path / "site")
    populate(site, tmp_path)
    url = store_url(cluster)
    assert copy(site, "--to", url).returncode == 0
    pg = db.connect(url)
    servers.beat(pg, "serve/pg-boot/-/77", servers.SERVE, "")
    before = pg_support.dump(url)
    proc = copy(site, "--to", url, "--replace")
    assert proc.returncode == 1
    assert "the target is in use: serve/pg-boot/-/77 (heartbeat" in proc.stderr
    assert pg_support.dump(url) == before
    servers.stopped(pg, "serve/pg-boot/-/77")
    with db.transaction(pg):
        pg.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)",
                   (db.SCHEMA_VERSION + 1,))
    pg.close()
    before = pg_support.dump(url)
    proc = copy(site, "--to", url, "--replace")
    assert proc.returncode == 1 and "written by a newer dynprov" in proc.stderr
    assert pg_support.dump(url) == before


@pytest.mark.integration
def test_a_later_migration_is_copied_without_edits(cluster, tmp_path, monkeypatch):
    """Tables and columns come from the schema: a migration this test adds is copied too."""
    later = db.Migration(db.SCHEMA_VERSION + 1, "a later migration (test)", """
CREATE TABLE later_things (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    node   TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
    weight REAL NOT NULL
);
ALTER TABLE nodes ADD COLUMN later TEXT;
""")
    monkeypatch.setattr(db, "MIGRATIONS", (*db.MIGRATIONS, later))
    monkeypatch.setattr(db, "SCHEMA_VERSION", later.version)
    path = tmp_path / "state.db"
    conn = db.connect(path)
    with db.transaction(conn):
        conn.execute("INSERT INTO nodes(name, later) VALUES ('n001', 'x')")
        conn.executemany("INSERT INTO later_things(node, weight) VALUES (?, ?)",
                         [("n001", 0.1 * i) for i in range(1, 50)])
    conn.close()
    url = cluster.new_store()
    result = statecopy.copy(path, url)
    names = [t.name for t in result.tables]
    assert result.version == later.version and "later_things" in names
    assert names.index("nodes") < names.index("later_things")  # referenced table first
    assert rows_of(url) == rows_of(path)


# -- unit: bad input, nothing touched -------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (("--to", "mysql://u:Sw0rdf1sh-not-shown@h/d"), "--to: must be a PostgreSQL URL"),
    (("--to", "postgresql://u:Sw0rdf1sh-not-shown@h/d", "--from", "/nonexistent/x.db"),
     "--from /nonexistent/x.db: no such file"),
    ((), "--to URL: no PostgreSQL store given"),
])
def test_bad_input_is_refused_with_exit_2(tmp_path, argv, message):
    site = sqlite_site(tmp_path / "site")
    before = site.snapshot()
    proc = copy(site, *argv)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2
    assert site.snapshot() == before


@pytest.mark.unit
def test_a_file_that_is_no_state_database_is_bad_input(tmp_path):
    site = sqlite_site(tmp_path / "site")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    proc = copy(site, "--to", "postgresql:///d?host=/nonexistent", "--from", str(junk))
    assert proc.returncode == 2 and "not an SQLite state database" in proc.stderr
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    proc = copy(site, "--to", "postgresql:///d?host=/nonexistent", "--from", str(empty))
    assert proc.returncode == 2 and "not a dynprov state database" in proc.stderr


@pytest.mark.unit
def test_the_password_is_hidden_in_either_place():
    assert db.where(f"postgresql://u:{PASSWORD}@h/d?sslmode=require") == \
        "postgresql://u:***@h/d?sslmode=require"
    assert db.where(f"postgresql:///d?host=/s&password={PASSWORD}&user=u") == \
        "postgresql:///d?host=/s&password=***&user=u"
    assert db.where(f"postgresql://h/d?password={PASSWORD}") == "postgresql://h/d?password=***"


@pytest.mark.unit
def test_checksum_ignores_order_and_sees_every_bit():
    kinds = ["text", "double precision", "bigint"]
    rows = [("a", 1.5, 1), ("b", 0.1 + 0.2, None), ("a", 1.5, 1)]

    def total(rs):  # type: ignore[no-untyped-def]
        c = statecopy.Checksum(kinds)
        for r in rs:
            c.add(r)
        return c.hex

    assert total(rows) == total(list(reversed(rows)))
    assert total(rows) != total(rows[:2])  # a duplicate row counts
    assert total([("a", 1, 1)]) == total([("a", 1.0, 1)])  # a REAL column's integer value
    assert total([("b", 0.1 + 0.2, None)]) != total([("b", 0.3, None)])
    assert total([("a", 1.5, 1)]) != total([("a", 1.5, "1")])
