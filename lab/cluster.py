"""The virtual cluster: bring a lab up from a spec, report on it, tear it down (also after a crash).

The lab only plays the hardware: a namespace with a bridge (the provisioning network), one tap
and one QEMU VM per node, a virtual IPMI BMC or Redfish BMC or a Wake-on-LAN listener per node,
and an IPv6 router advertisement. Everything a real site runs comes from the product itself:
DHCP is dnsmasq reading the config ``pxe-stage render`` wrote, boot files are those set-boot
staged, TFTP/HTTP/call-home is ``pxe-stage serve``, and the nodes are registered in the inventory
like any admin would.

Processes: ``up`` creates the namespace and taps, registers and renders, then starts one
*supervisor* (``python -m lab.cluster supervise STATE``) inside the namespace. The supervisor
owns everything that runs: dnsmasq (restarted when the rendered config changes: dnsmasq does not
re-read its config on SIGHUP), serve, the BMCs, the WoL listener and the VMs. The state file
(``<state_dir>/lab/lab.json``) names every PID and path, so ``status``, ``console`` and ``down``
find everything, and ``down`` cleans up after a crash of anything, the supervisor included.
Product commands (``os-switch``, ``pxe-stage power``...) run inside the namespace
(``dynprov-lab exec -- CMD``): the BMCs listen on its loopback and WoL goes to its bridge.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab import netns
from pxe import atomic, validate
from pxe.config import Config
from pxe.errors import DynprovError, InputError, NotFound

log = logging.getLogger("lab")

STATE_VERSION = 1
SUPERVISOR_MARK = "lab.cluster"
POWER_KINDS = ("ipmi", "redfish", "wol")
BMC_USER = "admin"
SECRET_KEY = "lab"
IPMI_BASE_PORT = 6230
REDFISH_PORT = 8000


# -- the spec ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSpec:
    name: str
    mac: str
    ip: str
    firmware: str = "bios"     # bios | uefi
    power: str = "ipmi"        # ipmi | redfish | wol
    nic: str = "e1000"         # e1000 | virtio
    memory_mb: int = 512
    disk_mb: int = 0           # >0: a raw virtual disk (stateful images)
    bmc_port: int | None = None
    registered: bool = True    # false: a machine the site does not know (not in the inventory)

    @property
    def tap(self) -> str:
        return f"tap{self.name.replace('-', '')}"[:15]


@dataclass(frozen=True)
class LabSpec:
    netns: str = "dynprov-lab"
    nodes: tuple[NodeSpec, ...] = ()
    run_dir: str | None = None   # default /run/dynprov/<netns> (short: QMP socket paths)
    bmc_password: str = "lab-password"
    campus: bool = False         # a campus DHCP server (lab/campus.py) beside our proxyDHCP

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"/run/dynprov/{self.netns}")


def default_nodes() -> tuple[NodeSpec, ...]:
    """The demo's three nodes: IPMI + BIOS, Redfish + UEFI, Wake-on-LAN + BIOS."""
    return (
        NodeSpec("node1", "52:54:00:d7:00:01", "198.18.0.11", "bios", "ipmi"),
        NodeSpec("node2", "52:54:00:d7:00:02", "198.18.0.12", "uefi", "redfish"),
        NodeSpec("node3", "52:54:00:d7:00:03", "198.18.0.13", "bios", "wol"),
    )


def school_nodes() -> tuple[NodeSpec, ...]:
    """The school profile: three Wake-on-LAN workstations (two BIOS, one UEFI), no BMC."""
    return (
        NodeSpec("ws1", "52:54:00:5c:00:01", "198.18.0.21", "bios", "wol"),
        NodeSpec("ws2", "52:54:00:5c:00:02", "198.18.0.22", "bios", "wol"),
        NodeSpec("ws3", "52:54:00:5c:00:03", "198.18.0.23", "uefi", "wol"),
    )


PROFILES = ("cluster", "school")


