"""e2e: a Slurm job that asks for another OS gets it. Real munged and slurmctld inside the lab
namespace, one QEMU node running images built by `fg-image-generate -slurm` (one build, packed
as two labels with -also-label: slA and slB, which differ only in IMAGE_ID).

g1 boots slA (os-switch) -> its slurmd registers with active feature slA -> `sbatch
--constraint=slB` a job that prints /etc/os-release -> slurmctld asks g1's slurmd to reboot with
feature slB -> the helper (node side, from the image) sets g1's next boot to slB through the
node API, RebootProgram asks the server to reboot it (a run that power-cycles g1 over IPMI) ->
g1 PXE-boots slB, fetches the munge key with its new token, slurmd registers with slB -> the
job runs there: its output (sent to the node's console) shows IMAGE_ID=slB.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import cluster
from tests.test_e2e_stack import _need_stack, lab_up
from tests.test_generate_support import generate

pytestmark = pytest.mark.e2e

SERVER_IP, NODE_IP = "198.18.0.1", "198.18.0.91"  # the example site's server; g1 below
NODE = f'  {{name = "g1", mac = "52:54:00:e2:16:01", ip = "{NODE_IP}", power = "ipmi"}},'
HELPER = "/usr/lib/dynprov/slurm/dynprov-slurm-helper"


def node_conf(host: str) -> str:
    """The nodes' slurm.conf (put into the image): slurmctld in the lab namespace."""
    return "\n".join([
        "ClusterName=dpe2e", f"SlurmctldHost={host}({SERVER_IP})",
        "AuthType=auth/munge", "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root",
        "StateSaveLocation=/var/spool/slurmctld", "SlurmdSpoolDir=/var/spool/slurmd",
        "SlurmdLogFile=/var/log/slurm/slurmd.log", "SlurmdDebug=debug",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "ReturnToService=2",
        "MpiDefault=none", "SwitchType=switch/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none", "SlurmdTimeout=300",
        "InactiveLimit=0", "MinJobAge=300", "SchedulerParameters=bf_interval=1,sched_interval=1",
        "NodeFeaturesPlugins=node_features/helpers",
        "RebootProgram=/usr/lib/dynprov/slurm/dynprov-slurm-reboot", "ResumeTimeout=900",
        f"NodeName=g1 NodeAddr={NODE_IP} CPUs=1 RealMemory=100 State=UNKNOWN",
        "PartitionName=p Nodes=ALL Default=YES MaxTime=60 State=UP", ""])


def helpers_conf(helper: str) -> str:
    return f"ExecTime=10\nFeature=slA Helper={helper}\nFeature=slB Helper={helper}\n"


@pytest.fixture(scope="module")
def slurm_images(tmp_path_factory) -> Path:
    """slA.bundle and slB.bundle from one Debian build with slurmd and munge."""
    _need_stack()
    out = tmp_path_factory.mktemp("slurm-images")
    conf = out / "conf"
    conf.mkdir()
    (conf / "slurm.conf").write_text(node_conf(socket.gethostname()))
    (conf / "helpers.conf").write_text(helpers_conf(HELPER))
    proc = generate("-slurm", "-slurm-conf", str(conf / "slurm.conf"), "-label", "slA",
                    "-also-label", "slB", "-o", str(out / "slA.bundle"), "-json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    print(f"generated slA+slB: {info['bundle_bytes'] / 1e6:.1f} MB in {info['seconds']} s "
          f"{info['steps']}")
    return out


