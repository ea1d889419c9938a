"""cluster-query's cold path: the common WIKI line formatted by SQLite must equal the line Python
builds, for every kind of node; the config scan falls back to tomllib whenever it cannot be sure."""

from __future__ import annotations

import time

import pytest

from msm_plugin import cluster_query, wiki
from pxe import config, db, hwfacts, stamp

pytestmark = pytest.mark.unit


def _mixed(conn) -> None:
    now = time.time()
    with db.transaction(conn):
        conn.execute("INSERT INTO pools(name, created) VALUES ('spare', ?)", (now,))
        for label, arch in (("centos5", "x86_64"), ("rocky9", "x86_64"), ("armos", "aarch64")):
            conn.execute("INSERT INTO images(label, arch, kernel_sha, created) VALUES (?, ?, ?, ?)",
                         (label, arch, "0" * 64, now))
        rows = [  # name, arch, pool, state, reason, current_os, used, updated
            ("a-ready", "x86_64", "hpc", "ready", "", "centos5", 0, now),
            ("b-off", "x86_64", "hpc", "off", "", "rocky9", 0, now),
            ("c-unknown", "x86_64", "hpc", "unknown", "", None, 0, 0),
            ("d-failed", "x86_64", "hpc", "failed", "disk: bad; really", "centos5", 0, now),
            ("e-booting", "x86_64", "hpc", "booting", "", None, 0, now),
            ("f-spare", "x86_64", "spare", "ready", "", "centos5", 0, now),
            ("g-used", "x86_64", "hpc", "ready", "", "centos5", 1, now),
            ("h-arm", "aarch64", "hpc", "ready", "", "armos", 0, now),
            ("i-odd-os", "x86_64", "hpc", "ready", "", "we:ird os", 0, now),
            ("j-in-run", "x86_64", "hpc", "ready", "", "centos5", 0, now),
            ("k-empty-os", "x86_64", "hpc", "ready", "", "", 0, 12.9),
        ]
        conn.executemany("INSERT INTO nodes(name, arch, pool, state, state_reason, current_os, "
                         "used, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        run_id = conn.execute("INSERT INTO runs(label, mode, created) VALUES ('rocky9', 'ondemand', ?) "
                              "RETURNING id", (now,)).fetchone()[0]
        conn.execute("INSERT INTO run_nodes(run_id, node, state, deadline, updated) "
                     "VALUES (?, 'j-in-run', 'booting', ?, ?)", (run_id, now + 600, now))


@pytest.mark.parametrize("mode", ["once", "perjob"])
def test_sql_lines_equal_python_lines(tmp_path, mode):
    conn = db.connect(tmp_path / "state.db")
    _mixed(conn)
    with db.transaction(conn):
        db.set_setting(conn, wiki.MODE_SETTING, mode)
    now = time.time()
    fast = wiki.build(conn, "hpc", now)
    reference = wiki.build(conn, "hpc", now, common_in_sql=False)
    assert fast.text == reference.text
    assert fast.until == reference.until
    lines = fast.text.splitlines()
    assert len(lines) == 11 and "a-ready STATE=Idle;OS=centos5;OSLIST=centos5,rocky9;" in lines[0]
    assert any(ln.startswith("i-odd-os ") and "we\\:ird" in ln for ln in lines)  # escaped


@pytest.mark.parametrize("keep", [("a-ready", "h-arm", "c-unknown", "k-empty-os"), ()])
def test_every_line_from_sql_equals_python_lines(tmp_path, keep):
    """The path where SQLite formats every line (the common cluster), and an empty one."""
    conn = db.connect(tmp_path / "state.db")
    _mixed(conn)
    with db.transaction(conn):
        conn.execute("DELETE FROM run_nodes")
        marks = ",".join("?" * len(keep)) or "''"
        conn.execute(f"DELETE FROM nodes WHERE name NOT IN ({marks})", keep)
    if keep:  # hardware facts: CPROC/CMEMORY on lines SQLite formatted
        hwfacts.store(conn, "a-ready", hwfacts.parse("cpus 4\nmemory_kib 16314204\n"))
    now = time.time()
    fast = wiki.build(conn, "hpc", now)
    assert fast.text == wiki.build(conn, "hpc", now, common_in_sql=False).text
    assert fast.until is None and len(fast.text.splitlines()) == len(keep)
    assert ("a-ready STATE=Idle;" in fast.text and ";CPROC=4;CMEMORY=15931\n" in fast.text) \
        == bool(keep)
    assert not conn.in_transaction


