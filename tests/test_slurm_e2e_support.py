"""The Slurm e2e lab (no tests here): used by tests/test_slurm_e2e.py and tools/bench_slurm_boot.py.

Real munged and slurmctld inside the lab namespace, QEMU nodes g1 and g2 running images built by
`fg-image-generate -slurm` (one build, packed as two labels with -also-label: slA and slB, which
differ only in IMAGE_ID), and slX, an image that cannot boot (its root filesystem has no init),
for the failure path. The site has a ``[slurm]`` section naming the controller's slurm.conf, so
the run driver's hook (slurm_plugin.down:on_event) sets a node whose re-image fails DOWN.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab import cluster
from pxe.imagegen.pack import INIT_PATH
from tests.test_e2e_stack import Lab, _need_stack, lab_up
from tests.test_generate_support import generate

SERVER_IP = "198.18.0.1"  # the example site's server
NODE_IPS = {"g1": "198.18.0.91", "g2": "198.18.0.92"}
NODE_LINES = {
    "g1": f'  {{name = "g1", mac = "52:54:00:e2:16:01", ip = "{NODE_IPS["g1"]}", power = "ipmi"}},',
    "g2": f'  {{name = "g2", mac = "52:54:00:e2:16:02", ip = "{NODE_IPS["g2"]}", power = "ipmi"}},',
}
HELPER = "/usr/lib/dynprov/slurm/dynprov-slurm-helper"
LABELS = ("slA", "slB")
BROKEN = "slX"  # in the catalog and helpers.conf; its boot fails in the initramfs
BROKEN_REASON = f"image {BROKEN} has no {INIT_PATH}"  # slA's cmdline names init=INIT_PATH
RESUME_TIMEOUT = 900
JOB_END_STATES = ("COMPLETED", "FAILED", "NODE_FAIL", "CANCELLED", "TIMEOUT", "BOOT_FAIL")


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
        "RebootProgram=/usr/lib/dynprov/slurm/dynprov-slurm-reboot",
        f"ResumeTimeout={RESUME_TIMEOUT}",
        *(f"NodeName={name} NodeAddr={ip} CPUs=1 RealMemory=100 State=UNKNOWN"
          for name, ip in NODE_IPS.items()),
        "PartitionName=p Nodes=ALL Default=YES MaxTime=60 State=UP", ""])


def helpers_conf(helper: str) -> str:
    return "ExecTime=10\n" + "".join(f"Feature={label} Helper={helper}\n"
                                     for label in (*LABELS, BROKEN))


def build_images(out: Path) -> Path:
    """slA.bundle and slB.bundle from one Debian build with slurmd and munge, in ``out``."""
    _need_stack()
    conf = out / "conf"
    conf.mkdir(parents=True, exist_ok=True)
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
    for _ in range(int(timeout / every) + 2):
        if pred():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s: {what}")


class Controller:
    """munged (own socket and key) and slurmctld, inside the lab namespace, in ``base``."""

    def __init__(self, base: Path, conf: Path):
        self.ns = ""
        self.base = base
        os.chmod(self.base, 0o755)  # munged checks every parent of its files
        self.key = os.urandom(128)
        self.socket = self.base / "munge.socket"
        self.etc = self.base / "etc"
        self.etc.mkdir(exist_ok=True)
        text = conf.read_text().replace(
            "StateSaveLocation=/var/spool/slurmctld\n",
            f"StateSaveLocation={self.base}/state\nSlurmctldPidFile={self.base}/ctld.pid\n"
            f"SlurmctldLogFile={self.base}/slurmctld.log\nSlurmctldDebug=debug\n")
        (self.etc / "slurm.conf").write_text(text + f"AuthInfo=socket={self.socket}\n")
        # slurmctld never runs the helper; the plugin reads the features
        (self.etc / "helpers.conf").write_text(helpers_conf("/bin/true"))
        (self.base / "state").mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def conf(self) -> Path:
        return self.etc / "slurm.conf"

    def start(self, ns: str) -> None:
        self.ns = ns
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
                [*self.nsx, "/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env))

    @property
    def nsx(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.nsx, *argv], capture_output=True, text=True, env=self.env,
                              timeout=60)

    def node(self, name: str = "g1") -> tuple[str, str]:
        """(state, active features) of a node."""
        words = self.run("sinfo", "-h", "-N", "-n", name, "-o", "%T %b").stdout.split()
        return (words[0], words[1]) if len(words) == 2 else ("", "")

    def node_fields(self, name: str) -> dict[str, str]:
        """`scontrol show node` as key -> value (Reason= runs to the end of its line)."""
        text = self.run("scontrol", "show", "node", name).stdout
        fields: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("Reason="):
                fields["Reason"] = line[len("Reason="):]
                continue
            for word in line.split():
                key, eq, value = word.partition("=")
                if eq:
                    fields[key] = value
        return fields

    def job(self, job_id: str) -> dict[str, str]:
        fields = {}
        for word in self.run("scontrol", "-o", "show", "job", job_id).stdout.split():
            key, eq, value = word.partition("=")
            if eq:
                fields[key] = value
        return fields

    def job_state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def submit(self, script: Path, *options: str) -> str:
        """sbatch OPTIONS SCRIPT; the job id."""
        sb = self.run("sbatch", "--parsable", "--output=/dev/null", *options, str(script))
        assert sb.returncode == 0, sb.stderr
        return sb.stdout.strip().split(";")[0]

    def wait_job(self, job_id: str, timeout: float) -> str:
        wait_for(lambda: self.job_state(job_id) in JOB_END_STATES, f"job {job_id} ends",
                 timeout, 2)
        return self.job_state(job_id)

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


def console_job_script(path: Path) -> Path:
    """A job that prints /etc/os-release to the node's console between markers with its id."""
    path.write_text("#!/bin/sh\n{ echo \"JOB-$SLURM_JOB_ID-BEGIN\"; cat /etc/os-release; "
                    "echo \"JOB-$SLURM_JOB_ID-END\"; } > /dev/console\n")
    return path