def parse_spec(data: dict[str, Any], where: str = "lab spec") -> LabSpec:
    """A ``[lab]`` table (site config or a spec file), checked key by key. ``profile = "school"``:
    the school's workstations by default, and a campus DHCP server beside our proxyDHCP."""
    known = {"netns", "nodes", "run_dir", "bmc_password", "profile"}
    bad = set(data) - known
    if bad:
        raise InputError(f"{where}: unknown key(s) {', '.join(sorted(bad))} "
                         f"(known: {', '.join(sorted(known))})")
    profile = data.get("profile", "cluster")
    if profile not in PROFILES:
        raise InputError(f"{where}: profile must be one of {', '.join(PROFILES)}, "
                         f"got {profile!r}")
    nodes_raw = data.get("nodes")
    nodes: list[NodeSpec] = []
    if nodes_raw is None:
        nodes = list(school_nodes() if profile == "school" else default_nodes())
    else:
        if not isinstance(nodes_raw, list) or not nodes_raw:
            raise InputError(f"{where}: nodes must be a non-empty list of tables")
        fields = set(NodeSpec.__dataclass_fields__)
        for i, raw in enumerate(nodes_raw):
            if not isinstance(raw, dict):
                raise InputError(f"{where}: nodes[{i}] must be a table")
            extra = set(raw) - fields
            if extra:
                raise InputError(f"{where}: nodes[{i}]: unknown key(s) {', '.join(sorted(extra))}")
            try:
                node = NodeSpec(**raw)
                validate.hostname(node.name)
                node = NodeSpec(**{**raw, "mac": validate.mac(node.mac),
                                   "ip": validate.ipv4(node.ip)})
                validate.choice(node.firmware, validate.FIRMWARES, "firmware")
                validate.choice(node.power, POWER_KINDS, "power")
                validate.choice(node.nic, ("e1000", "virtio"), "nic")
            except (InputError, TypeError) as exc:
                raise InputError(f"{where}: nodes[{i}]: {exc}") from None
            nodes.append(node)
    names = [n.name for n in nodes]
    for what, values in (("name", names), ("mac", [n.mac for n in nodes]),
                         ("ip", [n.ip for n in nodes]), ("tap", [n.tap for n in nodes])):
        dup = {v for v in values if values.count(v) > 1}
        if dup:
            raise InputError(f"{where}: duplicate node {what}: {', '.join(sorted(dup))}")
    spec = LabSpec(netns=str(data.get("netns", LabSpec.netns)), nodes=tuple(nodes),
                   run_dir=data.get("run_dir"),
                   bmc_password=str(data.get("bmc_password", LabSpec.bmc_password)),
                   campus=profile == "school")
    netns.Netns(spec.netns)  # checks the name
    if len(str(spec.run_path)) > 60:
        raise InputError(f"{where}: run_dir {spec.run_path} is too long (unix socket paths)")
    return spec


def load_spec(cfg: Config, path: str | os.PathLike[str] | None = None,
              profile: str | None = None) -> LabSpec:
    if path is None:
        data, where = dict(cfg.raw.get("lab") or {}), f"{cfg.path} [lab]"
    else:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InputError(f"{path}: {exc}") from None
        data, where = dict(raw.get("lab", raw)), str(path)
    if profile is not None:
        data["profile"] = profile
    return parse_spec(data, where)


# -- the state file ------------------------------------------------------------------------------
def lab_dir(cfg: Config) -> Path:
    return cfg.paths.state_dir / "lab"


def state_path(cfg: Config) -> Path:
    return lab_dir(cfg) / "lab.json"


def serial_log(cfg: Config, node: str) -> Path:
    return lab_dir(cfg) / "serial" / f"{node}.log"


def read_state(cfg: Config) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(cfg).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DynprovError(f"{state_path(cfg)}: unreadable lab state ({exc}); "
                           "`dynprov-lab down` removes it") from None


def write_state(path: Path, state: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)


# -- up ----------------------------------------------------------------------------------------
def check_site(cfg: Config, spec: LabSpec) -> None:
    """The site's provisioning network must be the lab's bridge."""
    import netaddr

    if cfg.network.interface != "br0":
        raise InputError(f"{cfg.path}: network.interface must be br0 (the lab's bridge), "
                         f"not {cfg.network.interface}")
    net = netaddr.IPNetwork(cfg.network.subnet)
    if netaddr.IPAddress(cfg.network.server) not in netaddr.IPNetwork("198.18.0.0/15"):
        raise InputError(f"{cfg.path}: network.server must be in 198.18.0.0/15 for the lab")
    for node in spec.nodes:
        if netaddr.IPAddress(node.ip) not in net:
            raise InputError(f"lab node {node.name}: {node.ip} is outside {net}")
    if spec.campus and cfg.dhcp.mode != "proxy":
        raise InputError(f'{cfg.path}: the school profile keeps the campus DHCP server: set '
                         f'[dhcp] mode = "proxy"')
    redfish = [n.name for n in spec.nodes if n.power == "redfish"]
    scheme = (cfg.raw.get("power") or {}).get("redfish_scheme", "https")
    if redfish and scheme != "http":
        raise InputError(f"{cfg.path}: the lab's Redfish BMC ({', '.join(redfish)}) speaks plain "
                         f"http on the namespace's loopback; set [power] redfish_scheme = "
                         f'"http"')