def test_odd_facts_take_the_python_path_and_match(tmp_path):
    """Facts text that is not what pxe.hwfacts stores (not JSON, a value that is not a whole
    number >= 0): SQLite leaves the line to Python, whose reading is the reference."""
    conn = db.connect(tmp_path / "state.db")
    _mixed(conn)
    odd = {"a-ready": '{"cpus": -1, "memory_mib": 8}', "c-unknown": '{"cpus": "4"}',
           "h-arm": "not json", "k-empty-os": '{"cpus": 2.5, "memory_mib": 1024}',
           "b-off": '{"cpus": 0, "memory_mib": 0}'}
    with db.transaction(conn):
        conn.executemany("INSERT INTO node_facts(node, facts, reported) VALUES (?, ?, 1)",
                         list(odd.items()))
    assert wiki._facts_in_sql(conn)
    now = time.time()
    fast = wiki.build(conn, "hpc", now)
    assert fast.text == wiki.build(conn, "hpc", now, common_in_sql=False).text
    assert "a-ready STATE=Idle;" in fast.text and ";CMEMORY=8\n" in fast.text
    conn.execute("DROP TABLE node_facts")  # a database no writer has upgraded: no resources
    assert not wiki._facts_in_sql(conn)
    assert "CPROC" not in wiki.build(conn, "hpc", now).text


def test_commit_bumps_the_stamp_and_the_key(tmp_path):
    conn = db.connect(tmp_path / "state.db")
    assert wiki.change_key(tmp_path / "state.db") == ""  # no stamp yet: never matches
    with db.transaction(conn):
        db.set_setting(conn, "x", "1")
    first = wiki.change_key(tmp_path / "state.db")
    assert first.startswith(stamp.read(tmp_path / "state.db")) and stamp.read(tmp_path / "state.db")
    with db.transaction(conn):
        db.set_setting(conn, "x", "2")
    assert wiki.change_key(tmp_path / "state.db") != first
    with pytest.raises(RuntimeError), db.transaction(conn):
        db.set_setting(conn, "x", "3")
        raise RuntimeError("rolled back")
    assert wiki.change_key(tmp_path / "state.db") != first  # unchanged by the rollback ...
    assert db.get_setting(conn, "x") == "2"


def test_config_scan_is_plain_or_gives_up(tmp_path):
    assert cluster_query.DEFAULT_POOL == config.Groups.scheduler_pool
    path = tmp_path / "c.toml"
    path.write_text('[paths]\nstate_dir = "/srv/state"\n[groups]\nscheduler_pool = "batch"\n')
    assert cluster_query._scan(str(path)) == {"state_dir": "/srv/state", "scheduler_pool": "batch",
                                              "url": ""}
    path.write_text('[paths]\nstate_dir = "/srv/state"\n# a url comment\n'
                    '[state]\nurl = "postgresql:///d"\n')
    assert cluster_query._scan(str(path))["url"] == "postgresql:///d"
    path.write_text('[paths]\nstate_dir = "/srv/state"\n')
    assert cluster_query._scan(str(path))["scheduler_pool"] == "hpc"
    for text in ('[paths]\nstate_dir = "/srv/state"\ngroups.scheduler_pool = "x"\n',
                 '[paths]\nstate_dir = "/srv/state"\n[groups]\nscheduler_pool = \'x\'\n',
                 'paths = { state_dir = "/srv/state" }\n',
                 '[paths]\nstate_dir = "/srv/s\\u0074ate"\n',
                 '[paths]\nstate_dir = "relative"\n',
                 '[paths]\nstate_dir = "/srv/state"\nstate.url = "postgresql:///d"\n'):
        path.write_text(text)
        assert cluster_query._scan(str(path)) is None, text
