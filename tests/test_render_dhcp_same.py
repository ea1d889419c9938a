"""The DHCP renderer's fast path writes byte for byte what the renderer before it wrote.

The reference is the templates as they were before their per-host loops were reshaped
(tests/data/dhcp-reference/, copied unchanged) rendered the old way: plain Jinja, one DhcpHost
per node with MACs as ``hosts``. A varied inventory (BIOS/UEFI, x86_64/aarch64, groups, pools,
several MACs, no IP, names whose order differs from their MACs') and every config shape the
templates branch on (ISC, dnsmasq, dnsmasq proxy with and without unknown MACs, iPXE over HTTP
on and off, gateway and DNS set or not) go through both the Node path and the Snapshot path
that `render` takes.
"""

from __future__ import annotations

import random
from pathlib import Path

import jinja2
import pytest

from pxe import dhcpinputs
from pxe.dhcpinputs import DhcpHost
from pxe.inventory import Inventory, build
from pxe.render import Renderer
from tests.conftest import make_site

REFERENCE = Path(__file__).parent / "data" / "dhcp-reference"
TEMPLATE = {("isc", "server"): "dhcpd.conf.j2", ("dnsmasq", "server"): "dnsmasq.conf.j2",
            ("dnsmasq", "proxy"): "dnsmasq-proxy.conf.j2"}


def site_for(tmp_path: Path, backend: str, mode: str, ipxe_http: bool, extras: bool):
    site = make_site(tmp_path / "s", backend=backend)
    text = site.config_path.read_text()
    if extras:
        text = text.replace('dynamic_range = ["198.18.0.100", "198.18.0.200"]',
                            'dynamic_range = ["198.18.0.100", "198.18.0.200"]\n'
                            'gateway = "198.18.0.254"\ndns = "198.18.0.253"', 1)
    text = text.replace(f'backend = "{backend}"', f'backend = "{backend}"\nmode = "{mode}"'
                        + ("\nproxy_unknown = true" if extras and mode == "proxy" else ""), 1)
    if mode != "proxy":
        text += f"\n[boot]\nipxe_http = {'true' if ipxe_http else 'false'}\n"
    site.config_path.write_text(text)
    return site.cfg


def varied_nodes(cfg, count: int = 240):
    rng = random.Random(18)
    conn = Inventory(cfg).conn
    conn.execute("INSERT INTO pools(name, created) VALUES ('gpu', 0)")
    conn.commit()
    raw = [
        {"name": "a-1", "mac": "52:54:00:00:00:09", "ip": "198.18.0.9"},
        {"name": "a1", "mac": "52:54:00:00:00:01"},  # no IP; sorts after a-1, its MAC before
        {"name": "b", "macs": ["52:54:00:00:00:03", "52:54:00:00:00:02", "52:54:00:00:00:04"],
         "firmware": "uefi", "arch": "aarch64", "groups": "gpu,ib", "pool": "gpu"},
    ]
    for i in range(count):
        raw.append({
            "name": f"n{rng.randrange(10_000):04d}x{i}",
            "macs": [f"52:54:01:{i >> 8:02x}:{i & 255:02x}:{k:02x}"
                     for k in range(1 + (rng.random() < 0.2) * rng.randrange(1, 4))],
            "ip": f"198.18.0.{10 + i}" if i < 80 and rng.random() < 0.8 else None,
            "firmware": rng.choice(("bios", "uefi")),
            "arch": rng.choice(("x86_64", "x86_64", "aarch64")),
            "groups": ",".join(rng.sample(("gpu", "ib", "bigmem"), rng.randrange(0, 3))),
            "pool": rng.choice(("hpc", "gpu")),
        })
    nodes = [build(cfg, r) for r in raw]
    Inventory(cfg).add(nodes)
    return Inventory(cfg).all()


def reference(cfg, renderer: Renderer, nodes) -> str:
    """The renderer before: the unchanged templates, every node as a DhcpHost in ``hosts``."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(REFERENCE),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True, trim_blocks=False)
    hosts = [DhcpHost.of(n) for n in nodes if n.macs]
    return env.get_template(TEMPLATE[cfg.dhcp.backend, cfg.dhcp.mode]).render(
        net=renderer.net, boot=cfg.boot, hosts=hosts, dhcp=cfg.dhcp)


@pytest.mark.unit
@pytest.mark.parametrize("backend,mode,ipxe_http,extras", [
    ("isc", "server", True, False), ("isc", "server", False, True),
    ("dnsmasq", "server", True, True), ("dnsmasq", "server", False, False),
    ("dnsmasq", "proxy", False, False), ("dnsmasq", "proxy", False, True),
])
def test_the_dhcp_config_is_byte_identical_to_the_renderer_before(tmp_path, backend, mode,
                                                                   ipxe_http, extras):
    cfg = site_for(tmp_path, backend, mode, ipxe_http, extras)
    nodes = varied_nodes(cfg)
    renderer = Renderer(cfg)
    expected = reference(cfg, renderer, nodes)
    assert "52:54:00:00:00:04" in expected and "a-1" in expected  # the inventory is in it
    assert renderer.dhcp_config(nodes) == expected
    # What `render` renders: the snapshot of the nodes' DHCP facts read from the database.
    snapshot = dhcpinputs.read(Inventory(cfg).conn, "")
    assert Renderer(cfg).dhcp_config(snapshot) == expected
    assert Renderer(cfg).dhcp_config(snapshot.hosts()) == expected


@pytest.mark.unit
def test_an_override_looping_over_hosts_sees_every_dhcp_fact(tmp_path):
    """Site overrides written against ``hosts`` (h.name, h.macs, h.groups ...) keep working."""
    cfg = site_for(tmp_path, "isc", "server", True, False)
    nodes = varied_nodes(cfg, count=20)
    override = cfg.paths.templates_dir / "dhcp" / "dhcpd.conf.j2"
    override.parent.mkdir(parents=True)
    override.write_text("{{ hosts | length }}\n{% for h in hosts %}{{ h.name }} {{ h.macs | "
                        "join(',') }} {{ h.ip }} {{ h.arch }} {{ h.firmware }} {{ h.groups | "
                        "join(',') }} {{ h.pool }} {{ h.bmc_type }}\n{% endfor %}")
    expected = [str(len(nodes))] + [
        f"{n.name} {','.join(n.macs)} {n.ip} {n.arch} {n.firmware} {','.join(n.groups)} "
        f"{n.pool} {n.bmc_type}" for n in nodes]
    snapshot = dhcpinputs.read(Inventory(cfg).conn, "")
    assert Renderer(cfg).dhcp_config(snapshot).splitlines() == expected
    assert Renderer(cfg).dhcp_config(nodes).splitlines() == expected