def bmc_port(spec: LabSpec, node: NodeSpec) -> int:
    if node.bmc_port:
        return node.bmc_port
    return IPMI_BASE_PORT + [n.name for n in spec.nodes].index(node.name)


def register_nodes(cfg: Config, spec: LabSpec) -> list[str]:
    """Add the lab's nodes to the inventory (as an admin would); existing ones must match."""
    from pxe.inventory import Inventory, build

    inv = Inventory(cfg)
    have = {n.name: n for n in inv.all()}
    new = []
    for node in (n for n in spec.nodes if n.registered):
        raw: dict[str, Any] = {"name": node.name, "macs": [node.mac], "ip": node.ip,
                               "firmware": node.firmware, "bmc_type": node.power}
        if node.power == "ipmi":
            raw.update(bmc_address="127.0.0.1", bmc_port=bmc_port(spec, node),
                       bmc_user=BMC_USER, bmc_secret=SECRET_KEY)
        elif node.power == "redfish":
            raw.update(bmc_address="127.0.0.1", bmc_port=REDFISH_PORT, bmc_user=BMC_USER,
                       bmc_secret=SECRET_KEY)
        if node.name in have:
            if node.mac not in have[node.name].macs:
                raise InputError(f"node {node.name} is in the inventory with another MAC "
                                 f"({', '.join(have[node.name].macs)}); lab spec says {node.mac}")
            continue
        new.append(build(cfg, raw))
    if new:
        inv.add(new)
    ensure_secret(cfg, spec)
    return [n.name for n in new]


def ensure_secret(cfg: Config, spec: LabSpec) -> None:
    """The lab BMCs' password under key ``lab`` in the site's secrets file (TOML, mode 0600)."""
    path = cfg.paths.secrets_file
    entries: dict[str, Any] = {}
    if path.exists():
        try:
            entries = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise DynprovError(f"{path}: not valid TOML ({exc}); the lab adds key "
                               f"{SECRET_KEY!r} to it") from None
    entries[SECRET_KEY] = spec.bmc_password
    lines = [f"{json.dumps(k) if not k.replace('-', '').replace('_', '').isalnum() else k} = "
             f"{json.dumps(str(v))}" for k, v in entries.items()]
    atomic.write_text(path, "\n".join(lines) + "\n", mode=0o600)


