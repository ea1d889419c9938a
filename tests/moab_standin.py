"""Test doubles of the outside world the Moab face talks to (no tests here).

``MoabStandIn`` is a TEST DOUBLE OF A COMMERCIAL PROGRAM: Moab Workload Manager (Adaptive
Computing) cannot run here. It models only what ../shared/moab-contract.md says Moab does with a
native provisioning resource manager, and calls our commands exactly that way, as real processes:
- ``os-switch <node> --set OS=<label>``, one node per call, serially (Moab's default), or one call
  per OS with a comma list when ``aggregate`` (AGGREGATENODEACTIONS TRUE);
- ``node-power <nodes> ON|OFF``: failure is the word ERROR on stdout (the exit code is ignored);
- ``cluster-query`` with no argument (or the file behind a ``file://`` URL), parsed strictly: a
  malformed line, an unknown attribute, bad escaping or a non-zero exit fails the test (WikiError).
It enforces the contract's traps: exit 4 from a modify call, or the word ERROR on stderr with
exit 0 (CHILDSTDERRCHECK), raise ContractError. Its "osprovision" job completes only when our
``OS=`` equals the request AND the workload RM (``Torque``) reports the node up AND it is not
powered off; it fails after PROVDURATION and leaves a prov-fail reservation on the node.

``Torque`` plays TORQUE's two parts that matter: whether pbs_mom on a node is up (the second
completion signal), and the epilogue it runs, as root, with TORQUE's ten arguments, when a job
ends on a node.

``NodeSimulator`` plays the nodes' side of a boot: it follows the virtual BMCs' journal
(lab/vbmc.py); when a node is powered on, cycled or reset it "PXE-boots": reads the boot file
our set-boot staged for its MAC in the TFTP root, and if that boots an image, calls home as the
initramfs would (pxe.reports.record_report with the token from the kernel command line, then
pxe.run.notify, as the server does). Per node it can succeed, fail with a reason, stay
silent, or install to disk first (stateful). pbs_mom goes down at power-off and up once the node
is ready (or boots a disk holding an OS).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- the WIKI format, read strictly ------------------------------------------------------------------
# Node attributes of Moab's WIKI format (Moab admin guide "WIKI data format", node section).
KNOWN_ATTRIBUTES = {"STATE", "OS", "OSLIST", "ARCH", "CPROC", "APROC", "CMEMORY", "AMEMORY",
                    "CSWAP", "ASWAP", "CDISK", "ADISK", "FEATURE", "PARTITION", "MESSAGE", "CAT",
                    "UPDATETIME", "POWER", "VARIABLE", "RACK", "SLOT", "NODEINDEX"}
_COUNTS = {"CPROC", "APROC", "CMEMORY", "AMEMORY", "CSWAP", "ASWAP", "CDISK", "ADISK"}  # MB, procs
STATES = {"Idle", "Busy", "Running", "Down", "Drained", "Draining", "Unknown", "Flush", "Reserved"}
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[0-9,-]+\])?$")
_GEVENT = re.compile(r"^GEVENT\[[A-Za-z0-9_.-]+\]$")
_ESCAPABLE = set('\\#;:"')


class WikiError(AssertionError):
    """Our cluster-query output broke the WIKI format (a test failure)."""


class ContractError(AssertionError):
    """One of our commands did something the contract forbids (a test failure)."""


def _split_items(text: str, lineno: int) -> list[str]:
    """Split on ';' and whitespace outside quotes (Moab reads whitespace as ';')."""
    items, cur, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in _ESCAPABLE:
                raise WikiError(f"line {lineno}: stray backslash in {text!r}")
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if not quoted and (ch == ";" or ch.isspace()):
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if quoted:
        raise WikiError(f"line {lineno}: unbalanced quotes in {text!r}")
    items.append("".join(cur))
    return items


def _unescape(value: str, lineno: int) -> str:
    out, i, quoted = [], 0, False
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            out.append(value[i + 1])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch in "#:":
            raise WikiError(f"line {lineno}: unescaped {ch!r} in value {value!r}")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def parse_wiki(text: str) -> dict[str, dict[str, str]]:
    """Node -> {attribute: value}; raises WikiError on anything Moab would reject or misread."""
    nodes: dict[str, dict[str, str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        node, sep, rest = line.partition(" ")
        if not sep or not _NODE_ID.match(node):
            raise WikiError(f"line {lineno}: malformed node id in {line!r}")
        if node in nodes:
            raise WikiError(f"line {lineno}: node {node} reported twice")
        attrs: dict[str, str] = {}
        for item in _split_items(rest, lineno):
            if not item:
                raise WikiError(f"line {lineno}: empty attribute (stray ';' or space) in {line!r}")
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise WikiError(f"line {lineno}: {item!r} is not ATTR=VALUE")
            if key not in KNOWN_ATTRIBUTES and not _GEVENT.match(key):
                raise WikiError(f"line {lineno}: unknown attribute {key!r}")
            if key in attrs:
                raise WikiError(f"line {lineno}: attribute {key} twice")
            attrs[key] = _unescape(value, lineno)
        if attrs.get("STATE") not in STATES:
            raise WikiError(f"line {lineno}: missing or unknown STATE in {line!r}")
        if "POWER" in attrs and attrs["POWER"] not in ("On", "Off"):
            raise WikiError(f"line {lineno}: POWER must be On or Off: {line!r}")
        for key in _COUNTS & attrs.keys():
            if not attrs[key].isdigit():
                raise WikiError(f"line {lineno}: {key} must be a whole number: {line!r}")
        if "OS" in attrs and not attrs["OS"]:
            raise WikiError(f"line {lineno}: empty OS in {line!r}")
        nodes[node] = attrs
    return nodes


# -- TORQUE ------------------------------------------------------------------------------------------
@dataclass
class Torque:
    """pbs_mom up/down per node, and the epilogue TORQUE runs when a job ends on a node."""

    epilogue: Sequence[str] | None = None  # argv prefix of the epilogue script
    epilogue_env: Callable[[str], dict[str, str]] = lambda node: {}  # per node (its own /etc)
    up: set[str] = field(default_factory=set)
    epilogue_runs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set_up(self, node: str, up: bool) -> None:
        with self._lock:
            (self.up.add if up else self.up.discard)(node)

    def is_up(self, node: str) -> bool:
        with self._lock:
            return node in self.up

    def job_ended(self, job_id: str, node: str, user: str = "alice") -> None:
        if not self.epilogue:
            return
        # TORQUE's epilogue arguments: job id, user, group, job name, session id, requested
        # limits, resources used, queue, account, exit code; a minimal root environment.
        argv = [*self.epilogue, job_id, user, "users", "job", "4242", "nodes=1,walltime=01:00:00",
                "cput=00:00:01,mem=1kb,vmem=1kb,walltime=00:00:02", "batch", "", "0"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               **self.epilogue_env(node)}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        self.epilogue_runs.append(proc)


# -- Moab ----------------------------------------------------------------------------------------------
@dataclass
class Call:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Job:
    id: str
    os: str | None
    state: str = "queued"  # queued, provisioning, running, done
    node: str | None = None


@dataclass
class ProvJob:
    """Moab's internal osprovision job on one node."""

    node: str
    os: str
    started: float
    job: str
    state: str = "running"  # running, done, failed
    error: str = ""


