"""The toolkit's entry point (pxe/provision.py), `pxe-stage run` against virtual IPMI BMCs on
127.0.0.1, the state-change hook the Moab face subscribes to, and a driver killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from moab_standin import parse_wiki
from test_power_support import add_nodes
from test_run_support import (
    add_images,
    cluster,
    configure,
    driver_held,
    node_row,
    run_nodes,
    wait_for,
)

from msm_plugin import wiki
from pxe import db, hooks, provision, run
from pxe.reports import record_report
from tests.conftest import ROOT, Site


def _json(proc) -> object:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _reap(pid: int, limit: float = 30.0) -> None:
    """Kill a driver this test started (by its PID) and reap it."""
    os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + limit
    while time.monotonic() < end:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return
        time.sleep(0.05)
    raise AssertionError(f"driver {pid} did not die")


# -- the CLI -----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_run_cli_start_wait_list_show(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 2) as c:
        out = _json(site.run("run", "start", "n[001-002]", "--os", "centos5", "--wait", "--json"))
        assert out["started"] == ["n001", "n002"] and out["refused"] == []
        assert {n: r["state"] for n, r in out["results"].items()} == \
            {"n001": "ready", "n002": "ready"}
        run_id = out["run_id"]
        for name in c.names:  # --wait returned after the driver's follow-up too
            assert node_row(c.cfg, name)["boot_target"] == "local"
        listed = _json(site.run("run", "list", "--json"))
        assert [(r["id"], r["label"], r["state"], r["done"], r["total"]) for r in listed] == \
            [(run_id, "centos5", "done", 2, 2)]
        shown = _json(site.run("run", "show", str(run_id), "--json"))
        n1 = next(n for n in shown["nodes"] if n["node"] == "n001")
        kinds = [s["kind"] for s in n1["steps"]]
        assert kinds[0] == "run-requested" and {"run-power-cycled", "report-booting",
                                                "report-ready"} <= set(kinds)
        times = [s["ts"] for s in n1["steps"]]
        assert times == sorted(times) and times[0] >= shown["created"]
        text = site.run("run", "show", str(run_id))
        assert text.returncode == 0 and "report-ready" in text.stdout and "n002:" in text.stdout
        # the same request again: nodes already running it, no new run
        again = _json(site.run("run", "start", "n001", "--os", "centos5", "--json"))
        assert again["current"] == ["n001"] and again["run_id"] is None


@pytest.mark.integration
def test_run_cli_cancel_by_nodes_and_by_run(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 3, behaviours={f"n00{i}": "silent" for i in (1, 2, 3)}) as c:
        first = _json(site.run("run", "start", "n[001-002]", "--os", "centos5", "--json"))
        second = _json(site.run("run", "start", "n003", "--os", "sles11", "--json"))
        wait_for(lambda: all(r["state"] == "power-cycled" for r in run_nodes(c.cfg)))
        assert _json(site.run("run", "cancel", "n002", "--json")) == {"cancelled": ["n002"]}
        assert _json(site.run("run", "cancel", str(second["run_id"]), "--json")) == \
            {"cancelled": ["n003"]}
        active = _json(site.run("run", "list", "--active", "--json"))
        assert [(r["id"], r["steps"]) for r in active] == \
            [(first["run_id"], {"cancelled": 1, "power-cycled": 1})]
        proc = site.run("run", "cancel", str(first["run_id"]))
        assert proc.returncode == 0 and "n001" in proc.stdout
        waited = site.run("run", "wait", "n[001-003]", "--json")
        assert waited.returncode == 1  # none ended ready
        assert {n: r["state"] for n, r in json.loads(waited.stdout).items()} == \
            {"n001": "cancelled", "n002": "cancelled", "n003": "cancelled"}
        for name in c.names:
            assert node_row(c.cfg, name)["boot_target"] == "local"


@pytest.mark.integration
def test_run_cli_bad_input_changes_nothing(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 1):
        before = site.snapshot()
        for argv, code, words in [
            (("run", "start", "n001", "--os", "bad label!"), 2, "OS label"),
            (("run", "start", "n[001", "--os", "centos5"), 2, "n[001"),
            (("run", "start", "n001", "--os", "centos5", "--max-seconds", "-5"), 2,
             "--max-seconds"),
            (("run", "show", "abc"), 2, "invalid run id"),
            (("run", "show", "9999999999999"), 2, "invalid run id"),
            (("run", "show", "999"), 1, "unknown run 999"),
            (("run", "list", "--limit", "0"), 2, "--limit"),
        ]:
            proc = site.run(*argv)
            assert proc.returncode == code, (argv, proc.stderr)
            assert words in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        refused = site.run("run", "start", "n404", "--os", "centos5")
        assert refused.returncode == 1 and "n404: unknown node" in refused.stderr
        after = site.snapshot()
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert changed == set(), changed


@pytest.mark.unit
def test_started_summary_and_refusals_lines() -> None:
    started = provision.Started(label="centos5", run_id=7, started=["n001", "n002", "n003"],
                                joined={"n010": 3, "n004": 5, "n011": 3}, current=["n020"],
                                refused=[("n404", "unknown node"),
                                         ("n030", "in provisioning run 3 for sles11")])
    assert started.summary() == ["n[001-003]: provisioning centos5 (run 7)",
                                 "n[010-011]: already provisioning centos5 (run 3)",
                                 "n004: already provisioning centos5 (run 5)",
                                 "n020: already running centos5"]
    assert started.refusals() == ["n404: unknown node",
                                  "n030: in provisioning run 3 for sles11"]
    assert provision.Started(label="x").summary() == []


@pytest.mark.integration
def test_os_switch_and_run_start_print_the_same_summary(site: Site, tmp_path: Path) -> None:
    """Both faces print Started.summary(); only the stderr prefix differs (Moab's is bare)."""
    cfg = configure(site)
    add_images(cfg, tmp_path, centos5={})
    add_nodes(cfg, [{"name": f"n{i:03d}", "mac": f"52:54:00:31:00:{i:02x}"} for i in (1, 2, 3)])
    conn = db.connect(cfg.database)
    run.set_mode(conn, "ondemand")
    with db.transaction(conn):  # n003 already runs centos5, healthy
        conn.execute("UPDATE nodes SET current_os = ?, state = ? WHERE name = ?",
                     ("centos5", "running", "n003"))
    conn.close()
    with driver_held(cfg):
        first = site.run("run", "start", "n001", "--os", "centos5")
        assert (first.returncode, first.stdout) == (0, "n001: provisioning centos5 (run 1)\n")
        moab = site.run("n[001-003],n404", "--set", "OS=centos5", cmd="os-switch")
        assert (moab.returncode, moab.stderr) == (1, "n404: unknown node\n")
        assert moab.stdout == ("n002: provisioning centos5 (run 2)\n"
                               "n001: already provisioning centos5 (run 1)\n"
                               "n003: already running centos5\n")
        admin = site.run("run", "start", "n[001-003],n404", "--os", "centos5")
        assert (admin.returncode, admin.stderr) == (1, "pxe-stage: n404: unknown node\n")
        assert admin.stdout == ("n001: already provisioning centos5 (run 1)\n"
                                "n002: already provisioning centos5 (run 2)\n"
                                "n003: already running centos5\n")


def _changes(cfg) -> list:
    path = cfg.paths.state_dir / "changes.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# -- the hook ------------------------------------------------------------------------------------------
def _hooks(site: Site, body: str) -> None:
    """Replace the site's [hooks] section (conftest's make_site writes one, last)."""
    text = site.config_path.read_text().split("\n[hooks]\n")[0]
    site.config_path.write_text(f"{text}\n[hooks]\n{body}\n")


def record_event(cfg, event) -> None:  # a subscriber, named in the site config below
    with open(cfg.paths.state_dir / "seen.jsonl", "a") as fh:
        fh.write(json.dumps([event.kind, list(event.nodes)]) + "\n")


def broken(cfg, event) -> None:
    raise RuntimeError("face exploded")


@pytest.mark.unit
def test_hooks_call_subscribers_from_config_and_survive_failures(site: Site) -> None:
    _hooks(site, 'entry_points = false\nsubscribers = ["tests.test_provision:broken", '
                 '"tests.test_provision:record_event"]')
    cfg = site.cfg
    cfg.paths.state_dir.mkdir(parents=True, exist_ok=True)
    assert hooks.targets(cfg) == ["tests.test_provision:broken",
                                  "tests.test_provision:record_event"]
    failed = hooks.announce(cfg, hooks.Event(hooks.POOLS, ("n001",)))
    assert failed == ["tests.test_provision:broken"]
    seen = (cfg.paths.state_dir / "seen.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in seen] == [["pools", ["n001"]]]


@pytest.mark.unit
def test_the_moab_face_subscribes_by_entry_point() -> None:
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    target = eps[hooks.GROUP]["moab"]
    assert target == "msm_plugin.wiki:on_event" and callable(hooks.resolve(target))


@pytest.mark.unit
def test_hooks_config_is_checked(site: Site) -> None:
    from pxe.errors import InputError

    _hooks(site, 'subscribers = ["rm -rf /"]')
    with pytest.raises(InputError, match="hooks.subscribers"):
        hooks.targets(site.cfg)


# -- a driver killed mid-run ------------------------------------------------------------------------
@pytest.mark.integration
def test_driver_killed_mid_run_next_driver_reconciles(site: Site, tmp_path: Path) -> None:
    """Kill the driver (SIGKILL, by PID) while two nodes are power-cycled. Meanwhile n001
    reports ready (recorded only: its next boot stays the network) and n002's deadline passes
    with nobody to record it. The next driver ends both in a defined state."""
    with cluster(site, tmp_path, 2, behaviours={"n001": "silent", "n002": "silent"},
                 images={"centos5": {"prov_seconds": 600}, "sles11": {"prov_seconds": 30}}) as c:
        conn = db.connect(c.cfg.database)
        a = provision.start(c.cfg, "n001", "centos5", conn=conn)
        b = provision.start(c.cfg, "n002", "sles11", conn=conn)
        spawned = {p for p in (a.driver_pid, b.driver_pid) if p is not None}
        wait_for(lambda: [r["state"] for r in run_nodes(c.cfg)] == ["power-cycled"] * 2)
        lock = c.cfg.paths.state_dir / "run-driver.lock"
        pid = int(lock.read_text().split()[0])  # the driver that holds the lock marks it
        assert pid in spawned
        for other in spawned - {pid}:  # lost the race for the lock and exited by itself
            os.waitpid(other, 0)
        _reap(pid)
        assert not run.driver_running(c.cfg)
        token = node_row(c.cfg, "n001")["boot_token"]
        record_report(conn, "n001", token, "ready")  # what the call-home server records
        assert node_row(c.cfg, "n001")["boot_target"] == "os"  # nobody acted
        # n002's deadline passes while no driver runs (moved into the past: no waiting here)
        conn.execute("UPDATE run_nodes SET deadline = ? WHERE node = 'n002'", (time.time() - 1,))
        assert [r["state"] for r in run_nodes(c.cfg)] == ["ready", "power-cycled"]
        assert node_row(c.cfg, "n002")["boot_target"] == "os"

        new = run.spawn_driver(c.cfg)
        assert new is not None and new != pid
        wait_for(lambda: not run.driver_running(c.cfg))
        os.waitpid(new, 0)
        rows = {r["node"]: r for r in run_nodes(c.cfg)}
        assert rows["n001"]["state"] == "ready"
        assert rows["n002"]["state"] == "timed out" and "no report within" in rows["n002"]["reason"]
        for name in c.names:
            assert node_row(c.cfg, name)["boot_target"] == "local"
            assert "LOCALBOOT" in c.sim.boot_file(c.node(name))
        assert node_row(c.cfg, "n002")["state"] == "timed out"
        assert node_row(c.cfg, "n002")["boot_token"]  # a late "ready" is still believed
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE finished IS NULL").fetchone()[0] == 0
        reconciled = {r[0] for r in conn.execute(
            "SELECT node FROM events WHERE kind = 'run-reconciled'")}
        assert reconciled == {"n001", "n002"}
        view = parse_wiki((c.cfg.paths.state_dir / wiki.REPORT_NAME).read_text())
        assert view["n002"]["STATE"] == "Down" and "timed out" in view["n002"]["MESSAGE"]
        assert (view["n001"]["STATE"], view["n001"]["OS"]) == ("Idle", "centos5")
        conn.close()


@pytest.mark.unit
def test_start_refuses_bad_input_before_storing(site: Site) -> None:
    from pxe.errors import InputError

    cfg = configure(site)
    before = site.snapshot()
    for nodes, label in [("", "centos5"), ([], "centos5"), (["n 1"], "centos5"),
                         ("n001", "../x")]:
        with pytest.raises(InputError):
            provision.start(cfg, nodes, label)
    assert site.snapshot() == before


@pytest.mark.integration
def test_driver_announces_content_changes_not_heartbeats(site: Site, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """While a run waits on a silent node, the driver beats every loop (bookkeeping): the faces
    (Moab's report file) hear nothing new from it; a content change is announced."""
    _hooks(site, 'subscribers = ["tests.hook_recorder:record_events"]')
    with open(site.config_path, "a") as fh:  # a beat every driver loop
        fh.write("\n[segment]\nheartbeat_seconds = 0.2\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(  # the driver imports the recorder
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    with cluster(site, tmp_path, 1, behaviours={"n001": "silent"},
                 images={"centos5": {"prov_seconds": 600}}) as c:
        conn = db.connect(c.cfg.database)
        log = c.cfg.paths.state_dir / "events.jsonl"

        def announced() -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

        def beats(count: int) -> None:
            """Wait (bounded) until the driver recorded ``count`` more heartbeats."""
            seen: set[float] = set()

            def more() -> bool:
                row = conn.execute("SELECT heartbeat FROM servers WHERE role = 'driver' "
                                   "AND stopped IS NULL").fetchone()
                seen.add(row[0] if row else 0.0)
                return len(seen) > count

            wait_for(more, 120)

        provision.start(c.cfg, "n001", "centos5", conn=conn)
        wait_for(lambda: [r["state"] for r in run_nodes(c.cfg)] == ["power-cycled"])
        beats(2)  # a whole loop after the power cycle: its announcement is out
        settled = announced()
        assert any('"power-cycled"' in line for line in settled), settled
        beats(5)
        assert announced() == settled  # five beats, leases renewed: nothing to announce
        run.set_mode(conn, "perjob")  # a content change (another process's commit)
        wait_for(lambda: len(announced()) > len(settled), 60)
        conn.close()


@pytest.mark.integration
def test_reconcile_boot_reset_fails_node_down_with_reason(site: Site, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A node reported ready while no driver ran, but its boot file cannot be rewritten (a
    directory stands where it goes - a site whose tftpd-hpa serves written files, [boot]
    write_files): the next driver cannot send it back to the disk, so the node is failed (Down,
    for the scheduler) with the reason, and the hook's event says so."""
    _hooks(site, 'subscribers = ["msm_plugin.wiki:on_event", '
                 '"tests.hook_recorder:record_changes"]')
    # The drivers this test starts are processes: they import the recorder from the checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    text = site.config_path.read_text()
    site.config_path.write_text(text.replace("[boot]\n", "[boot]\nwrite_files = true\n", 1)
                                if "[boot]\n" in text else
                                text.replace("\n[hooks]\n", "\n[boot]\nwrite_files = true\n\n[hooks]\n", 1))
    with cluster(site, tmp_path, 1, behaviours={"n001": "silent"},
                 images={"centos5": {"prov_seconds": 600}}) as c:
        conn = db.connect(c.cfg.database)
        a = provision.start(c.cfg, "n001", "centos5", conn=conn)
        wait_for(lambda: [r["state"] for r in run_nodes(c.cfg)] == ["power-cycled"])
        lock = c.cfg.paths.state_dir / "run-driver.lock"
        pid = int(lock.read_text().split()[0])
        assert pid == a.driver_pid
        _reap(pid)
        record_report(conn, "n001", node_row(c.cfg, "n001")["boot_token"], "ready")
        mac = c.node("n001").mac
        blocker = Path(c.cfg.paths.tftp_root) / "pxelinux.cfg" / ("01-" + mac.replace(":", "-"))
        blocker.unlink()
        blocker.mkdir()
        (blocker / "keep").write_text("x")  # a rename onto a non-empty directory fails

        new = run.spawn_driver(c.cfg)
        assert new is not None
        wait_for(lambda: node_row(c.cfg, "n001")["state"] == "failed")
        row = node_row(c.cfg, "n001")
        assert "cannot reset it to the disk" in row["state_reason"], row["state_reason"]
        assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'set-boot-failed' "
                            "AND node = 'n001'").fetchone()[0] >= 1
        # the hook's event carries the change (what the Slurm face turns into DOWN); the Moab
        # face, called before it, shows the node Down
        wait_for(lambda: any(n == "n001" and s == "failed" and "cannot reset" in r
                             for n, s, r in _changes(c.cfg)))
        view = parse_wiki((c.cfg.paths.state_dir / wiki.REPORT_NAME).read_text())
        assert view["n001"]["STATE"] == "Down" and "cannot reset" in view["n001"]["MESSAGE"]
        blocker.joinpath("keep").unlink()
        blocker.rmdir()
        wait_for(lambda: not run.driver_running(c.cfg), 60)
        if new is not None:
            os.waitpid(new, 0)
        conn.close()