def up(cfg: Config, spec: LabSpec, *, ready_timeout: float = 60.0) -> dict[str, Any]:
    """Bring the lab up; refuses when one is already up (or left over: run ``down``)."""
    check_site(cfg, spec)
    spath = state_path(cfg)
    with atomic.locked(lab_dir(cfg) / "lab.lock"):
        old = read_state(cfg)
        if old is not None:
            alive = pid_is_supervisor(old.get("supervisor"))
            raise DynprovError(
                f"a lab is already up (namespace {old.get('netns')}, state {spath}"
                + ("" if alive else "; its supervisor is gone: `dynprov-lab down` cleans up")
                + ")")
        if netns.exists(spec.netns):
            raise DynprovError(f"network namespace {spec.netns} already exists but no lab state "
                               f"is recorded for this site; remove it with "
                               f"`ip netns del {spec.netns}` if it is a leftover")
        from pxe.setboot import render_all

        registered = register_nodes(cfg, spec)
        render_all(cfg, reload=False)
        ns = netns.Netns(spec.netns, address=f"{cfg.network.server}/"
                         f"{cfg.network.subnet.split('/')[1]}", run_dir=spec.run_path)
        state: dict[str, Any] = {
            "version": STATE_VERSION, "netns": spec.netns, "bridge": ns.bridge,
            "address": ns.address, "run_dir": str(spec.run_path), "config": str(cfg.path),
            "created": time.time(), "supervisor": None, "ready": False, "services": {},
            "spec": {"netns": spec.netns, "run_dir": spec.run_dir,
                     "nodes": [asdict(n) for n in spec.nodes]},
            "nodes": [{**asdict(n), "tap": n.tap, "serial_log": str(serial_log(cfg, n.name)),
                       "pid_file": str(spec.run_path / f"{n.name}.pid"),
                       "bmc": bmc_endpoint(spec, n)} for n in spec.nodes],
            "registered": registered,
            "campus": spec.campus,
        }
        # Written before anything is created: a crash from here on is cleaned by `down`.
        write_state(spath, state)
        proc: subprocess.Popen | None = None
        try:
            spec.run_path.mkdir(parents=True, exist_ok=True)
            (lab_dir(cfg) / "serial").mkdir(parents=True, exist_ok=True)
            ns.create()
            for node in spec.nodes:
                ns.add_tap(node.tap)
                if node.disk_mb:
                    disk = lab_dir(cfg) / "disks" / f"{node.name}.img"
                    disk.parent.mkdir(parents=True, exist_ok=True)
                    if not disk.exists():
                        with open(disk, "wb") as fh:
                            fh.truncate(node.disk_mb * 1024 * 1024)
            env = {**os.environ, "DYNPROV_CONFIG": str(cfg.path)}
            argv = ns.argv([sys.executable, "-m", SUPERVISOR_MARK, "supervise", str(spath)])
            with open(lab_dir(cfg) / "supervisor.log", "ab") as out:
                # The supervisor records its own PID in the state file (one writer from now on).
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        env=env, start_new_session=True,
                                        cwd=str(Path(__file__).resolve().parents[2]))
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline:
                current = read_state(cfg) or {}
                if current.get("ready"):
                    return current
                if current.get("error"):
                    raise DynprovError(f"lab supervisor failed: {current['error']}")
                if proc.poll() is not None:
                    raise DynprovError("lab supervisor exited at start; see "
                                       f"{lab_dir(cfg) / 'supervisor.log'}")
                time.sleep(0.1)
            raise DynprovError(f"lab not ready within {ready_timeout:.0f} s; see "
                               f"{lab_dir(cfg) / 'supervisor.log'}")
        except BaseException:
            if proc is not None:
                netns.stop_pid(proc.pid, timeout=20)
            _down_locked(cfg)
            raise


def bmc_endpoint(spec: LabSpec, node: NodeSpec) -> str:
    if node.power == "ipmi":
        return f"ipmi 127.0.0.1:{bmc_port(spec, node)}"
    if node.power == "redfish":
        return f"redfish http://127.0.0.1:{REDFISH_PORT}/redfish/v1/Systems/{node.name}"
    return f"wol {node.mac}"


# -- down --------------------------------------------------------------------------------------
def pid_is_supervisor(pid: Any) -> bool:
    return isinstance(pid, int) and netns.pid_alive(pid) and any(
        SUPERVISOR_MARK in a for a in netns.cmdline_of(pid))


def down(cfg: Config) -> list[str]:
    with atomic.locked(lab_dir(cfg) / "lab.lock"):
        return _down_locked(cfg)