class MoabStandIn:
    """A test double of Moab Workload Manager, commercial software that cannot run here.

    See the module docstring for what it models. ``commands`` maps os-switch, cluster-query and
    node-power to argv prefixes (absolute, as NODEMODIFYURL=exec://... would be); ``env`` is what
    ``RMCFG[prov] ENV=`` gives them. ``query_file`` models ``CLUSTERQUERYURL=file://...``.
    """

    def __init__(self, commands: dict[str, Sequence[str]], env: dict[str, str], torque: Torque,
                 *, aggregate: bool = False, provduration: float = 600.0, timeout: float = 30.0,
                 childstderrcheck: bool = True, query_file: Path | None = None,
                 cwd: Path | None = None):
        self.commands = {k: list(v) for k, v in commands.items()}
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        self.torque = torque
        self.aggregate = aggregate
        self.provduration = provduration
        self.timeout = max(3.0, timeout)  # Moab's minimum RM timeout
        self.childstderrcheck = childstderrcheck
        self.query_file = query_file
        self.cwd = cwd or Path("/")
        self.jobs: dict[str, Job] = {}
        self.prov: list[ProvJob] = []
        self.reservations: dict[str, str] = {}  # node -> prov-fail reason
        self.calls: list[Call] = []
        self.view: dict[str, dict[str, str]] = {}
        self.errors: list[str] = []  # what Moab would log (copied stderr of failed calls)

    # -- the three URLs ---------------------------------------------------------------------------
    def _call(self, name: str, args: Sequence[str]) -> Call:
        argv = [*self.commands[name], *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                                  cwd=self.cwd, timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise ContractError(f"{name} {' '.join(args)} did not return within the RM "
                                f"TIMEOUT of {self.timeout} s") from exc
        call = Call(argv, proc.returncode, proc.stdout, proc.stderr)
        self.calls.append(call)
        return call

    def query(self) -> dict[str, dict[str, str]]:
        if self.query_file is not None:
            text = self.query_file.read_text()
        else:
            call = self._call("cluster-query", [])
            if call.returncode != 0:
                raise ContractError(f"cluster-query exited {call.returncode}: Moab marks the RM "
                                    f"corrupt\n{call.stderr}")
            text = call.stdout
        self.view = parse_wiki(text)
        return self.view

    def modify(self, nodes: Sequence[str], os_label: str) -> Call:
        call = self._call("os-switch", [",".join(nodes), "--set", f"OS={os_label}"])
        self._check_modify(call)
        return call

    def _check_modify(self, call: Call) -> None:
        if call.returncode == 4:
            raise ContractError(f"os-switch exited 4 (Moab restarts the RM): {call.stderr}")
        if call.returncode == 0 and self.childstderrcheck and "ERROR" in call.stderr:
            raise ContractError(f"os-switch printed ERROR on stderr with exit 0: {call.stderr}")
        if call.returncode != 0:
            self.errors.append(call.stderr.strip())

    def power(self, nodes: Sequence[str], verb: str) -> bool:
        """Moab's power call: it ignores the exit code and looks for ERROR on stdout."""
        call = self._call("node-power", [",".join(nodes), verb])
        failed = "ERROR" in call.stdout
        if failed:
            self.errors.append(call.stdout.strip())
        return not failed

    # -- scheduling ---------------------------------------------------------------------------------
    def submit(self, job_id: str, os_label: str | None = None) -> Job:
        if os_label is not None and self.view and not any(
                os_label in v.get("OSLIST", "").split(",") for v in self.view.values()):
            raise ValueError(f"msub: cannot set req attribute 'OperatingSystem' to {os_label}")
        job = Job(job_id, os_label)
        self.jobs[job_id] = job
        return job

    def _busy(self) -> set[str]:
        nodes = {j.node for j in self.jobs.values() if j.state in ("provisioning", "running")}
        return {n for n in nodes if n} | set(self.reservations)

    def iterate(self, now: float | None = None) -> None:
        """One scheduling iteration: poll, settle osprovision jobs, start or provision jobs."""
        now = time.time() if now is None else now
        view = self.query()
        for prov in [p for p in self.prov if p.state == "running"]:
            attrs = view.get(prov.node, {})
            job = self.jobs[prov.job]
            if (attrs.get("OS") == prov.os and self.torque.is_up(prov.node)
                    and attrs.get("POWER") != "Off"):
                prov.state = "done"
                job.state = "running"
            elif now - prov.started > self.provduration:
                prov.state, prov.error = "failed", attrs.get("MESSAGE", "")
                self.reservations[prov.node] = f"prov-fail: {prov.error}"
                job.state, job.node = "queued", None
        batches: dict[str, list[ProvJob]] = {}
        for job in [j for j in self.jobs.values() if j.state == "queued"]:
            busy = self._busy()
            free = [n for n, a in sorted(view.items()) if n not in busy
                    and a.get("STATE") == "Idle" and a.get("POWER") != "Off"]
            ready = [n for n in free if self.torque.is_up(n)
                     and (job.os is None or view[n].get("OS") == job.os)]
            if ready:
                job.state, job.node = "running", ready[0]
                continue
            if job.os is None:
                continue
            able = [n for n in free if job.os in view[n].get("OSLIST", "").split(",")]
            if not able:
                continue
            prov = ProvJob(able[0], job.os, now, job.id)
            job.state, job.node = "provisioning", prov.node
            self.prov.append(prov)
            if self.aggregate:
                batches.setdefault(job.os, []).append(prov)
            else:
                self._start_prov([prov])
        for provs in batches.values():
            self._start_prov(provs)

    def _start_prov(self, provs: list[ProvJob]) -> None:
        call = self.modify([p.node for p in provs], provs[0].os)
        if call.returncode != 0:
            failed = {ln.split(":", 1)[0] for ln in call.stderr.splitlines() if ":" in ln}
            for prov in provs:
                if prov.node in failed or not failed:
                    prov.state, prov.error = "failed", call.stderr.strip()
                    job = self.jobs[prov.job]
                    job.state, job.node = "queued", None

    def end_job(self, job_id: str) -> None:
        """The job finishes: TORQUE runs the epilogue on its node, then the node is free."""
        job = self.jobs[job_id]
        assert job.state == "running" and job.node, job
        self.torque.job_ended(job_id, job.node)
        job.state = "done"

    def run_until(self, done: Callable[[], bool], *, limit: float = 120.0,
                  pause: float = 0.2) -> None:
        """Iterate until ``done()`` (a bound, not a timing assertion)."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            self.iterate()
            if done():
                return
            time.sleep(pause)
        raise AssertionError(f"Moab stand-in: condition not reached within {limit} s; "
                             f"jobs={self.jobs} prov={self.prov} view={self.view}")


# -- the nodes' side of a boot ----------------------------------------------------------------------
@dataclass
class SimNode:
    name: str
    mac: str
    behaviour: str = "ok"  # ok | fail:<reason> | silent | stateful
    disk_os: str | None = None  # what a disk boot runs (a stateful install writes it)
    boots: list[str] = field(default_factory=list)  # "image:<label>" or "disk"


class NodeSimulator:
    """Plays the nodes: follows the virtual BMCs' journal and calls home like the initramfs."""

    def __init__(self, cfg: Any, journal: Path, nodes: Sequence[SimNode], torque: Torque):
        self.cfg = cfg
        self.journal = journal
        self.nodes = {n.name: n for n in nodes}
        self.torque = torque
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="node-sim", daemon=True)
        self.offset = 0
        self.errors: list[str] = []

    def __enter__(self) -> NodeSimulator:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def _loop(self) -> None:
        deadline = time.monotonic() + 900  # bounded whatever the test does
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - report to the test, keep simulating
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(0.05)

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
            node = self.nodes.get(event.get("bmc", ""))
            if node is None:
                continue
            kind = event.get("event")
            if kind in ("power-off", "soft-off"):
                self.torque.set_up(node.name, False)
            elif kind in ("power-on", "power-cycle", "reset"):
                self.torque.set_up(node.name, False)
                self.boot(node)

    def boot_file(self, node: SimNode) -> str:
        """What `pxe-stage serve` answers for the node's pxelinux config (from the database)."""
        from pxe.serve import files
        from pxe.serve.bootconfigs import BootConfigs

        configs = BootConfigs(self.cfg)  # one per call: boots come from several threads
        try:
            return (configs.lookup("pxelinux.cfg/01-" + node.mac.replace(":", "-")) or b"").decode()
        except files.Missing:
            return ""
        finally:
            configs.close()

    def boot(self, node: SimNode) -> None:
        """A PXE boot: the boot file our set-boot staged decides what runs."""
        text = self.boot_file(node)
        append = re.search(r"^\s*APPEND (.*)$", text, re.MULTILINE)
        if not append:  # LOCALBOOT: the disk
            node.boots.append("disk")
            if node.disk_os:
                self.torque.set_up(node.name, True)
            return
        args = dict(a.split("=", 1) for a in append.group(1).split() if "=" in a)
        label, token = args.get("dynprov.image", ""), args.get("dynprov.token")
        node.boots.append(f"image:{label}")
        if node.behaviour == "silent":
            return
        self.report(node.name, token, "booting", "initramfs up")
        if node.behaviour.startswith("fail:"):
            self.report(node.name, token, "failed", node.behaviour[5:])
            return
        if node.behaviour == "stateful":
            self.report(node.name, token, "installed", "rootfs written")
            node.disk_os = label
            # reboot -f: what boots next is what the boot file says once the run driver has
            # acted on "installed" (bounded; a node still pointed at the image would re-install)
            end = time.monotonic() + 30
            while "LOCALBOOT" not in self.boot_file(node) and time.monotonic() < end:
                time.sleep(0.05)
            if "LOCALBOOT" not in self.boot_file(node):
                self.errors.append(f"{node.name}: next boot still the network after installed")
                return
            node.boots.append("disk")  # the reboot into the installed system
        self.report(node.name, token, "ready", "")
        self.torque.set_up(node.name, True)

    def report(self, node: str, token: str | None, kind: str, detail: str) -> None:
        """What the server's call-home endpoint does with a node's POST (record, notify)."""
        from pxe import db
        from pxe.reports import record_report
        from pxe.serve.callhome import follow_up

        conn = db.connect(self.cfg.database)
        try:
            outcome = record_report(conn, node, token, kind, detail)
        finally:
            conn.close()
        follow_up(self.cfg, outcome)
