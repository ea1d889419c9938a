"""Helpers for the provisioning-run and Moab tests (no tests here): a site with nodes behind
virtual IPMI BMCs on 127.0.0.1, images, the commands as Moab would call them, and a clean stop of
the run driver the commands start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moab_standin import NodeSimulator, SimNode, Torque
from test_power_support import add_nodes, dead_udp_ports, ipmi_rows, power_config, vbmc

from pxe import db
from pxe.config import Config
from pxe.images import Catalog
from tests.conftest import ROOT, Site, fake_bzimage

COMMANDS = {"os-switch": "msm_plugin.os_switch", "cluster-query": "msm_plugin.cluster_query",
            "node-power": "msm_plugin.node_power", "fg-moab": "msm_plugin.fg_moab"}
EPILOGUE = ROOT / "contrib" / "torque" / "epilogue"


def argv(cmd: str) -> list[str]:
    """The command as an absolute argv (what an exec:// URL would name)."""
    return [sys.executable, "-m", COMMANDS[cmd]]


def configure(site: Site, *, moab: dict[str, Any] | None = None, **power: Any) -> Config:
    """[power] (fast failure on dead BMCs) and [moab] sections, the BMC secrets file."""
    power = {"timeout": 1.0, "retries": 0, **power}
    if moab:
        with open(site.config_path, "a") as fh:
            fh.write("\n[moab]\n" + "".join(
                f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n"
                for k, v in moab.items()))
    return power_config(site, **power)


def add_images(cfg: Config, tmp: Path, **labels: dict[str, Any]) -> None:
    """Images by label, e.g. add_images(cfg, tmp, centos5={}, sles11={"prov_seconds": 2})."""
    kernel = fake_bzimage(tmp / "vmlinuz-test", os.urandom(512))
    rootfs = tmp / "rootfs.tar"
    rootfs.write_bytes(b"root filesystem")
    cat = Catalog(cfg)
    for label, opts in labels.items():
        opts = dict(opts)
        if opts.get("mode") == "stateful":
            opts.setdefault("rootfs", rootfs)
        cat.add(label, kernel, **opts)


def node_rows(ports: Sequence[int], prefix: str = "n") -> list[dict[str, Any]]:
    return ipmi_rows(prefix, list(ports))


@dataclass
class Cluster:
    cfg: Config
    site: Site
    names: list[str]
    sim: NodeSimulator
    torque: Torque
    journal: Path

    @property
    def env(self) -> dict[str, str]:
        """What RMCFG[prov] ENV= gives our commands (and the tests' PYTHONPATH, if any, so the
        commands run the code under test, not another installed copy)."""
        env = {"DYNPROV_CONFIG": str(self.site.config_path)}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env

    def node(self, name: str) -> SimNode:
        return self.sim.nodes[name]


@contextlib.contextmanager
def cluster(site: Site, tmp: Path, count: int, *, behaviours: dict[str, str] | None = None,
            dead: Sequence[str] = (), images: dict[str, dict[str, Any]] | None = None,
            moab: dict[str, Any] | None = None) -> Iterator[Cluster]:
    """``count`` nodes n001.. behind virtual BMCs (``dead`` ones point at a port nobody serves),
    a node simulator following the BMC journal, and the run driver stopped at the end."""
    cfg = configure(site, moab=moab)
    add_images(cfg, tmp, **(images or {"centos5": {}, "sles11": {}}))
    names = [f"n{i:03d}" for i in range(1, count + 1)]
    nodeset = f"n[001-{count:03d}]" if count > 1 else "n001"
    with vbmc(tmp, nodeset, count) as bmcs:
        base = bmcs.base_port  # type: ignore[attr-defined]
        ports = [base + i for i in range(count)]
        spare = iter(dead_udp_ports(max(1, len(dead))))
        ports = [next(spare) if name in dead else port for name, port in zip(names, ports, strict=True)]
        rows = node_rows(ports)
        add_nodes(cfg, rows)
        for name in names:  # each node's own /etc/dynprov/epilogue.conf
            (tmp / f"epilogue-{name}.conf").write_text(
                f"FG_MOAB={' '.join(argv('fg-moab'))}\nCONFIG={site.config_path}\n"
                f"NODE={name}\n")
        torque = Torque(epilogue=[str(EPILOGUE)], epilogue_env=lambda node: {
            "DYNPROV_EPILOGUE_CONF": str(tmp / f"epilogue-{node}.conf")})
        sims = [SimNode(r["name"], r["mac"], (behaviours or {}).get(r["name"], "ok"))
                for r in rows]
        assert bmcs.journal is not None
        sim = NodeSimulator(cfg, bmcs.journal, sims, torque)
        with sim:
            try:
                yield Cluster(cfg, site, names, sim, torque, bmcs.journal)
            finally:
                stop_runs(cfg)
        assert not sim.errors, sim.errors


def stop_runs(cfg: Config, limit: float = 30.0) -> None:
    """Cancel every run still open and wait (bounded) for the driver to exit by itself."""
    from pxe import run

    conn = db.connect(cfg.database)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM nodes")]
        if names:
            run.cancel(cfg, conn, names)
    finally:
        conn.close()
    end = time.monotonic() + limit
    while run.driver_running(cfg) and time.monotonic() < end:
        time.sleep(0.1)
    assert not run.driver_running(cfg), "the run driver did not exit after its runs ended"


@contextlib.contextmanager
def driver_held(cfg: Config) -> Iterator[None]:
    """Hold the driver's lock: requests are recorded but no driver starts (deterministic)."""
    path = cfg.paths.state_dir / "run-driver.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def wait_for(cond: Any, limit: float = 60.0, pause: float = 0.1) -> None:
    """Poll ``cond()`` until true; a bound, not a timing assertion."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(pause)
    raise AssertionError(f"condition not reached within {limit} s")


def run_nodes(cfg: Config) -> list[dict[str, Any]]:
    conn = db.connect(cfg.database)
    try:
        return [dict(r) for r in conn.execute(
            "SELECT rn.*, r.label FROM run_nodes rn JOIN runs r ON r.id = rn.run_id "
            "ORDER BY rn.run_id, rn.node")]
    finally:
        conn.close()


def node_row(cfg: Config, name: str) -> dict[str, Any]:
    conn = db.connect(cfg.database)
    try:
        row = conn.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        return dict(row)
    finally:
        conn.close()