def _down_locked(cfg: Config) -> list[str]:
    """Stop everything the state file names (only processes that are really ours), then the
    namespace. Works after a crash of the supervisor or of ``up`` itself. Returns what it did."""
    try:
        state = read_state(cfg)
    except DynprovError as exc:
        state_path(cfg).unlink(missing_ok=True)
        return [f"removed an unreadable lab state ({exc}); check `ip netns list` for leftovers"]
    if state is None:
        raise NotFound(f"no lab is up for this site (no {state_path(cfg)})")
    done: list[str] = []
    sup = state.get("supervisor")
    if isinstance(sup, int) and pid_is_supervisor(sup):
        os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and netns.pid_alive(sup):
            time.sleep(0.1)
        netns.stop_pid(sup, expect=SUPERVISOR_MARK)
        done.append(f"stopped supervisor {sup}")
    # Leftovers of a crashed supervisor: each VM by its pid file, each service by its PID.
    from lab.qemu import MARK

    for node in state.get("nodes", []):
        try:
            pid = int(Path(node["pid_file"]).read_text().strip())
        except (OSError, ValueError, KeyError):
            continue
        if netns.stop_pid(pid, expect=f"{MARK}-{node['name']}"):
            done.append(f"stopped VM {node['name']} ({pid})")
    for name, svc in (state.get("services") or {}).items():
        pid, expect = svc.get("pid"), svc.get("expect")
        if isinstance(pid, int) and netns.stop_pid(pid, expect=expect):
            done.append(f"stopped {name} ({pid})")
    campus_ns = state.get("campus_netns")
    if isinstance(campus_ns, str) and campus_ns and netns.exists(campus_ns):
        netns.Netns(campus_ns).destroy()
        done.append(f"removed namespace {campus_ns}")
    ns_name = state.get("netns", "")
    if ns_name and netns.exists(ns_name):
        left = netns.Netns(ns_name).destroy()
        done.append(f"removed namespace {ns_name}"
                    + (f" (and {len(left)} leftover process(es))" if left else ""))
    run_dir = Path(state.get("run_dir") or "/nonexistent")
    if run_dir.is_dir() and str(run_dir).startswith("/run/dynprov/"):
        shutil.rmtree(run_dir, ignore_errors=True)
    elif run_dir.is_dir():
        for p in run_dir.glob("*"):
            if p.suffix in (".pid", ".qmp", ".log", ".leases") or p.name == "leases":
                with contextlib.suppress(OSError):
                    p.unlink()
    state_path(cfg).unlink(missing_ok=True)
    done.append("removed lab state")
    return done


# -- status ------------------------------------------------------------------------------------
def status(cfg: Config) -> dict[str, Any]:
    state = read_state(cfg)
    if state is None:
        return {"up": False}
    from lab.qemu import MARK

    nodes = []
    inv_state: dict[str, tuple[str, str, str]] = {}
    with contextlib.suppress(Exception):
        from pxe.inventory import Inventory

        for n in Inventory(cfg).all():
            inv_state[n.name] = (n.state, n.state_reason, n.current_os or "")
    for node in state.get("nodes", []):
        pid = None
        try:
            pid = int(Path(node["pid_file"]).read_text().strip())
        except (OSError, ValueError):
            pass
        on = bool(pid and netns.pid_alive(pid) and any(
            f"{MARK}-{node['name']}" in a for a in netns.cmdline_of(pid)))
        st, reason, cur = inv_state.get(node["name"], ("", "", ""))
        nodes.append({"name": node["name"], "power": "on" if on else "off",
                      "pid": pid if on else None, "firmware": node["firmware"],
                      "bmc": node["bmc"], "mac": node["mac"], "ip": node["ip"],
                      "os": cur, "state": st, "reason": reason,
                      "serial_log": node["serial_log"]})
    services = {name: {**svc, "alive": _is_ours(svc.get("pid"), svc.get("expect"))}
                for name, svc in (state.get("services") or {}).items()}
    return {"up": True, "netns": state["netns"], "namespace_exists": netns.exists(state["netns"]),
            "supervisor": state.get("supervisor"),
            "supervisor_alive": pid_is_supervisor(state.get("supervisor")),
            "ready": state.get("ready", False), "services": services, "nodes": nodes,
            "created": state.get("created")}


def _is_ours(pid: Any, expect: str | None) -> bool:
    return isinstance(pid, int) and netns.pid_alive(pid) and (
        expect is None or any(expect in a for a in netns.cmdline_of(pid)))