def wait_for(pred, what: str, timeout: float, every: float = 2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s: {what}")


class Controller:
    """munged (own socket and key) and slurmctld, inside the lab namespace."""

    def __init__(self, ns: str, conf: Path):
        self.ns, self.base = ns, Path(tempfile.mkdtemp(prefix="dynprov-slurm-e2e-"))
        os.chmod(self.base, 0o755)  # munged checks every parent of its files
        self.key = os.urandom(128)
        self.socket = self.base / "munge.socket"
        self.etc = self.base / "etc"
        self.etc.mkdir()
        text = conf.read_text().replace(
            "StateSaveLocation=/var/spool/slurmctld\n",
            f"StateSaveLocation={self.base}/state\nSlurmctldPidFile={self.base}/ctld.pid\n"
            f"SlurmctldLogFile={self.base}/slurmctld.log\nSlurmctldDebug=debug\n")
        (self.etc / "slurm.conf").write_text(text + f"AuthInfo=socket={self.socket}\n")
        # slurmctld never runs the helper; the plugin reads the features
        (self.etc / "helpers.conf").write_text(helpers_conf("/bin/true"))
        (self.base / "state").mkdir()
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.etc / "slurm.conf")}

    def start(self) -> None:
        key = self.base / "munge.key"
        key.write_bytes(self.key)
        munge = pwd.getpwnam("munge")
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chown(self.base, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self.procs.append(subprocess.Popen(
            [*self.nsx, "runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground",
             f"--socket={self.socket}", f"--key-file={key}", f"--pid-file={self.base}/m.pid",
             f"--log-file={self.base}/munged.log", f"--seed-file={self.base}/munged.seed"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(self.socket.exists, "munged socket", 30, 0.2)
        with open(self.base / "slurmctld.out", "ab") as out:
            self.procs.append(subprocess.Popen(
                [*self.nsx, "/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.etc / "slurm.conf")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env))

    @property
    def nsx(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.nsx, *argv], capture_output=True, text=True, env=self.env,
                              timeout=60)

    def node(self) -> tuple[str, str]:
        """(state, active features) of g1."""
        words = self.run("sinfo", "-h", "-N", "-n", "g1", "-o", "%T %b").stdout.split()
        return (words[0], words[1]) if len(words) == 2 else ("", "")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        path = self.base / "slurmctld.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
            if path.exists() else ""


@contextlib.contextmanager
def controller(site, ns: str, images: Path) -> Iterator[Controller]:
    ctl = Controller(ns, images / "conf" / "slurm.conf")
    secrets = site.cfg.paths.state_dir / "node-secrets"  # the same key for the nodes
    secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    (secrets / "munge.key").write_bytes(ctl.key)
    (secrets / "munge.key").chmod(0o400)
    try:
        ctl.start()
        yield ctl
    finally:
        ctl.stop()
        print(f"slurmctld log:\n{ctl.log_tail()}")
        shutil.rmtree(ctl.base, ignore_errors=True)  # its munge key with it


def _upload(site, bundle: Path) -> None:
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    up = subprocess.run([sys.executable, "-m", "msm_plugin.fg_moab_image", "-upload", "-image",
                         str(bundle)], capture_output=True, text=True, env=env, timeout=600)
    assert up.returncode == 0, up.stderr


def test_sbatch_constraint_reimages_the_node_and_the_job_runs_in_b(site, slurm_images):
    with lab_up(site, NODE) as lab:
        state = cluster.read_state(site.cfg)
        assert state is not None
        serial = cluster.lab_dir(site.cfg) / "serial" / "g1.log"
        with controller(site, state["netns"], slurm_images) as ctl:
            _upload(site, slurm_images / "slA.bundle")
            _upload(site, slurm_images / "slB.bundle")
            t0 = time.monotonic()
            sw = lab.os_switch("g1", "slA")
            assert sw.returncode == 0, sw.stderr
            states = lab.wait_final(["g1"], timeout=600)
            console = serial.read_text(errors="replace")
            assert states == {"g1": "ready"}, "\n".join(
                ln for ln in console.splitlines() if "dynprov" in ln or "slurm" in ln)
            # the key came over the token channel, then munged and slurmd, then ready
            after = console.split("switch_root")[-1]
            assert after.index("written: /etc/munge/munge.key") \
                < after.index("dynprov: slurm: munged and slurmd started")
            wait_for(lambda: ctl.node() == ("idle", "slA"), "g1's slurmd registers in slA", 180)
            print(f"os-switch -> slurmd in slA registered: {time.monotonic() - t0:.1f} s")

            job = ctl.base / "job.sh"
            job.write_text("#!/bin/sh\n{ echo JOB-OUTPUT-BEGIN; cat /etc/os-release; "
                           "echo JOB-OUTPUT-END; } > /dev/console\n")
            t1 = time.monotonic()
            sb = ctl.run("sbatch", "--constraint=slB", "--output=/dev/null", str(job))
            assert sb.returncode == 0, sb.stderr
            job_id = sb.stdout.split()[-1]

            def job_state() -> str:
                text = ctl.run("scontrol", "show", "job", job_id).stdout
                return next((w.split("=")[1] for w in text.split()
                             if w.startswith("JobState=")), "")
            wait_for(lambda: job_state() in ("COMPLETED", "FAILED", "NODE_FAIL", "CANCELLED"),
                     f"job {job_id} ends", 900, 3)
            took = time.monotonic() - t1
            assert job_state() == "COMPLETED", ctl.log_tail()
            assert ctl.node()[1] == "slB"
            console = serial.read_text(errors="replace")
            out = console.split("JOB-OUTPUT-BEGIN")[-1].split("JOB-OUTPUT-END")[0]
            assert "IMAGE_ID=slB" in out and "IMAGE_ID=slA" not in out, out
            assert "dynprov: image slB is up" in console
            print(f"sbatch --constraint=slB -> job done in slB: {took:.1f} s")
