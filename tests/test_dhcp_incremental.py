"""A DHCP change costs the changed hosts (pxe.dhcpincremental, pxe.db migration 9): after any
sequence of node changes the incrementally installed file is byte for byte what a full render
writes, the daemon (real dhcpd -t / dnsmasq --test) checks the header and footer with only the
changed entries, and what it rejects is not installed. On the site's store: SQLite, or
PostgreSQL under DYNPROV_TEST_STATE=postgresql.

The daemon's check goes through `[dhcp] check_command`: a script that logs how many host
entries the checked file holds, then runs the real check on it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pxe import db, dhcpincremental, dhcpinputs, dhcpstep, records, segments
from pxe.errors import DynprovError
from pxe.inventory import Inventory, build
from pxe.render import Renderer
from pxe.setboot import render_all, set_boot
from tests.conftest import make_site
from tests.test_dhcp_generation import FACT_WRITES, _site

SBIN = "/usr/sbin:/usr/bin"
SHAPES = {"isc": ("isc", "server"), "dnsmasq": ("dnsmasq", "server"),
          "dnsmasq-proxy": ("dnsmasq", "proxy"), "isc-override": ("isc", "server")}


def checked_site(tmp_path: Path, shape: str, nodes: int = 30):
    """A site of ``shape`` whose daemon check logs the host entries it was given."""
    backend, mode = SHAPES[shape]
    daemon = shutil.which("dhcpd" if backend == "isc" else "dnsmasq", path=SBIN)
    if daemon is None:
        pytest.skip(f"{backend}'s daemon is installed by tools/install-deps")
    site = make_site(tmp_path / "s", backend=backend)
    log = tmp_path / "checked.log"
    script = tmp_path / "check-dhcp"
    run = (f'exec {daemon} -t -q -4 -cf "$1"' if backend == "isc"
           else f'exec {daemon} --test --conf-file="$1"')
    script.write_text("#!/bin/sh\n"
                      f"grep -c -E '^(host |dhcp-host=)' \"$1\" >> {log}\n{run}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    text = site.config_path.read_text().replace(
        f'backend = "{backend}"',
        f'backend = "{backend}"\nmode = "{mode}"\ncheck_command = ["{script}"]', 1)
    site.config_path.write_text(text)
    cfg = site.cfg
    if shape.endswith("-override"):  # a site override (same output): spliced with jinja2
        packaged = Renderer(cfg).template("dhcp/dhcpd.conf.j2").source.path.read_text()
        override = cfg.paths.templates_dir / "dhcp" / "dhcpd.conf.j2"
        override.parent.mkdir(parents=True)
        override.write_text(packaged)
    Inventory(cfg).add([build(cfg, {"name": f"n{i:03d}", "mac": _mac(i),
                                    "ip": f"198.18.0.{i + 1}"}) for i in range(1, nodes + 1)])
    return site, log


def _mac(i: int) -> str:
    return f"52:54:00:ee:{i >> 8:02x}:{i & 255:02x}"


def checked(log: Path) -> list[int]:
    """Host entries in each file the daemon checked, in order."""
    return [int(n) for n in log.read_text().split()] if log.exists() else []


def full_render(cfg, segment: str = "") -> str:
    conn = Inventory(cfg).conn
    return Renderer(cfg).dhcp_config(dhcpinputs.read(conn, segment))


def entries(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(("host ", "dhcp-host=")))


class Changes:
    """Random DHCP-facts changes (seeded), each one a way the facts really change."""

    def __init__(self, cfg, seed: int):
        self.cfg, self.rng, self.next_mac, self.next_ip = cfg, random.Random(seed), 1000, 40

    def names(self) -> list[str]:
        return sorted(n.name for n in Inventory(self.cfg).all())

    def mac(self) -> str:
        self.next_mac += 1
        return _mac(self.next_mac)

    def replace(self, name: str, **facts) -> None:
        inv = Inventory(self.cfg)
        inv.add([records.replace(inv.get(name), **facts)], replace_existing=True)

    def raw(self, *statements: tuple[str, tuple]) -> None:
        conn = Inventory(self.cfg).conn
        with db.transaction(conn):
            for sql, args in statements:
                conn.execute(sql, args)

    def one(self) -> str:
        rng, names = self.rng, self.names()
        victim = rng.choice(names)
        what = rng.choice(["mac", "add", "remove", "rename", "ip", "no ip", "macs", "segment",
                           "back", "no mac", "groups"])
        if what == "mac":
            self.replace(victim, macs=(self.mac(),))
        elif what == "add":
            name = rng.choice(["a", "n", "z"]) + f"{rng.randrange(1000):03d}x"
            if name not in names:
                Inventory(self.cfg).add([build(self.cfg, {"name": name, "mac": self.mac()})])
        elif what == "remove" and len(names) > 5:
            Inventory(self.cfg).remove([victim])
        elif what == "rename":
            new = victim + "r"
            if new not in names:
                macs = Inventory(self.cfg).get(victim).macs
                self.raw(("DELETE FROM macs WHERE node = ?", (victim,)),
                         ("DELETE FROM node_segments WHERE node = ?", (victim,)),
                         ("UPDATE nodes SET name = ? WHERE name = ?", (new, victim)),
                         *(("INSERT INTO macs(mac, node, idx) VALUES (?, ?, ?)", (m, new, i))
                           for i, m in enumerate(macs)))
        elif what == "ip":
            self.next_ip += 1  # below the dynamic range, each address once
            self.replace(victim, ip=f"198.18.0.{self.next_ip}")
        elif what == "no ip":
            self.replace(victim, ip=None)
        elif what == "macs":
            self.replace(victim, macs=tuple(self.mac() for _ in range(rng.randrange(2, 4))))
        elif what == "segment":
            segments.assign(Inventory(self.cfg).conn, [victim], "rack1")
        elif what == "back":
            segments.assign(Inventory(self.cfg).conn, [victim], "")
        elif what == "no mac":
            self.raw(("DELETE FROM macs WHERE node = ?", (victim,)))
        elif what == "groups":
            self.replace(victim, groups=("gpu",))
        return what


@pytest.mark.integration
@pytest.mark.parametrize("shape", SHAPES)
def test_any_sequence_of_changes_installs_what_a_full_render_writes(tmp_path, shape):
    site, log = checked_site(tmp_path, shape)
    cfg = site.cfg
    assert render_all(cfg, reload=False).dhcp_changed
    assert checked(log) == [30]  # the first render: every entry
    formats = "format" in json.loads(dhcpinputs.index_path(cfg).read_text())
    assert formats == (not shape.endswith("-override"))  # packaged: no jinja2 to splice
    changes = Changes(cfg, seed=18)
    done, incremental = [], 0
    for step in range(24):  # bounded: 24 renders of 1-3 changes each
        done += [changes.one() for _ in range(changes.rng.randrange(1, 4))]
        before = len(checked(log))
        if step % 2:  # the early path of `set-boot --render`, every other step
            inv = Inventory(cfg)
            with dhcpstep.early_start(cfg, inv.conn) as early:
                set_boot(cfg, inv.all()[0].name, None, inv)
                render_all(cfg, reload=False, inventory=inv, early=early)
        else:
            render_all(cfg, reload=False)
        want = full_render(cfg)
        assert cfg.dhcp.config_file.read_text() == want, f"after {done}"
        new = checked(log)[before:]
        assert len(new) <= 1  # at most one check per render
        if new and new[0] < entries(want):
            incremental += 1
        assert dhcpinputs.installed(cfg, dhcpinputs.generation(Inventory(cfg).conn), "")
    assert incremental >= 12, (incremental, checked(log))  # the short path, not the full one
    assert sum(checked(log)[1:]) < 24 * 6  # the checks held the changed entries only


@pytest.mark.integration
def test_the_other_segment_and_a_second_segment_file_stay_exact(tmp_path):
    """`render --segment rack1` (its own record) moves nodes in and out incrementally too."""
    site, log = checked_site(tmp_path, "isc")
    cfg = site.cfg
    conn = Inventory(cfg).conn
    segments.assign(conn, ["n003", "n010"], "rack1")
    render_all(cfg, reload=False, segment="rack1")
    assert cfg.dhcp.config_file.read_text() == full_render(cfg, "rack1")
    segments.assign(conn, ["n020"], "rack1")
    segments.assign(conn, ["n003"], "")
    render_all(cfg, reload=False, segment="rack1")
    text = cfg.dhcp.config_file.read_text()
    assert text == full_render(cfg, "rack1") and entries(text) == 2
    assert checked(log) == [2, 1]  # n020 entered: its entry alone was checked


@pytest.mark.integration
def test_a_rejected_entry_installs_nothing(tmp_path):
    site, log = checked_site(tmp_path, "isc")
    cfg = site.cfg
    packaged = Renderer(cfg).template("dhcp/dhcpd.conf.j2").source.path.read_text()
    override = cfg.paths.templates_dir / "dhcp" / "dhcpd.conf.j2"
    override.parent.mkdir(parents=True)
    override.write_text(packaged.replace('option host-name "{{ name }}"; }',
                                         'option host-name "{{ name }}"; '
                                         '{% if name == "bad" %}not dhcpd syntax;{% endif %}}'))
    render_all(cfg, reload=False)
    good, stamp = cfg.dhcp.config_file.read_text(), dhcpinputs.stamp_path(cfg).read_text()
    Inventory(cfg).add([build(cfg, {"name": "bad", "mac": "52:54:00:ee:ff:01"})])
    with pytest.raises(DynprovError, match="rejected the rendered config"):
        render_all(cfg, reload=False)
    assert checked(log) == [30, 1]  # the rejected check held the one new entry
    assert cfg.dhcp.config_file.read_text() == good
    assert dhcpinputs.stamp_path(cfg).read_text() == stamp
    Inventory(cfg).remove(["bad"])
    Inventory(cfg).add([build(cfg, {"name": "good", "mac": "52:54:00:ee:ff:02"})])
    render_all(cfg, reload=False)
    assert cfg.dhcp.config_file.read_text() == full_render(cfg)
    assert checked(log) == [30, 1, 1]


@pytest.mark.integration
def test_an_override_without_the_hosts_block_always_renders_in_full(tmp_path):
    site, log = checked_site(tmp_path, "dnsmasq")
    cfg = site.cfg
    packaged = Renderer(cfg).template("dhcp/dnsmasq.conf.j2").source.path.read_text()
    override = cfg.paths.templates_dir / "dhcp" / "dnsmasq.conf.j2"
    override.parent.mkdir(parents=True)
    override.write_text(packaged.replace("{% block hosts %}", "").replace("{% endblock %}", ""))
    render_all(cfg, reload=False)
    Changes(cfg, seed=1).replace("n005", macs=("52:54:00:ee:ff:05",))
    render_all(cfg, reload=False)
    assert cfg.dhcp.config_file.read_text() == full_render(cfg)
    assert checked(log) == [30, 30]


@pytest.mark.integration
def test_too_many_changes_or_a_changed_file_render_in_full(tmp_path):
    site, log = checked_site(tmp_path, "isc")
    cfg = site.cfg
    render_all(cfg, reload=False)
    changes = Changes(cfg, seed=2)
    for name in [f"n{i:03d}" for i in range(1, dhcpincremental.cutoff(30) + 2)]:
        changes.replace(name, ip=None)  # one more than the cut-off
    render_all(cfg, reload=False)
    changes.replace("n030", ip=None)
    cfg.dhcp.config_file.write_text(cfg.dhcp.config_file.read_text() + "# hand edit\n")
    render_all(cfg, reload=False)
    assert cfg.dhcp.config_file.read_text() == full_render(cfg)
    changes.replace("n029", ip=None)
    render_all(cfg, reload=False)
    assert cfg.dhcp.config_file.read_text() == full_render(cfg)
    assert checked(log) == [30, 30, 30, 1]


@pytest.mark.unit
@pytest.mark.parametrize("what", FACT_WRITES)
def test_every_dhcp_facts_write_records_the_names_it_touched(site, tmp_path, what):
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    seq = dhcpinputs.change_number(conn)
    FACT_WRITES[what](cfg, conn)
    names = dhcpinputs.changed_since(conn, seq, 100)
    assert names and dhcpinputs.change_number(conn) > seq
    assert set(names) <= {"n01", "n02", "n03", "n09"}, names


@pytest.mark.unit
def test_set_boot_records_no_change_and_the_table_keeps_one_row_per_name(site, tmp_path):
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    seq = dhcpinputs.change_number(conn)
    set_boot(cfg, "n0[1-3]", "centos5", Inventory(cfg, conn))
    assert dhcpinputs.changed_since(conn, seq, 100) == []
    for _ in range(3):
        Inventory(cfg, conn).remove(["n02"])
        Inventory(cfg, conn).add([build(cfg, {"name": "n02", "mac": "52:54:00:dd:00:02"})])
    rows = conn.execute("SELECT node, COUNT(*) FROM dhcp_changes GROUP BY node").fetchall()
    assert sorted(tuple(r) for r in rows) == [("n01", 1), ("n02", 1), ("n03", 1)]
    assert dhcpinputs.changed_since(conn, seq, 100) == ["n02"]
    assert dhcpinputs.changed_since(conn, seq, 0) is None  # more than the limit: None


@pytest.mark.integration
@pytest.mark.parametrize("shape", ["isc", "dnsmasq"])
def test_an_incremental_change_does_not_import_jinja2(tmp_path, shape):
    """The packaged templates' entries are spliced from pxe.dhcpformat's verified formats."""
    site, log = checked_site(tmp_path, shape)
    cfg = site.cfg
    render_all(cfg, reload=False)
    Changes(cfg, seed=3).replace("n007", macs=("52:54:00:ee:ff:07", "52:54:00:ee:ff:08"))
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pxe.cli.main", "render",
                           "--no-reload"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "pxe.dhcpformat" in imported and "jinja2" not in imported
    assert cfg.dhcp.config_file.read_text() == full_render(cfg)
    assert checked(log) == [30, 2 if shape == "isc" else 1]  # ISC: one entry per MAC


@pytest.mark.integration
def test_a_change_number_gone_backwards_renders_in_full(tmp_path):
    """A database whose change log is older than the installed file (a restored backup) is not
    trusted to name every change: the whole file is rendered."""
    site, log = checked_site(tmp_path, "isc")
    cfg = site.cfg
    render_all(cfg, reload=False)
    changes = Changes(cfg, seed=4)
    changes.replace("n002", ip=None)
    changes.raw(("DELETE FROM dhcp_changes", ()))  # the log as a backup older than the file has it
    changes.replace("n004", ip=None)  # number 1 again, below the record's
    render_all(cfg, reload=False)
    assert cfg.dhcp.config_file.read_text() == full_render(cfg)
    assert checked(log) == [30, 30]