# -- the supervisor (runs inside the namespace) ------------------------------------------------
@dataclass
class Supervisor:
    cfg: Config
    spath: Path
    state: dict[str, Any]
    stop: threading.Event = field(default_factory=threading.Event)
    machines: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    dhcp_text: str = ""
    redfish_server: Any = None
    campus: Any = None

    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        write_state(self.spath, self.state)

    def _service(self, name: str, argv: list[str], expect: str) -> None:
        logf = open(lab_dir(self.cfg) / f"{name}.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True)
        finally:
            logf.close()
        self.procs[name] = proc
        services = dict(self.state.get("services") or {})
        services[name] = {"pid": proc.pid, "expect": expect, "argv": argv}
        self.save(services=services)

    def _stop_service(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            netns.stop_pid(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    # -- services ---------------------------------------------------------------------------
    def start_ra(self) -> None:
        run_dir = Path(self.state["run_dir"])
        self._service("ra", [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            f"--interface={self.state['bridge']}", "--bind-interfaces", "--enable-ra",
            f"--dhcp-range=::,constructor:{self.state['bridge']},ra-only,64,1h",
            "--dhcp-leasefile=/dev/null", "--user=root", f"--pid-file={run_dir / 'ra.pid'}",
        ], expect="dnsmasq")

    def start_campus(self) -> None:
        """The school profile's campus DHCP server (addresses only), before our proxyDHCP."""
        if not self.state.get("campus"):
            return
        from lab.campus import Campus

        self.campus = Campus(self.state["netns"], work=lab_dir(self.cfg) / "campus")
        self.save(campus_netns=self.campus.name)
        self.campus.start()
        services = dict(self.state.get("services") or {})
        services["campus-dhcpd"] = {"pid": self.campus.pid, "expect": "dhcpd",
                                    "argv": ["dhcpd", "-cf", str(self.campus.conf)]}
        self.save(services=services)

    def start_dhcp(self) -> None:
        """dnsmasq (or ISC dhcpd) with exactly the config `pxe-stage render` installed."""
        conf = self.cfg.dhcp.config_file
        self.dhcp_text = conf.read_text() if conf.exists() else ""
        run_dir = Path(self.state["run_dir"])
        if self.cfg.dhcp.backend == "dnsmasq":
            argv = ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--port=0",
                    f"--dhcp-leasefile={run_dir / 'leases'}", "--user=root", "--log-dhcp",
                    "--log-facility=-",
                    f"--pid-file={run_dir / 'dhcp.pid'}"]
        else:
            leases = run_dir / "dhcpd.leases"
            leases.touch()
            argv = ["dhcpd", "-f", "-4", "-cf", str(conf), "-lf", str(leases),
                    "-pf", str(run_dir / "dhcpd.pid"), self.state["bridge"]]
        self._service("dhcp", argv, expect=argv[0])

    def check_dhcp(self) -> None:
        """Restart DHCP when the rendered config changed (dnsmasq does not re-read it on HUP)."""
        conf = self.cfg.dhcp.config_file
        with contextlib.suppress(OSError):
            text = conf.read_text()
            proc = self.procs.get("dhcp")
            if text != self.dhcp_text or proc is None or proc.poll() is not None:
                log.info("DHCP config changed or daemon gone: restarting it")
                self._stop_service("dhcp")
                self.start_dhcp()

    def start_serve(self) -> None:
        """`pxe-stage serve` on the bridge address: TFTP, HTTP boot files, call-home."""
        argv = [sys.executable, "-m", "pxe.cli.main", "--config", str(self.cfg.path), "serve"]
        self._service("serve", argv, expect="pxe.cli.main")
        # Ready when its HTTP port answers (inside this namespace); bounded.
        import socket

        proc = self.procs["serve"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DynprovError(f"pxe-stage serve exited ({proc.returncode}); see "
                                   f"{lab_dir(self.cfg) / 'serve.log'}")
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.cfg.network.server, self.cfg.boot.http_port), timeout=0.5):
                return
            time.sleep(0.1)
        raise DynprovError("pxe-stage serve did not answer within 30 s")

    # -- hardware ---------------------------------------------------------------------------
    def build_machines(self) -> None:
        from lab.qemu import QemuMachine, VmSpec

        run_dir = Path(self.state["run_dir"])
        for node in self.state["nodes"]:
            disk = lab_dir(self.cfg) / "disks" / f"{node['name']}.img"
            spec = VmSpec(name=node["name"], mac=node["mac"], tap=node["tap"], run_dir=run_dir,
                          serial_log=Path(node["serial_log"]), firmware=node["firmware"],
                          nic=node["nic"], memory_mb=node["memory_mb"],
                          disk=disk if node.get("disk_mb") else None)
            self.machines[node["name"]] = QemuMachine(spec, on_event=self.power_event)

    def power_event(self, node: str, event: str, device: str) -> None:
        """Every power change of a VM, as the hardware saw it (the demo's progress reads it)."""
        line = json.dumps({"t": round(time.time(), 3), "node": node, "event": event,
                           "device": device}) + "\n"
        with open(lab_dir(self.cfg) / "power.jsonl", "a") as fh:
            fh.write(line)

    def start_bmcs(self) -> threading.Thread | None:
        ipmi = [n for n in self.state["nodes"] if n["power"] == "ipmi"]
        redfish = [n for n in self.state["nodes"] if n["power"] == "redfish"]
        password = _lab_password(self.cfg)
        threads = []
        if ipmi:
            from lab import vbmc

            bmc_class, _ = vbmc._build_classes()
            journal = vbmc.Journal(lab_dir(self.cfg) / "bmc-journal.jsonl")
            bmcs = []
            for n in ipmi:
                port = int(n["bmc"].rsplit(":", 1)[1])
                bmcs.append(bmc_class(n["name"], self.machines[n["name"]], BMC_USER, password,
                                      port, address="127.0.0.1", journal=journal))

            def loop() -> None:
                import pyghmi.ipmi.private.session as ipmisession

                while not self.stop.is_set():
                    ipmisession.Session.wait_for_rsp(vbmc.TICK)
                    vbmc.tick_all(bmcs)  # each VM's serial log into its SOL session

            threads.append(threading.Thread(target=loop, name="ipmi", daemon=True))
        if redfish:
            threads.append(self._redfish_thread(redfish, password))
        for t in threads:
            t.start()
        return threads[0] if threads else None

    def _redfish_thread(self, nodes: list[dict[str, Any]], password: str) -> threading.Thread:
        from lab import redfish_emulator

        machines = {n["name"]: self.machines[n["name"]] for n in nodes}
        server = redfish_emulator.make_server(machines, BMC_USER, password,
                                              address="127.0.0.1", port=REDFISH_PORT)

        def loop() -> None:
            server.serve_forever(poll_interval=0.5)

        t = threading.Thread(target=loop, name="redfish", daemon=True)
        self.redfish_server = server
        return t

    def start_wol(self) -> Any:
        from lab.wol_listener import WolListener

        by_mac = {n["mac"]: n["name"] for n in self.state["nodes"] if n["power"] == "wol"}
        if not by_mac:
            return None

        def wake(mac: str) -> None:
            name = by_mac.get(mac)
            if name:
                log.info("magic packet for %s: powering on %s", mac, name)
                self.machines[name].power_on()

        listener = WolListener(self.state["bridge"], wake)
        listener.start()
        return listener

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        self.save(supervisor=os.getpid())
        listener = None
        try:
            self.start_ra()
            self.start_campus()
            self.start_dhcp()
            self.start_serve()
            self.build_machines()
            self.start_bmcs()
            listener = self.start_wol()
            self.save(ready=True)
            for _ in range(10 ** 7):  # bounded: ~115 days at 1 s
                if self.stop.wait(1.0):
                    break
                self.check_dhcp()
        except Exception as exc:
            log.exception("supervisor failed")
            with contextlib.suppress(Exception):
                self.save(error=str(exc))
            return 1
        finally:
            if listener is not None:
                listener.stop()
            if self.redfish_server is not None:
                with contextlib.suppress(Exception):
                    self.redfish_server.shutdown()
            for machine in self.machines.values():
                with contextlib.suppress(Exception):
                    machine.power_off()
            for name in list(self.procs):
                self._stop_service(name)
            if self.campus is not None:
                with contextlib.suppress(Exception):
                    self.campus.stop()
        return 0


def _lab_password(cfg: Config) -> str:
    try:
        value = tomllib.loads(cfg.paths.secrets_file.read_text()).get(SECRET_KEY)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DynprovError(f"{cfg.paths.secrets_file}: {exc}") from None
    if not isinstance(value, str) or not value:
        raise DynprovError(f"{cfg.paths.secrets_file}: no {SECRET_KEY!r} entry")
    return value


def supervise(spath: Path) -> int:
    from pxe import config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s lab: %(message)s",
                        stream=sys.stderr)
    state = json.loads(spath.read_text())
    cfg = config.load(state["config"])
    return Supervisor(cfg, spath, state).run()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "supervise":
        sys.exit(supervise(Path(sys.argv[2])))
    print("usage: python -m lab.cluster supervise STATE_FILE", file=sys.stderr)
    sys.exit(2)
