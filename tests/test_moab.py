"""The Moab face as Moab uses it: os-switch, cluster-query, node-power and fg-moab as real
processes, and end to end through the Moab stand-in (tests/moab_standin.py, a test double of the
commercial Moab) with virtual IPMI BMCs and simulated nodes calling home.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pg_support
import pytest
from moab_standin import MoabStandIn, parse_wiki
from test_power_support import add_nodes
from test_run_support import (
    add_images,
    argv,
    cluster,
    configure,
    driver_held,
    node_row,
    run_nodes,
    stop_runs,
    wait_for,
)

from msm_plugin import wiki
from pxe import db, run
from pxe.config import Config
from tests.conftest import Site

HEAVY = ("jinja2", "netaddr", "pyghmi", "ClusterShell", "cryptography")


def _plain_site(site: Site, tmp_path: Path, count: int = 4) -> Config:
    cfg = configure(site, moab={"tools_dir": str(tmp_path / "bin")})
    add_images(cfg, tmp_path, centos5={}, sles11={}, armos={"arch": "aarch64"})
    add_nodes(cfg, [{"name": f"n{i:03d}", "mac": f"52:54:00:30:00:{i:02x}"}
                    for i in range(1, count + 1)])
    return cfg


def _moab(c, **kw) -> MoabStandIn:  # type: ignore[no-untyped-def]
    commands = {name: argv(name) for name in ("os-switch", "cluster-query", "node-power")}
    return MoabStandIn(commands, c.env, c.torque, cwd=c.site.root, **kw)


# -- os-switch: the checks in Moab's blocking call ---------------------------------------------------
@pytest.mark.integration
def test_os_switch_bad_input(site: Site, tmp_path: Path) -> None:
    cfg = _plain_site(site, tmp_path)
    with driver_held(cfg):
        cases = {
            ("n001", "--set", "OS=nosuch"): (1, "n001: unknown OS label 'nosuch'"),
            ("n009", "--set", "OS=centos5"): (1, "n009: unknown node"),
            ("n001", "--set", "OS=armos"): (1, "n001: OS armos is not in this node's OSLIST"),
            ("n001", "--set", "OS"): (2, "malformed --set 'OS'"),
            ("n001", "--set", "FOO=bar"): (2, "unknown attribute FOO"),
            ("n001", "--set", "OS=../etc"): (2, "invalid OS label"),
            ("n001", "--set", "POWER=maybe"): (2, "POWER must be on or off"),
            ("", "--set", "OS=centos5"): (2, "empty node list"),
            ("n[001",  "--set", "OS=centos5"): (2, "invalid node set"),
            ("n001",): (2, "give exactly one"),
            ("n001", "--clear", "ARCH"): (2, "only OS can be cleared"),
        }
        for args, (code, message) in cases.items():
            proc = site.run(*args, cmd="os-switch")
            assert proc.returncode == code, (args, proc.stderr)
            assert message in proc.stderr, (args, proc.stderr)
            assert proc.returncode != 4
        assert run_nodes(cfg) == []  # nothing started


@pytest.mark.integration
def test_os_switch_partial_then_resend(site: Site, tmp_path: Path) -> None:
    """One bad node in an aggregated call: the others start; Moab's re-send is accepted."""
    cfg = _plain_site(site, tmp_path)
    with driver_held(cfg):
        proc = site.run("n001,n002,n404", "--set", "OS=centos5", cmd="os-switch")
        assert proc.returncode == 1 and proc.stderr == "n404: unknown node\n"
        assert "n[001-002]: provisioning centos5 (run 1)" in proc.stdout
        again = site.run("n001,n002", "--set", "os=centos5", cmd="os-switch")
        assert again.returncode == 0 and again.stderr == ""
        assert "already provisioning centos5 (run 1)" in again.stdout
        other = site.run("n002", "--set", "OS=sles11", cmd="os-switch")
        assert other.returncode == 1
        assert "n002: in provisioning run 1 for centos5" in other.stderr
        assert len(run_nodes(cfg)) == 2
        cleared = site.run("n[001-002]", "--clear", "OS", cmd="os-switch")
        assert cleared.returncode == 0 and "cancelled" in cleared.stdout
        assert {r["state"] for r in run_nodes(cfg)} == {"cancelled"}


