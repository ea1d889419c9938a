"""The Slurm face with the real daemons (no VMs): munged, slurmctld and one `slurmd -N` per node
on 127.0.0.1, `pxe-stage serve` (call-home + node API), virtual IPMI BMCs and the run driver.

`sbatch --constraint=beta` lands on a node running alpha: slurmctld asks slurmd to reboot it with
feature beta -> slurmd runs our helper (next image beta, through the server) and RebootProgram
(dynprov-slurm reboot: the server starts a run, whose driver power-cycles the node over IPMI)
-> the node "boots" beta (its root is rewritten, it enrolls and reports ready; its slurmd
restarts as a rebooted node's) -> the helper prints beta -> the job runs there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pwd
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_power_support import add_nodes, vbmc
from test_run_support import add_images, configure, node_rows, stop_runs
from test_serve_support import serve_process
from test_slurm_support import Booter, FakeNode, SlurmLab, cli, slurm_tools, wait_until

from pxe import db, run
from slurm_plugin import toolkit
from tests.conftest import Site

pytestmark = pytest.mark.integration

MUNGE_KEY = bytes(range(256)) * 4
LABELS = {"alpha": {"prov_seconds": 120}, "beta": {"prov_seconds": 120}}


@contextlib.contextmanager
def provisioned(site: Site, tmp: Path, count: int) -> Iterator[tuple[Booter, str]]:
    """``count`` nodes behind virtual BMCs, all running alpha (a real run), served over HTTP."""
    cfg = configure(site)
    add_images(cfg, tmp, **LABELS)
    names = [f"n{i:03d}" for i in range(1, count + 1)]
    with vbmc(tmp, f"n[001-{count:03d}]", count) as bmcs:
        rows = node_rows([bmcs.base_port + i for i in range(count)])  # type: ignore[attr-defined]
        add_nodes(cfg, rows)
        secrets = cfg.paths.state_dir / "node-secrets"  # what slurmd's munged needs
        secrets.mkdir(mode=0o700, parents=True)
        (secrets / "munge.key").write_bytes(MUNGE_KEY)
        with serve_process(site) as srv:
            cfg = site.cfg
            # the last node has no Python: the sh node client (contrib/slurm) does its part
            nodes = {n: FakeNode(tmp, n, sh=n == names[-1]) for n in names}
            assert bmcs.journal is not None
            with Booter(cfg, srv.url, bmcs.journal, nodes, {r["name"]: r["mac"] for r in rows}
                        ) as booter:
                try:
                    conn = db.connect(cfg.database)
                    started = toolkit.start(cfg, conn, names, "alpha")
                    assert sorted(started.accepted) == names, started.refused
                    try:
                        wait_until(lambda: all(_row(cfg, n)["current_os"] == "alpha" and
                                               _row(cfg, n)["state"] == "ready" for n in names),
                                   "nodes ready in alpha", 60)
                    except AssertionError as exc:
                        raise AssertionError(f"{exc}: {booter.errors}") from None
                    yield booter, srv.url
                finally:
                    stop_runs(cfg)
            assert not booter.errors, booter.errors


def _row(cfg, name: str) -> dict:
    conn = db.connect(cfg.database)
    try:
        return dict(conn.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone())
    finally:
        conn.close()


def _events(cfg, kind: str) -> list[tuple[str, str]]:
    conn = db.connect(cfg.database)
    try:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT node, detail FROM events WHERE kind = ? ORDER BY id", (kind,))]
    finally:
        conn.close()


def test_sbatch_constraint_reimages_the_node(site: Site, tmp_path: Path) -> None:
    with provisioned(site, tmp_path, 2) as (booter, _url):
        cfg = site.cfg
        with _slurm_site(site, tmp_path, booter) as lab:
            booter.slurm = lab
            wait_until(lambda: all(i["state"] == "idle" and i["active"] == "alpha"
                                   for i in lab.node_info().values())
                       and len(lab.node_info()) == 2, "slurmd registered with alpha", 60)
            info = lab.node_info()
            assert {i["avail"] for i in info.values()} == {"alpha,beta"}

            # a constraint no image provides: refused at submit, nothing started
            bad = lab.run("sbatch", "--constraint=gamma", "--wrap", "true")
            assert bad.returncode != 0 and "feature" in bad.stderr.lower(), bad.stderr

            job = tmp_path / "job.sh"
            job.write_text("#!/bin/sh\ncat " + str(tmp_path / "nodes")
                           + "/$SLURMD_NODENAME/etc/os-release\n")
            out = tmp_path / "job-%j.out"
            sub = lab.run("sbatch", "--parsable", "-N1", "--constraint=beta",
                          f"--output={out}", str(job))
            assert sub.returncode == 0, sub.stderr
            job_id = sub.stdout.strip().split(";")[0]
            state = wait_until(lambda: (s := lab.job(job_id).get("JobState")) in
                               ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
                               and s, "job finished", 150, 0.5)
            node = lab.job(job_id)["NodeList"]
            assert state == "COMPLETED", (lab.job(job_id), lab.log("slurmctld")[-3000:])
            text = Path(str(out).replace("%j", job_id)).read_text()
            assert "IMAGE_ID=beta" in text
            # the path it took: helper beta, RebootProgram, a run power-cycling it, booted beta
            calls = booter.nodes[node].calls()
            assert "helper beta" in calls and "reboot " in calls, calls
            assert (node, "beta") in _events(cfg, "node-next-image")
            assert any(n == node for n, _ in _events(cfg, "node-reboot"))
            assert booter.boots[node] == ["alpha", "beta"]
            row = _row(cfg, node)
            assert (row["current_os"], row["state"], row["boot_target"]) == \
                ("beta", "ready", "local")
            assert lab.node_info()[node]["active"] == "beta"

            # Story A: --reboot re-images the node even when it already has the feature
            boots = {n: len(b) for n, b in booter.boots.items()}
            sub = lab.run("sbatch", "--parsable", "-N1", "--reboot", "--constraint=beta",
                          f"--output={out}", str(job))
            assert sub.returncode == 0, sub.stderr
            job_id = sub.stdout.strip().split(";")[0]
            state = wait_until(lambda: (s := lab.job(job_id).get("JobState")) in
                               ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
                               and s, "--reboot job finished", 150, 0.5)
            node = lab.job(job_id)["NodeList"]
            assert state == "COMPLETED", (lab.job(job_id), lab.log("slurmctld")[-3000:])
            assert len(booter.boots[node]) == boots[node] + 1 and booter.boots[node][-1] == "beta"
            assert "IMAGE_ID=beta" in Path(str(out).replace("%j", job_id)).read_text()

            # two jobs at once asking for different OSes, each on the node running the other:
            # both nodes are re-imaged in parallel, both jobs complete in their OS
            assert booter.boots["n001"][-1] == "beta" and booter.boots["n002"][-1] == "alpha"
            jobs = {}
            for name, label in (("n001", "alpha"), ("n002", "beta")):
                sub = lab.run("sbatch", "--parsable", "-N1", f"--nodelist={name}",
                              f"--constraint={label}", f"--output={tmp_path}/swap-{label}.out",
                              str(job))
                assert sub.returncode == 0, sub.stderr
                jobs[label] = sub.stdout.strip().split(";")[0]
            for label, jid in jobs.items():
                state = wait_until(lambda jid=jid: (s := lab.job(jid).get("JobState")) in
                                   ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
                                   and s, f"{label} job finished", 150, 0.5)
                assert state == "COMPLETED", (lab.job(jid), lab.log("slurmctld")[-3000:])
                assert f"IMAGE_ID={label}" in (tmp_path / f"swap-{label}.out").read_text()
            assert booter.boots["n001"][-1] == "alpha" and booter.boots["n002"][-1] == "beta"
            assert {n: i["active"] for n, i in lab.node_info().items()} == \
                {"n001": "alpha", "n002": "beta"}


def _slurm_site(site: Site, tmp_path: Path, booter: Booter) -> SlurmLab:
    lab = SlurmLab(tmp_path / "slurm", booter.nodes, site_config=site.config_path)
    with open(site.config_path, "a") as fh:  # slurm_conf: the run driver's hook calls scontrol
        fh.write(f'\n[slurm]\ntools_dir = "{slurm_tools(tmp_path)}"\nresume_timeout = 90\n'
                 f'slurm_conf = "{lab.env_overrides["SLURM_CONF"]}"\n')
    lab.labels = sorted(LABELS)
    return lab


def test_failed_reimage_sets_the_node_down_with_our_reason(site: Site, tmp_path: Path) -> None:
    with provisioned(site, tmp_path, 2) as (booter, _url):
        cfg = site.cfg
        env = {"DYNPROV_CONFIG": str(site.config_path)}
        with _slurm_site(site, tmp_path, booter) as lab:
            booter.slurm = lab
            wait_until(lambda: len(lab.node_info()) == 2 and all(
                i["state"] == "idle" for i in lab.node_info().values()), "slurmd registered", 60)
            booter.fail_next["beta"] = 1  # the first node re-imaged into beta fails
            job = tmp_path / "job.sh"
            job.write_text("#!/bin/sh\ncat " + str(tmp_path / "nodes")
                           + "/$SLURMD_NODENAME/etc/os-release\n")
            out = tmp_path / "job.out"
            t0 = time.monotonic()
            sub = lab.run("sbatch", "--parsable", "-N1", "--constraint=beta",
                          f"--output={out}", str(job))
            assert sub.returncode == 0, sub.stderr
            job_id = sub.stdout.strip().split(";")[0]

            def failed_node() -> str | None:
                rows = [n for n in booter.nodes if _row(cfg, n)["state"] == "failed"]
                return rows[0] if rows else None

            bad = wait_until(failed_node, "a re-image failed", 60)
            # the run driver's hook (slurm_plugin.down:on_event) sets it DOWN: no sync call
            info = wait_until(lambda: (i := lab.run("sinfo", "-h", "-N", "-n", bad, "-o",
                                                    "%T|%E").stdout.strip()).startswith("down")
                              and i, "failed node DOWN in Slurm", lab.resume_timeout - 10, 0.5)
            took = time.monotonic() - t0
            assert "dynprov: rootfs download failed" in info, info
            assert took < lab.resume_timeout, took
            # the manual fallback reports each failed run once: run again, it changes nothing
            proc = cli("sync", env={**env, **lab.env_overrides})
            assert proc.returncode == 0, proc.stderr
            proc = cli("sync", env={**env, **lab.env_overrides})
            assert proc.returncode == 0 and proc.stdout == "", proc.stdout
            assert [n for n, _ in _events(cfg, "slurm-down")] == [bad]
            # the job is requeued and lands on the other node, re-imaged into beta (Slurm holds
            # a requeued batch job for 120 s; let it start now)
            wait_until(lambda: lab.job(job_id).get("JobState") == "PENDING", "requeued", 30)
            lab.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            state = wait_until(lambda: (s := lab.job(job_id).get("JobState")) in
                               ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s,
                               "requeued job finished", 150, 0.5)
            assert state == "COMPLETED", (lab.job(job_id), lab.log("slurmctld")[-3000:])
            assert lab.job(job_id)["NodeList"] != bad
            assert "IMAGE_ID=beta" in out.read_text()


# What a refusal of the node API could wrongly change (pxe.serve.nodeapi: "every refusal is an
# events row and changes nothing else"): the node's boot (set_boot: target, image, token, when),
# its image and state (a run started: provision.start), its pool, its key material (enroll,
# secrets: settings node-key:/node-once:) and the events/runs an accepted request leaves.
# Not ``updated`` or ``state_reason``: bookkeeping that others move (the run driver's follow-up).
_REFUSAL_COLUMNS = ("boot_target", "desired_os", "boot_token", "boot_set", "pool", "current_os",
                    "current_version", "state")
_ACCEPTED_EVENTS = ("node-enrolled", "node-secret", "node-next-image", "node-reboot",
                    "set-boot", "run-requested")


def _settled(cfg) -> bool:
    """No run open and no follow-up left: the driver has reset every node's next boot to the
    disk after its "ready" (run.follow_ups). Until then it writes boot_target, boot_token,
    boot_set and updated of a node that has just reported ready."""
    conn = db.connect(cfg.database)
    try:
        open_runs = conn.execute("SELECT COUNT(*) FROM runs WHERE finished IS NULL").fetchone()[0]
        return open_runs == 0 and not run.pending(conn)
    finally:
        conn.close()


def _what_a_refusal_could_change(cfg, names: tuple[str, ...]) -> dict:
    conn = db.connect(cfg.database)
    try:
        marks = ",".join("?" * len(names))
        nodes = {r["name"]: {c: _shown(c, r[c]) for c in _REFUSAL_COLUMNS} for r in conn.execute(
            f"SELECT name, {', '.join(_REFUSAL_COLUMNS)} FROM nodes WHERE name IN ({marks})",
            names)}
        keys = {r[0]: r[1] for r in conn.execute(
            "SELECT key, value FROM settings WHERE key LIKE 'node-key:%' "
            "OR key LIKE 'node-once:%'")}
        events = {r[0]: r[1] for r in conn.execute(
            f"SELECT kind, COUNT(*) FROM events WHERE kind IN "
            f"({','.join('?' * len(_ACCEPTED_EVENTS))}) GROUP BY kind", _ACCEPTED_EVENTS)}
        runs = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        return {"nodes": nodes, "settings": keys, "events": events, "runs": runs}
    finally:
        conn.close()


def _shown(column: str, value: object) -> object:
    """A boot token by its digest: compared all the same, never printed by a failure."""
    if column == "boot_token" and value is not None:
        return "sha256:" + hashlib.sha256(str(value).encode()).hexdigest()[:16]
    return value


def _moved(before: dict, after: dict) -> dict:
    """Only what differs, for the failure message."""
    if isinstance(before, dict) and isinstance(after, dict):
        return {k: _moved(before.get(k), after.get(k)) for k in sorted({*before, *after})
                if before.get(k) != after.get(k)}
    return {"before": before, "after": after}


def test_helper_refusals(site: Site, tmp_path: Path) -> None:
    with provisioned(site, tmp_path, 2) as (booter, url):
        cfg = site.cfg
        wait_until(lambda: _settled(cfg), "the run finished and the nodes' boot reset", 60)
        n1, n2 = booter.nodes["n001"], booter.nodes["n002"]
        # each boot fetched the munge key over the token channel: 0400, owned by munge
        for n in (n1, n2):
            path = n.root / "etc/munge/munge.key"
            st = path.stat()
            assert path.read_bytes() == MUNGE_KEY and stat.S_IMODE(st.st_mode) == 0o400
            assert pwd.getpwuid(st.st_uid).pw_name == "munge"
        # no argument: the image the node runs, from its os-release
        proc = cli("helper", env=n1.env)
        assert (proc.returncode, proc.stdout) == (0, "alpha\n"), proc.stderr
        before = _what_a_refusal_could_change(cfg, ("n001", "n002"))
        # n001's key, but claiming to be n002: refused, nothing changed
        (n1.root / "proc" / "cmdline").write_text(
            f"dynprov.server={url} dynprov.node=n002 dynprov.token=x\n")
        proc = cli("helper", "beta", env=n1.env)
        assert proc.returncode == 1 and "wrong node key" in proc.stderr, proc.stderr
        (n1.root / "proc" / "cmdline").write_text(f"dynprov.server={url} dynprov.node=n001\n")
        # a wrong key
        key = (n1.root / "etc/dynprov/node-key").read_text()
        (n1.root / "etc/dynprov/node-key").chmod(0o600)
        (n1.root / "etc/dynprov/node-key").write_text("A" * 43 + "\n")
        proc = cli("reboot", env=n1.env)
        assert proc.returncode == 1 and "wrong node key" in proc.stderr, proc.stderr
        (n1.root / "etc/dynprov/node-key").write_text(key)
        # an unknown label (refused by the server) and a malformed one (refused before)
        proc = cli("helper", "gamma", env=n1.env)
        assert proc.returncode == 1 and "unknown image 'gamma'" in proc.stderr, proc.stderr
        # the sh fast path hands a FEATURE to dynprov-slurm: the same refusal
        fast = subprocess.run([str(n1.helper_script("helper", fast=True)), "gamma"],
                              capture_output=True, text=True, timeout=60)
        assert fast.returncode == 1 and "unknown image 'gamma'" in fast.stderr, fast.stderr
        proc = cli("helper", "../etc", env=n1.env)
        assert proc.returncode == 2 and "invalid image label" in proc.stderr, proc.stderr
        # a used token can neither enroll again nor fetch the munge key
        for argv in (["enroll"], ["enroll", "--munge-key"]):
            proc = cli(*argv, env=n2.env)
            assert proc.returncode == 1 and "token already used" in proc.stderr, proc.stderr
        # the sh node client (n002 has no Python): refusals, and the label it runs
        assert n2.sh
        proc = n2.command("helper")
        assert (proc.returncode, proc.stdout) == (0, "alpha\n"), proc.stderr
        for argv, code, text in ((["enroll"], 1, "refused"), (["helper", "gamma"], 1, "refused"),
                                 (["helper", "../x"], 2, "invalid image label"),
                                 (["helper", "a", "b"], 2, "at most one")):
            proc = n2.command(*argv)
            assert proc.returncode == code and text in proc.stderr, (argv, proc.stderr)
        after = _what_a_refusal_could_change(cfg, ("n001", "n002"))
        assert before == after, _moved(before, after)
        # a node moved out of the scheduler's pool is refused
        conn = db.connect(cfg.database)
        with db.transaction(conn):
            conn.execute("INSERT INTO pools(name, created) VALUES ('lab', 0) ON CONFLICT (name) DO NOTHING")
            conn.execute("UPDATE nodes SET pool = 'lab' WHERE name = 'n001'")
        proc = cli("helper", "beta", env=n1.env)
        assert proc.returncode == 1 and "not the scheduler's pool" in proc.stderr, proc.stderr
        refusals = [n for n, _ in _events(cfg, "node-api-refused")]
        assert refusals.count("n001") >= 3 and "n002" in refusals


def test_resume_and_suspend(site: Site, tmp_path: Path) -> None:
    with provisioned(site, tmp_path, 2) as (booter, _url):
        cfg = site.cfg
        env = {"DYNPROV_CONFIG": str(site.config_path)}
        proc = cli("suspend", "n[001-002]", env=env)
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: all(_row(cfg, n)["state"] == "off" for n in ("n001", "n002")),
                   "nodes off", 30)
        resume = tmp_path / "resume.json"
        resume.write_text(json.dumps({"all_nodes_resume": "n[001-002]", "jobs": [
            {"job_id": 7, "features": "beta", "nodes_alloc": "n001", "nodes_resume": "n001"}]}))
        proc = cli("resume", "n[001-002]", env={**env, "SLURM_RESUME_FILE": str(resume)})
        assert proc.returncode == 0, proc.stderr
        assert "provisioning beta" in proc.stdout and "provisioning alpha" in proc.stdout
        wait_until(lambda: _row(cfg, "n001")["current_os"] == "beta"
                   and _row(cfg, "n002")["current_os"] == "alpha", "resumed into their OS", 60)
        assert booter.boots["n001"][-1] == "beta" and booter.boots["n002"][-1] == "alpha"
        proc = cli("resume", "n[001-", env=env)
        assert proc.returncode == 2