def upload(site, bundle: Path) -> None:
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    up = subprocess.run([sys.executable, "-m", "msm_plugin.fg_moab_image", "-upload", "-image",
                         str(bundle)], capture_output=True, text=True, env=env, timeout=600)
    assert up.returncode == 0, up.stderr


def add_broken_image(site, work: Path, like: str = "slA") -> None:
    """slX: the kernel, initramfs and command line of ``like``, a root tarball without the init
    it names: the node PXE-boots, the initramfs unpacks it and reports BROKEN_REASON (failed)."""
    from pxe import db
    from pxe.images import BLOBS

    cfg = site.cfg
    conn = db.connect(cfg.db_path)
    try:
        row = conn.execute("SELECT kernel_sha, initrd_sha, cmdline FROM images WHERE label = ?",
                           (like,)).fetchone()
    finally:
        conn.close()
    assert row is not None, like

    def blob(sha: str) -> Path:
        for root in (cfg.paths.http_root, cfg.paths.tftp_root):
            if (root / BLOBS / sha).is_file():
                return root / BLOBS / sha
        raise AssertionError(f"blob {sha} of {like} not found")

    rootfs = work / f"{BROKEN}.tar"
    with tarfile.open(rootfs, "w") as tf:
        data = f'ID=debian\nIMAGE_ID={BROKEN}\n'.encode()
        info = tarfile.TarInfo("etc/os-release")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    site.run("images", "add", BROKEN, "--kernel", str(blob(row[0])), "--initrd",
             str(blob(row[1])), "--rootfs", str(rootfs), "--cmdline", row[2], "--prov-seconds",
             "600", check=True)


@dataclass
class SlurmLab:
    site: object
    lab: Lab
    ctl: Controller
    serial: Path  # the nodes' console logs: serial / f"{node}.log"

    def console(self, node: str) -> str:
        path = self.serial / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def job_output(self, node: str, job_id: str) -> str:
        text = self.console(node)
        begin, end = f"JOB-{job_id}-BEGIN", f"JOB-{job_id}-END"
        return text.split(begin)[-1].split(end)[0] if begin in text else ""


@contextlib.contextmanager
def slurm_lab_up(site, images: Path, nodes: tuple[str, ...] = ("g1",), first: str = "slA"
                 ) -> Iterator[SlurmLab]:
    """The lab with ``nodes``, munged + slurmctld, slA/slB/slX in the catalog, every node booted
    into ``first`` and its slurmd registered."""
    base = Path(tempfile.mkdtemp(prefix="dynprov-slurm-e2e-"))
    ctl = Controller(base, images / "conf" / "slurm.conf")
    with open(site.config_path, "a") as fh:  # the run driver's hook talks to this slurmctld
        fh.write(f'\n[slurm]\nslurm_conf = "{ctl.conf}"\nresume_timeout = {RESUME_TIMEOUT}\n')
    try:
        with lab_up(site, "\n".join(NODE_LINES[n] for n in nodes)) as lab:
            state = cluster.read_state(site.cfg)
            assert state is not None
            secrets = site.cfg.paths.state_dir / "node-secrets"  # the same key for the nodes
            secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
            (secrets / "munge.key").write_bytes(ctl.key)
            (secrets / "munge.key").chmod(0o400)
            try:
                ctl.start(state["netns"])
                for label in LABELS:
                    upload(site, images / f"{label}.bundle")
                add_broken_image(site, base)
                out = SlurmLab(site, lab, ctl, cluster.lab_dir(site.cfg) / "serial")
                t0 = time.monotonic()
                sw = lab.os_switch(",".join(nodes), first)
                assert sw.returncode == 0, sw.stderr
                states = lab.wait_final(list(nodes), timeout=600)
                assert states == dict.fromkeys(nodes, "ready"), "\n".join(
                    ln for n in nodes for ln in out.console(n).splitlines()
                    if "dynprov" in ln or "slurm" in ln)
                for name in nodes:
                    wait_for(lambda name=name: ctl.node(name) == ("idle", first),
                             f"{name}'s slurmd registers in {first}", 180)
                print(f"os-switch {','.join(nodes)} -> slurmd in {first} registered: "
                      f"{time.monotonic() - t0:.1f} s")
                yield out
            except BaseException:
                print(f"slurmctld log:\n{ctl.log_tail()}")
                raise
            finally:
                ctl.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)  # its munge key with it
