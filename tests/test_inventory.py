"""Inventory: nodes, MACs, IPs, node sets, CSV/YAML import and export."""

import threading

import pytest

from pxe.errors import InputError, NotFound
from pxe.inventory import Inventory, build, export, load_file, parse_csv

pytestmark = pytest.mark.unit


def node(cfg, name, mac, ip=None, **kw):
    return build(cfg, {"name": name, "mac": mac, "ip": ip, **kw})


def test_add_select_and_ranges(site):
    cfg = site.cfg
    inv = Inventory(cfg)
    inv.add([node(cfg, f"n{i:03d}", f"52:54:00:00:00:{i:02x}", f"198.18.0.{10 + i}")
             for i in range(1, 6)])
    assert [n.name for n in inv.select("n[002-004]")] == ["n002", "n003", "n004"]
    assert inv.get("n001").macs == ("52:54:00:00:00:01",)
    with pytest.raises(NotFound, match=r"n\[006-007\]"):
        inv.select("n[004-007]")


def test_duplicates_are_refused_and_nothing_changes(site):
    cfg = site.cfg
    inv = Inventory(cfg)
    inv.add([node(cfg, "n001", "52:54:00:00:00:01", "198.18.0.11")])
    with pytest.raises(InputError, match="already belongs to node n001"):
        inv.add([node(cfg, "n002", "52-54-00-00-00-01", "198.18.0.12")])
    with pytest.raises(InputError, match="already belongs to node n001"):
        inv.add([node(cfg, "n002", "52:54:00:00:00:02", "198.18.0.11")])
    with pytest.raises(InputError, match="already exists"):
        inv.add([node(cfg, "n001", "52:54:00:00:00:03")])
    # an all-or-nothing batch: the good n003 must not land because n004 clashes
    with pytest.raises(InputError):
        inv.add([node(cfg, "n003", "52:54:00:00:00:03"), node(cfg, "n004", "52:54:00:00:00:01")])
    assert inv.names() == ["n001"]


@pytest.mark.parametrize("ip,match", [("10.0.0.5", "outside the subnet"),
                                      ("198.18.0.150", "dynamic range"),
                                      ("198.18.0.1", "server"), ("198.18.0.300", "invalid IP")])
def test_ip_rules(site, ip, match):
    with pytest.raises(InputError, match=match):
        node(site.cfg, "n001", "52:54:00:00:00:01", ip)


def test_bmc_and_fields(site):
    with pytest.raises(InputError, match="needs a bmc_address"):
        node(site.cfg, "n001", "52:54:00:00:00:01", bmc_type="ipmi")
    with pytest.raises(InputError, match="unknown node field"):
        build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01", "password": "x"})
    n = node(site.cfg, "n001", "52:54:00:00:00:01", bmc_type="ipmi", bmc_address="127.0.0.1",
             bmc_port="6230", bmc_user="admin", bmc_secret="rack1", firmware="uefi",
             groups="compute,gpu")
    assert n.bmc_port == 6230 and n.groups == ("compute", "gpu")


def test_csv_yaml_import_export_round_trip(site, tmp_path):
    cfg = site.cfg
    csv_file = tmp_path / "nodes.csv"
    csv_file.write_text("name,mac,ip,firmware,bmc_type,bmc_address,groups\n"
                        "n001,AA-BB-CC-00-00-01,198.18.0.11,bios,ipmi,127.0.0.1,compute\n"
                        "n002,aabb.cc00.0002,198.18.0.12,uefi,wol,,\n")
    nodes = load_file(cfg, str(csv_file))
    inv = Inventory(cfg)
    inv.add(nodes)
    text = export(inv.all(), "yaml")
    yaml_file = tmp_path / "nodes.yaml"
    yaml_file.write_text(text)
    again = load_file(cfg, str(yaml_file))
    assert [n.public() for n in again] == [n.public() for n in nodes]
    assert [r["name"] for r in parse_csv(export(inv.all(), "csv"))] == ["n001", "n002"]


def test_import_error_names_the_entry(site, tmp_path):
    bad = tmp_path / "nodes.csv"
    bad.write_text("name,mac\nn001,52:54:00:00:00:01\nn/2,52:54:00:00:00:02\n")
    with pytest.raises(InputError, match=r"entry 2: invalid node name"):
        load_file(site.cfg, str(bad))


def test_concurrent_writers_do_not_lose_nodes(site):
    cfg = site.cfg
    errors = []

    def worker(k):
        try:
            inv = Inventory(cfg)
            for i in range(20):
                inv.add([node(cfg, f"w{k}n{i}", f"52:54:00:{k:02x}:00:{i:02x}")])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(Inventory(cfg).names()) == 80