@pytest.mark.integration
@pytest.mark.parametrize("labels", [("centos5", "centos5"), ("centos5", "sles11")])
def test_two_os_switch_calls_on_overlapping_nodes_at_once(site: Site, tmp_path: Path,
                                                          labels: tuple[str, str]) -> None:
    cfg = _plain_site(site, tmp_path, count=6)
    env = {"DYNPROV_CONFIG": str(site.config_path), "PATH": "/usr/bin:/bin"}
    with driver_held(cfg):
        procs = [subprocess.Popen([*argv("os-switch"), nodes, "--set", f"OS={label}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env)
                 for nodes, label in (("n[001-004]", labels[0]), ("n[003-006]", labels[1]))]
        outs = [p.communicate(timeout=120) for p in procs]
        codes = [p.returncode for p in procs]
        rows = run_nodes(cfg)
    # every node is in exactly one run; never two runs for one node
    assert sorted(r["node"] for r in rows) == [f"n{i:03d}" for i in range(1, 7)]
    if labels[0] == labels[1]:
        assert codes == [0, 0], outs  # the overlap joined the first run
    else:
        assert sorted(codes) == [0, 1], outs
        loser = codes.index(1)
        assert outs[loser][1].count("in provisioning run") == 2  # n003, n004
        winner_label = labels[1 - loser]
        assert {r["label"] for r in rows if r["node"] in ("n003", "n004")} == {winner_label}
    stop_runs(cfg)


# -- cluster-query ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cluster_query_imports_nothing_heavy(site: Site, tmp_path: Path) -> None:
    cfg = _plain_site(site, tmp_path)
    env = {"DYNPROV_CONFIG": str(site.config_path), "PATH": "/usr/bin:/bin"}
    for attempt in ("rebuild", "cached"):
        if attempt == "rebuild":
            run.set_mode(db.connect(cfg.database), "perjob")  # a commit: the report is stale
        proc = subprocess.run([sys.executable, "-X", "importtime", *argv("cluster-query")[1:]],
                              capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0
        imported = {ln.split("|")[-1].strip().split(".")[0] for ln in proc.stderr.splitlines()
                    if ln.startswith("import time:")}
        assert not imported & set(HEAVY), (attempt, imported & set(HEAVY))
        assert set(parse_wiki(proc.stdout)) == {"n001", "n002", "n003", "n004"}


@pytest.mark.integration
def test_cluster_query_always_exits_0(site: Site, tmp_path: Path) -> None:
    proc = site.run(cmd="cluster-query")  # no state database yet
    assert proc.returncode == 0 and parse_wiki(proc.stdout) == {}
    assert proc.stdout.startswith("# cluster-query: state database unreadable")
    cfg = _plain_site(site, tmp_path)
    assert set(parse_wiki(site.run(cmd="cluster-query").stdout)) == {f"n00{i}" for i in range(1, 5)}
    # the database becomes unreadable: the last report's nodes, as Unknown with the reason
    if cfg.state.url:  # PostgreSQL: the database is dropped
        pg_support.shared().drop_store(cfg.state.url)
    else:
        cfg.db_path.rename(cfg.db_path.with_suffix(".gone"))
        for suffix in ("-wal", "-shm"):
            Path(str(cfg.db_path) + suffix).unlink(missing_ok=True)
    proc = site.run(cmd="cluster-query")
    assert proc.returncode == 0
    view = parse_wiki(proc.stdout)
    assert set(view) == {f"n00{i}" for i in range(1, 5)}
    assert {v["STATE"] for v in view.values()} == {"Unknown"}
    assert "state database unreadable" in view["n001"]["MESSAGE"]
    # a broken configuration: still exit 0, a comment Moab ignores
    env_proc = subprocess.run(argv("cluster-query"), capture_output=True, text=True,
                              env={"DYNPROV_CONFIG": str(tmp_path / "missing.toml")}, timeout=60)
    assert env_proc.returncode == 0 and env_proc.stdout.startswith("# cluster-query:")


@pytest.mark.integration
def test_cluster_query_while_the_database_is_written(site: Site, tmp_path: Path) -> None:
    """Each answer is one consistent snapshot: a writer flips every node in one transaction."""
    cfg = _plain_site(site, tmp_path, count=200)
    stop = threading.Event()
    generations: list[int] = []

    def writer() -> None:
        conn = db.connect(cfg.database)
        for gen in range(1, 100_000):  # bounded
            if stop.is_set():
                break
            with db.transaction(conn):
                conn.execute("UPDATE nodes SET state = 'failed', state_reason = ?",
                             (f"generation {gen}",))
            generations.append(gen)
        conn.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(generations) > 3)
        seen = set()
        for _ in range(15):
            proc = site.run(cmd="cluster-query")
            assert proc.returncode == 0, proc.stderr
            view = parse_wiki(proc.stdout)
            assert len(view) == 200
            messages = {v["MESSAGE"] for v in view.values()}
            assert len(messages) == 1, messages  # never a mix of two generations
            seen |= messages
    finally:
        stop.set()
        thread.join(30)
    assert len(seen) > 1  # it really ran while the writer wrote


@pytest.mark.integration
def test_cluster_query_cache_follows_every_commit(site: Site, tmp_path: Path) -> None:
    cfg = _plain_site(site, tmp_path)
    conn = db.connect(cfg.database)  # an open connection keeps the WAL, as the daemons do
    first = site.run(cmd="cluster-query").stdout
    assert site.run(cmd="cluster-query").stdout == first  # served from the report file
    for i in range(5):
        with db.transaction(conn):  # every writer's COMMIT bumps the change stamp
            conn.execute("UPDATE nodes SET state = 'failed', state_reason = ? "
                         "WHERE name = 'n002'", (f"change {i}",))
        assert parse_wiki(site.run(cmd="cluster-query").stdout)["n002"]["MESSAGE"] == \
            f"change {i}"
    # a new image is in OSLIST at the next poll
    add_images(cfg, tmp_path, rocky9={})
    assert "rocky9" in parse_wiki(site.run(cmd="cluster-query").stdout)["n001"]["OSLIST"]
    # --refresh rewrites the file:// report and prints nothing
    with db.transaction(conn):
        conn.execute("UPDATE nodes SET state = 'off' WHERE name = 'n003'")
    proc = site.run("--refresh", cmd="cluster-query")
    assert proc.returncode == 0 and proc.stdout == ""
    report = cfg.paths.state_dir / wiki.REPORT_NAME
    assert parse_wiki(report.read_text())["n003"]["POWER"] == "Off"


# -- node-power --------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_node_power(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 3, dead=["n003"]) as c:
        ok = site.run("n001,n002", "OFF", cmd="node-power")
        assert ok.returncode == 0 and "ERROR" not in ok.stdout
        assert node_row(c.cfg, "n001")["state"] == "off"
        assert parse_wiki(site.run(cmd="cluster-query").stdout)["n001"]["POWER"] == "Off"
        bad = site.run("n002,n003", "on", cmd="node-power")
        assert bad.returncode == 1
        assert "ERROR: n003: power on failed" in bad.stdout and "ERROR: n002" not in bad.stdout
        assert node_row(c.cfg, "n002")["state"] == "unknown"  # on, no OS known yet
        # Moab's mangled reboot: the node list twice, no verb; and REBOOT/RESET
        for verb in ("n[001-002]", "REBOOT", "reset"):
            proc = site.run("n001,n002", verb, cmd="node-power")
            assert proc.returncode == 0 and "power cycle done" in proc.stdout, proc.stdout
        for args, message in ((("n001", "sideways"), "ERROR: node-power: unknown power verb"),
                              (("n404", "ON"), "ERROR: n404: unknown node"),
                              (("n001",), "ERROR: node-power: bad usage")):
            proc = site.run(*args, cmd="node-power")
            assert proc.returncode != 0 and message in proc.stdout, proc.stdout
        # a node in a provisioning run is not powered behind the run's back
        with driver_held(c.cfg):
            site.run("n001", "--set", "OS=centos5", cmd="os-switch", check=True)
            proc = site.run("n001", "OFF", cmd="node-power")
            assert "ERROR: n001: in provisioning run" in proc.stdout


# -- fg-moab ----------------------------------------------------------------------------------------------
def _tools(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("os-switch", "cluster-query", "node-power"):
        tool = bin_dir / name
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    return bin_dir


@pytest.mark.integration
def test_fg_moab_mode(site: Site, tmp_path: Path) -> None:
    _plain_site(site, tmp_path)
    assert site.run("-mode", cmd="fg-moab", check=True).stdout == "ondemand\n"
    assert "mode perjob" in site.run("-mode", "perjob", cmd="fg-moab", check=True).stdout
    assert site.run("-mode", cmd="fg-moab").stdout == "perjob\n"
    bad = site.run("-mode", "sometimes", cmd="fg-moab")
    assert bad.returncode == 2 and "expected perjob or ondemand" in bad.stderr
    assert site.run("--mode", cmd="fg-moab").stdout == "perjob\n"


@pytest.mark.integration
def test_fg_moab_config_lines(site: Site, tmp_path: Path) -> None:
    cfg = _plain_site(site, tmp_path)
    bin_dir = _tools(tmp_path)
    conn = db.connect(cfg.database)
    conn.execute("INSERT INTO pools(name, created) VALUES ('cloud', 0)")
    conn.execute("UPDATE nodes SET pool = 'cloud' WHERE name = 'n004'")
    out = site.run("-config", cmd="fg-moab", check=True).stdout.splitlines()
    assert "RMCFG[prov] TYPE=NATIVE RESOURCETYPE=PROV" in out
    assert f"RMCFG[prov] NODEMODIFYURL=exec://{bin_dir}/os-switch" in out
    assert f"RMCFG[prov] CLUSTERQUERYURL=exec://{bin_dir}/cluster-query" in out
    assert f"RMCFG[prov] NODEPOWERURL=exec://{bin_dir}/node-power" in out
    assert f"RMCFG[prov] ENV=DYNPROV_CONFIG={site.config_path.resolve()}" in out
    assert "RMCFG[prov] TIMEOUT=30" in out and "RMCFG[prov] PROVDURATION=10:00" in out
    assert {"QOSCFG[prov] QFLAGS=PROVISION", "USERCFG[DEFAULT] QLIST=prov",
            "AGGREGATENODEACTIONS TRUE", "RMCFG[prov] FLAGS=noCreateResource"} <= set(out)
    assert "NODECFG[n001] OSLIST=centos5,sles11" in out
    assert not any(ln.startswith("NODECFG[n004]") for ln in out)  # not the scheduler's pool
    assert f"# RMCFG[prov] CLUSTERQUERYURL=file://{cfg.paths.state_dir}/wiki/nodes.wiki" in out


@pytest.mark.integration
def test_fg_moab_install_is_idempotent_and_touches_nothing_else(site: Site,
                                                                tmp_path: Path) -> None:
    _plain_site(site, tmp_path)
    _tools(tmp_path)
    moab_cfg = tmp_path / "moab.cfg"
    original = ("SCHEDCFG[Moab] SERVER=head:42559\nRMCFG[torque] TYPE=PBS\n"
                "# a comment the admin wrote\nNODEALLOCATIONPOLICY PRIORITY")  # no final newline
    moab_cfg.write_text(original)
    moab_cfg.chmod(0o640)
    first = site.run("-install", str(moab_cfg), cmd="fg-moab", check=True)
    assert "dynprov block written" in first.stdout
    text = moab_cfg.read_text()
    assert text.startswith(original + "\n# BEGIN dynprov")
    assert text.endswith("# END dynprov\n") and "RMCFG[prov] TYPE=NATIVE" in text
    assert moab_cfg.stat().st_mode & 0o777 == 0o640
    backups = list(tmp_path.glob("moab.cfg.dynprov-*.bak"))
    assert [b.read_text() for b in backups] == [original]
    second = site.run("-install", str(moab_cfg), cmd="fg-moab", check=True)
    assert "already up to date" in second.stdout
    assert moab_cfg.read_text() == text and len(list(tmp_path.glob("*.bak"))) == 1
    # a change inside the block is replaced; lines after the block are kept as they are
    moab_cfg.write_text(text.replace("TIMEOUT=30", "TIMEOUT=99") + "RMCFG[prov] TIMEOUT=5\n")
    third = site.run("-install", str(moab_cfg), cmd="fg-moab", check=True)
    assert moab_cfg.read_text() == text + "RMCFG[prov] TIMEOUT=5\n"
    assert "also set outside the dynprov block" in third.stderr
    # damaged markers: refused, nothing written
    broken = text.replace("# END dynprov\n", "")
    moab_cfg.write_text(broken)
    proc = site.run("-install", str(moab_cfg), cmd="fg-moab")
    assert proc.returncode == 1 and "markers are damaged" in proc.stderr
    assert moab_cfg.read_text() == broken
    assert site.run("-install", str(tmp_path / "nope.cfg"), cmd="fg-moab").returncode == 1


# -- end to end through the Moab stand-in -------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("aggregate", [False, True])
def test_ondemand_end_to_end(site: Site, tmp_path: Path, aggregate: bool) -> None:
    with cluster(site, tmp_path, 3) as c:
        moab = _moab(c, aggregate=aggregate)
        moab.query()
        for i in (1, 2):
            moab.submit(f"{i}.head", "centos5")
        moab.run_until(lambda: all(j.state == "running" for j in moab.jobs.values()))
        switches = [call for call in moab.calls if "--set" in call.argv]
        if aggregate:
            assert [call.argv[-3] for call in switches] == ["n001,n002"]
        else:
            assert [call.argv[-3] for call in switches] == ["n001", "n002"]
        assert all(call.returncode == 0 and call.stderr == "" for call in switches)
        view = moab.view
        assert view["n001"]["OS"] == view["n002"]["OS"] == "centos5"
        # on demand: the next centos5 job reuses a node without re-imaging it
        moab.end_job("1.head")
        moab.submit("3.head", "centos5")
        moab.run_until(lambda: moab.jobs["3.head"].state == "running")
        assert len([call for call in moab.calls if "--set" in call.argv]) == len(switches)
        assert c.node(moab.jobs["3.head"].node or "").boots == ["image:centos5"]


@pytest.mark.integration
def test_provisioning_completes_only_with_torque_up(site: Site, tmp_path: Path) -> None:
    """Moab's second signal: OS= matches, but pbs_mom is not up yet -> the job waits."""
    with cluster(site, tmp_path, 1) as c:
        moab = _moab(c)
        moab.query()
        moab.submit("1.head", "centos5")
        moab.iterate()
        wait_for(lambda: node_row(c.cfg, "n001")["state"] == "ready" and c.torque.is_up("n001"))
        c.torque.set_up("n001", False)  # the OS is up, pbs_mom is not
        for _ in range(3):
            moab.iterate()
        assert moab.view["n001"]["OS"] == "centos5"
        assert moab.jobs["1.head"].state == "provisioning"
        c.torque.set_up("n001", True)
        moab.iterate()
        assert moab.jobs["1.head"].state == "running"


@pytest.mark.integration
def test_perjob_end_to_end(site: Site, tmp_path: Path) -> None:
    """Per-job mode: a node that ran a job is re-imaged before the next job that asks for an OS."""
    with cluster(site, tmp_path, 2) as c:
        site.run("-mode", "perjob", cmd="fg-moab", check=True)
        moab = _moab(c)
        moab.query()
        moab.submit("1.head", "centos5")
        moab.run_until(lambda: moab.jobs["1.head"].state == "running")
        node = moab.jobs["1.head"].node or ""
        assert c.node(node).boots == ["image:centos5"]
        moab.end_job("1.head")  # TORQUE runs our epilogue -> fg-moab -used
        assert [p.returncode for p in c.torque.epilogue_runs] == [0]
        assert node_row(c.cfg, node)["used"] == 1
        view = moab.query()
        assert view[node]["OS"] == "_used-centos5"  # matches no request any more
        moab.submit("2.head", "centos5")
        moab.run_until(lambda: moab.jobs["2.head"].state == "running")
        second = moab.jobs["2.head"].node or ""
        # the job never ran on a used node: either the other fresh one was imaged for it,
        # or the same node was re-imaged first
        assert c.node(second).boots[-1] == "image:centos5"
        assert node_row(c.cfg, second)["used"] == 0
        assert len([call for call in moab.calls if "--set" in call.argv]) == 2
        # and a third job on the first node means a third image
        moab.end_job("2.head")
        moab.submit("3.head", "centos5")
        moab.run_until(lambda: moab.jobs["3.head"].state == "running")
        assert len([call for call in moab.calls if "--set" in call.argv]) == 3


@pytest.mark.integration
def test_failed_and_timed_out_nodes_reach_moab_before_provduration(site: Site,
                                                                   tmp_path: Path) -> None:
    behaviours = {"n001": "fail:kernel panic", "n002": "silent"}
    with cluster(site, tmp_path, 2, behaviours=behaviours,
                 images={"centos5": {"prov_seconds": 3}}) as c:
        moab = _moab(c, aggregate=True, provduration=3600)
        moab.query()
        moab.submit("1.head", "centos5")
        moab.submit("2.head", "centos5")
        moab.run_until(lambda: moab.view["n001"].get("MESSAGE") == "kernel panic"
                       and "timed out" in moab.view["n002"].get("MESSAGE", ""))
        assert moab.view["n001"]["STATE"] == "Down"
        assert moab.view["n001"]["MESSAGE"] == "kernel panic"
        assert moab.view["n002"]["STATE"] == "Down"
        assert "timed out" in moab.view["n002"]["MESSAGE"]
        assert not moab.reservations  # ours came first: Moab's PROVDURATION has not passed
        assert {j.state for j in moab.jobs.values()} == {"provisioning"}


@pytest.mark.integration
def test_file_url_kept_fresh_by_the_driver(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 2) as c:
        site.run("--refresh", cmd="cluster-query", check=True)
        report = c.cfg.paths.state_dir / wiki.REPORT_NAME
        moab = _moab(c, query_file=report, aggregate=True)
        moab.query()
        moab.submit("1.head", "sles11")
        moab.run_until(lambda: moab.jobs["1.head"].state == "running")
        assert not [call for call in moab.calls if "cluster-query" in " ".join(call.argv)]
        assert moab.view[moab.jobs["1.head"].node or ""]["OS"] == "sles11"


@pytest.mark.integration
def test_os_switch_returns_before_the_boot(site: Site, tmp_path: Path) -> None:
    """The call that blocks Moab records and returns; the run goes on without it."""
    with cluster(site, tmp_path, 2, behaviours={"n001": "silent", "n002": "silent"}) as c:
        proc = site.run("n[001-002]", "--set", "OS=centos5", cmd="os-switch")
        assert proc.returncode == 0 and proc.stderr == ""
        states = {r["node"]: r["state"] for r in run_nodes(c.cfg)}
        assert set(states) == {"n001", "n002"}
        assert set(states.values()) <= {"requested", "power-cycled"}  # not waited for
        wait_for(lambda: {r["state"] for r in run_nodes(c.cfg)} == {"power-cycled"}
                 and all(c.node(n).boots == ["image:centos5"] for n in c.names))


@pytest.mark.integration
def test_os_switch_wait_for_admins(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 2, behaviours={"n002": "fail:bad image"}) as c:
        proc = site.run("n[001-002]", "--set", "OS=centos5", "--wait", cmd="os-switch")
        assert proc.returncode == 1
        assert "n001: ready" in proc.stdout and "n002: failed: bad image" in proc.stdout
        assert node_row(c.cfg, "n001")["current_os"] == "centos5"
