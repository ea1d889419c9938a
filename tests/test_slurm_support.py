"""Helpers for the Slurm face's tests (no tests here): a private munged, slurmctld and one
`slurmd -N` per node on 127.0.0.1 (random ports, one scratch directory, every PID killed by PID
at the end), and fake nodes whose "root" (proc/cmdline, etc/os-release, etc/dynprov/node-key)
lives in a directory of their own ($DYNPROV_NODE_ROOT).

Slurm 22.05's helper gets no node name (slurm-facts.md), so each slurmd has its own config
directory: the same slurm.conf except RebootProgram, and a helpers.conf naming a per-node
wrapper that sets DYNPROV_NODE_ROOT.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from lab.ports import free_port
from tests.conftest import ROOT

LOOPBACK = "127.0.0.1"
FAST_HELPER = ROOT / "contrib" / "slurm" / "dynprov-slurm-helper"
SH_NODE = ROOT / "contrib" / "slurm" / "dynprov-slurm-node"


def wait_until(cond: Any, what: str, limit: float = 60.0, pause: float = 0.2) -> Any:
    """Poll ``cond()`` until it returns something true (bounded in count and time)."""
    end = time.monotonic() + limit
    for _ in range(int(limit / pause) + 2):
        with contextlib.suppress(Exception):
            result = cond()
            if result:
                return result
        if time.monotonic() > end:
            break
        time.sleep(pause)
    raise AssertionError(f"{what}: not within {limit} s")


def _kill(proc: subprocess.Popen | None, limit: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess:
    """`dynprov-slurm ...` as a real process (python3 -m slurm_plugin.cli)."""
    return subprocess.run([sys.executable, "-m", "slurm_plugin.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# -- fake nodes --------------------------------------------------------------------------------------
class FakeNode:
    """What a booted image carries, in a directory (DYNPROV_NODE_ROOT)."""

    def __init__(self, base: Path, name: str, sh: bool = False):
        self.name = name
        self.sh = sh  # a node without Python: contrib/slurm/dynprov-slurm-node does it all
        self.root = base / "nodes" / name
        (self.root / "proc").mkdir(parents=True, exist_ok=True)
        (self.root / "etc").mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {"DYNPROV_NODE_ROOT": str(self.root), "PYTHONPATH": str(ROOT)}

    def boot(self, server: str, label: str, token: str) -> None:
        (self.root / "proc" / "cmdline").write_text(
            f"console=ttyS0 dynprov.server={server} dynprov.node={self.name} "
            f"dynprov.image={label} dynprov.mode=stateless dynprov.token={token}\n")
        (self.root / "etc" / "os-release").write_text(
            f'PRETTY_NAME="dynprov test image {label}"\nID=debian\nIMAGE_ID={label}\n')

    def helper_script(self, what: str, fast: bool = False) -> Path:
        """A per-node wrapper for Helper= / RebootProgram= (slurmd gives no node name);
        ``fast``: the helper is contrib/slurm/dynprov-slurm-helper (sh), handing FEATURE calls
        to dynprov-slurm."""
        shim = self.root / "dynprov-slurm"
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m slurm_plugin.cli \"$@\"\n")
        shim.chmod(0o755)
        if self.sh:
            target = f"{SH_NODE} {what}"
        elif fast and what == "helper":
            target = f"{FAST_HELPER}"
        else:
            target = f"{sys.executable} -m slurm_plugin.cli {what}"
        path = self.root / f"dynprov-slurm-{what}"
        path.write_text(
            "#!/bin/sh\n"
            f"DYNPROV_NODE_ROOT={self.root}\nPYTHONPATH={ROOT}\nDYNPROV_SLURM={shim}\n"
            "export DYNPROV_NODE_ROOT PYTHONPATH DYNPROV_SLURM\n"
            f"echo \"$(date +%s.%N) {what} $*\" >> {self.root}/calls.log\n"
            f"exec {target} \"$@\"\n")
        path.chmod(0o755)
        return path

    def command(self, *argv: str) -> subprocess.CompletedProcess:
        """A node-side command as this node runs it (Python, or the sh client)."""
        if self.sh:
            return subprocess.run([str(SH_NODE), *argv], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, **self.env})
        return cli(*argv, env=self.env)

    def calls(self) -> list[str]:
        path = self.root / "calls.log"
        return [ln.split(" ", 1)[1] for ln in path.read_text().splitlines()] if path.exists() else []


def slurm_tools(base: Path) -> Path:
    """dynprov-slurm-* commands as an install would put them (for ``[slurm] tools_dir``)."""
    tools = base / "tools"
    tools.mkdir(parents=True, exist_ok=True)
    for what in ("helper", "reboot", "resume", "suspend"):
        path = tools / f"dynprov-slurm-{what}"
        path.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT}\nexport PYTHONPATH\n"
                        f"exec {sys.executable} -m slurm_plugin.cli {what} \"$@\"\n")
        path.chmod(0o755)
    return tools


def boot_file_args(cfg: Any, mac: str) -> dict[str, str] | None:
    """dynprov.* of the APPEND line `serve` answers for the node's pxelinux config (rendered from
    the database, as its firmware would fetch it); None when it boots its disk."""
    from pxe.serve import files
    from pxe.serve.bootconfigs import BootConfigs

    configs = BootConfigs(cfg)  # one per call: boots come from several threads
    try:
        data = configs.lookup("pxelinux.cfg/01-" + mac.replace(":", "-"))
    except files.Missing:
        data = None
    finally:
        configs.close()
    if data is None:
        return None
    for line in data.decode().splitlines():
        line = line.strip()
        if line.startswith("APPEND "):
            return {k[len("dynprov."):]: v for k, _, v in (w.partition("=") for w in line.split())
                    if k.startswith("dynprov.")}
    return None


class Booter:
    """Plays the nodes' boots: follows the virtual BMCs' journal; on power-on/cycle a node reads
    its staged boot file, "boots" that image (writes its root), enrolls (`dynprov-slurm enroll`,
    a real process), reports booting + ready over HTTP, and (once Slurm runs) its slurmd restarts
    like a rebooted node's."""

    def __init__(self, cfg: Any, server: str, journal: Path, nodes: dict[str, FakeNode],
                 macs: dict[str, str]):
        self.cfg, self.server, self.journal = cfg, server, journal
        self.nodes, self.macs = nodes, macs
        self.slurm: SlurmLab | None = None
        self.boots: dict[str, list[str]] = {n: [] for n in nodes}
        self.fail_next: dict[str, int] = {}  # label -> how many next boots of it fail
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.offset = 0
        self.thread = threading.Thread(target=self._loop, name="slurm-booter", daemon=True)

    def __enter__(self) -> Booter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)

    def _loop(self) -> None:
        deadline = time.monotonic() + 900
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - reported to the test
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(0.1)

    def _step(self) -> None:
        if not self.journal.exists():
            return
        with open(self.journal, encoding="utf-8") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[:data.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            event = json.loads(line)
            name = event.get("bmc", "")
            if name in self.nodes and event.get("event") in ("power-on", "power-cycle", "reset"):
                self.boot(name)
            elif name in self.nodes and event.get("event") in ("power-off", "soft-off"):
                if self.slurm:
                    self.slurm.stop_slurmd(name)

    def boot(self, name: str) -> None:
        if self.slurm:
            self.slurm.stop_slurmd(name)  # the old system is gone
        args = boot_file_args(self.cfg, self.macs[name])
        if not args:
            self.boots[name].append("disk")
            return
        node = self.nodes[name]
        label, token = args["image"], args["token"]
        self.boots[name].append(label)
        if self.fail_next.get(label, 0) > 0:  # the initramfs cannot install the image
            self.fail_next[label] -= 1
            for kind, detail in (("booting", label), ("failed", "rootfs download failed")):
                httpx.post(f"{self.server}/report", timeout=10, data={
                    "node": name, "token": token, "kind": kind, "detail": detail})
            return
        node.boot(self.server, label, token)
        proc = node.command("enroll", "--munge-key")
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: enroll failed: {proc.stderr.strip()}")
        for kind in ("booting", "ready"):
            r = httpx.post(f"{self.server}/report", timeout=10, data={
                "node": name, "token": token, "kind": kind, "detail": label})
            if r.status_code != 200:
                raise RuntimeError(f"{name}: report {kind} -> {r.status_code} {r.text.strip()}")
        if self.slurm:
            self.slurm.start_slurmd(name, rebooted=True)


# -- munged + slurmctld + slurmd ---------------------------------------------------------------------
class SlurmLab:
    """A private Slurm cluster in ``base``: munged (own socket and key), slurmctld, slurmd -N."""

    def __init__(self, base: Path, nodes: dict[str, FakeNode], *, resume_timeout: int = 90,
                 extra: Sequence[str] = (), site_config: Path | None = None):
        self.base = base
        self.nodes = nodes
        self.tag = f"dp{random.randrange(16**6):06x}"
        self.host = socket.gethostname()
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        self.node_ports = {n: free_port() for n in nodes}
        # munged runs as munge and checks every parent of its files: not under pytest's 0700 dirs
        self.munge_dir = Path(tempfile.mkdtemp(prefix=f"dynprov-munge-{self.tag}-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.resume_timeout = resume_timeout
        self.extra = list(extra)
        self.labels: list[str] = []
        self.site_config = site_config  # slurmctld's block comes from `dynprov-slurm config`

    # config ------------------------------------------------------------------------------------
    def conf_text(self, reboot_program: str | None) -> str:
        b = self.base
        lines = [
            f"ClusterName={self.tag}",
            f"SlurmctldHost={self.host}({LOOPBACK})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/%n",
            f"SlurmctldPidFile={b}/slurmctld.pid",
            f"SlurmdPidFile={b}/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/slurmctld.log",
            f"SlurmdLogFile={b}/slurmd-%n.log",
            "SlurmctldDebug=debug", "SlurmdDebug=debug",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "ReturnToService=2", "MpiDefault=none", "SwitchType=switch/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "SlurmdTimeout=300", "InactiveLimit=0", "MinJobAge=300",
            "SchedulerParameters=bf_interval=1,sched_interval=1",
            *self.extra,
        ]
        if reboot_program:
            lines += ["NodeFeaturesPlugins=node_features/helpers",
                      f"RebootProgram={reboot_program}", f"ResumeTimeout={self.resume_timeout}"]
        for name in self.nodes:
            lines.append(f"NodeName={name} NodeAddr={LOOPBACK} NodeHostname={self.host} "
                         f"Port={self.node_ports[name]} CPUs=1 RealMemory=100 State=UNKNOWN")
        lines.append(f"PartitionName=p{self.tag} Nodes=ALL Default=YES MaxTime=60 State=UP")
        return "\n".join(lines) + "\n"

    def helpers_text(self, helper: str) -> str:
        return "ExecTime=10\n" + "".join(f"Feature={lbl} Helper={helper}\n" for lbl in self.labels)

    def write_configs(self) -> None:
        ctld = self.base / "etc"
        ctld.mkdir(parents=True, exist_ok=True)
        # slurmctld's copy: the helper is never run there, but the plugin reads the features
        if self.site_config is None:
            (ctld / "slurm.conf").write_text(self.conf_text("/bin/true"))
            (ctld / "helpers.conf").write_text(self.helpers_text("/bin/true"))
        else:
            (ctld / "slurm.conf").write_text(self.conf_text(None))
            proc = cli("config", "-install", str(ctld / "slurm.conf"),
                       env={"DYNPROV_CONFIG": str(self.site_config)})
            if proc.returncode != 0:
                raise RuntimeError(f"dynprov-slurm config -install: {proc.stderr.strip()}")
        for name, node in self.nodes.items():
            etc = self.base / "etc-nodes" / name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "slurm.conf").write_text(self.conf_text(str(node.helper_script("reboot"))))
            # the last node uses the sh fast-path helper, the others the Python one
            fast = name == list(self.nodes)[-1]
            (etc / "helpers.conf").write_text(
                self.helpers_text(str(node.helper_script("helper", fast=fast))))

    @property
    def env_overrides(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.base / "etc" / "slurm.conf")}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.env_overrides}

    # daemons -----------------------------------------------------------------------------------
    def _popen(self, key: str, argv: list[str], env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        log = open(self.base / f"{key}.out", "ab")  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env or self.env)
        finally:
            log.close()
        self.procs[key] = proc
        return proc

    def start_munged(self) -> None:
        d = self.munge_socket.parent
        d.mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(128))
        munge = pwd.getpwnam("munge")
        for path in (d, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        d.chmod(0o755)
        key.chmod(0o400)
        self._popen("munged", [
            "runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground",
            f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={d}/munged.pid",
            f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"])
        wait_until(lambda: self.munge_socket.exists(), "munged socket", 30)

    def start_ctld(self) -> None:
        (self.base / "state").mkdir(exist_ok=True)
        self._popen("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i",
                                  "-f", str(self.base / "etc" / "slurm.conf")])
        wait_until(lambda: self.run("scontrol", "ping").returncode == 0
                   and "UP" in self.run("scontrol", "ping").stdout, "slurmctld up", 60)

    def start_slurmd(self, name: str, rebooted: bool = False) -> None:
        with self.lock:
            old = self.procs.get(f"slurmd-{name}")
            if old is not None and old.poll() is None:
                return
            (self.base / "spool" / name).mkdir(parents=True, exist_ok=True)
            argv = ["/usr/sbin/slurmd", "-D", "-N", name,
                    "-f", str(self.base / "etc-nodes" / name / "slurm.conf")]
            if rebooted:
                argv.append("-b")
            self._popen(f"slurmd-{name}", argv)

    def stop_slurmd(self, name: str) -> None:
        with self.lock:
            _kill(self.procs.get(f"slurmd-{name}"))

    def __enter__(self) -> SlurmLab:
        self.write_configs()
        try:
            self.start_munged()
            self.start_ctld()
            for name in self.nodes:
                self.start_slurmd(name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for key in [k for k in self.procs if k.startswith("slurmd-")]:
            _kill(self.procs[key])
        _kill(self.procs.get("slurmctld"))
        _kill(self.procs.get("munged"))
        shutil.rmtree(self.munge_dir, ignore_errors=True)
        # a job step or helper a slurmd left behind: only children of our daemons' sessions
        # are ours, and they died with them (slurmstepd exits when its slurmd is gone)

    # clients -----------------------------------------------------------------------------------
    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        if not shutil.which(argv[0]):
            raise RuntimeError(f"{argv[0]} not installed (tools/install-deps)")
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=self.base)

    def node_info(self) -> dict[str, dict[str, str]]:
        """sinfo per node: state, available and active features."""
        proc = self.run("sinfo", "-h", "-N", "-o", "%N|%T|%f|%b")
        out = {}
        for line in proc.stdout.splitlines():
            name, state, avail, active = line.split("|")
            out[name] = {"state": state, "avail": avail, "active": active}
        return out

    def job(self, job_id: str) -> dict[str, str]:
        proc = self.run("scontrol", "-o", "show", "job", job_id)
        fields = {}
        for word in proc.stdout.split():
            key, eq, value = word.partition("=")
            if eq:
                fields[key] = value
        return fields

    def log(self, name: str) -> str:
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
