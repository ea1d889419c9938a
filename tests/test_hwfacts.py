"""Hardware facts: dp_facts (busybox sh) on fake /proc and /sys trees, the bounded parser, the
call-home carrying them into a real `pxe-stage serve` on loopback, `nodes show`, the faces'
resources and the schema upgrade."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from initramfs_support import bbsh, busybox_path
from moab_standin import parse_wiki

from pxe import db, hwfacts
from pxe.inventory import Inventory
from tests.conftest import Site
from tests.test_explain import add_image_and_node, make_lo_site, serving

MAC = "52:54:00:20:00:01"


def fake_machine(root: Path) -> dict[str, str]:
    """A /proc and /sys as a 4-CPU node with two disks, two NICs, a loop device and DMI."""
    proc, sys_ = root / "proc", root / "sys"
    proc.mkdir(parents=True)
    cpu = ("processor\t: {n}\nvendor_id\t: GenuineIntel\n"
           "model name\t: Intel(R) Xeon(R) E5-2670 0 @ 2.60GHz\n\n")
    (proc / "cpuinfo").write_text("".join(cpu.format(n=n) for n in range(4)))
    (proc / "meminfo").write_text("MemTotal:       16314204 kB\nMemFree:  100 kB\n")
    for name, sectors in (("sda", 976773168), ("nvme0n1", 2000409264), ("loop0", 8), ("sr0", 2)):
        (sys_ / "block" / name).mkdir(parents=True)
        (sys_ / "block" / name / "size").write_text(f"{sectors}\n")
    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", MAC), ("eth1", "52:54:00:20:00:02")):
        (sys_ / "class/net" / name).mkdir(parents=True)
        (sys_ / "class/net" / name / "address").write_text(mac + "\n")
    dmi = sys_ / "class/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "product_serial").write_text("SN-4711\n")
    (dmi / "sys_vendor").write_text("Dell Inc.\n")
    (dmi / "product_name").write_text("PowerEdge R620\n")
    return {"DYNPROV_PROC": str(proc), "DYNPROV_SYS": str(sys_)}


@pytest.fixture
def lo_site(tmp_path: Path) -> Site:
    return make_lo_site(tmp_path)


@pytest.fixture(scope="module")
def bbpath(tmp_path_factory) -> Path:
    return busybox_path(tmp_path_factory.mktemp("bb"))


EXPECTED = {
    "cpus": 4, "cpu_model": "Intel(R) Xeon(R) E5-2670 0 @ 2.60GHz", "memory_mib": 15931,
    "disks": [{"name": "nvme0n1", "bytes": 2000409264 * 512},
              {"name": "sda", "bytes": 976773168 * 512}],
    "nics": [{"name": "eth0", "mac": MAC}, {"name": "eth1", "mac": "52:54:00:20:00:02"}],
    "firmware": "bios", "serial": "SN-4711", "vendor": "Dell Inc.", "product": "PowerEdge R620",
}


@pytest.mark.integration
def test_dp_facts_reads_proc_and_sys_with_busybox(bbpath, tmp_path):
    proc = bbsh(bbpath, "dp_facts", env=fake_machine(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert hwfacts.parse(proc.stdout) == EXPECTED
    empty = bbsh(bbpath, "dp_facts", env={"DYNPROV_PROC": str(tmp_path / "none"),
                                          "DYNPROV_SYS": str(tmp_path / "none")})
    assert empty.returncode == 0 and empty.stdout == "cpus 0\nfirmware bios\n"


@pytest.mark.integration
def test_dp_facts_reads_the_bmc_address_when_ipmitool_is_there(bbpath, tmp_path):
    """A stand-in `ipmitool` (no local BMC here) printing `ipmitool lan print`'s real layout;
    a machine whose ipmitool fails reports no address rather than a wrong one."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in bbpath.iterdir():
        (tools / name.name).symlink_to(name.resolve())
    fake = tools / "ipmitool"
    fake.write_text("#!/bin/sh\n[ \"$*\" = \"lan print\" ] || exit 1\n"
                    "printf 'Set in Progress         : Set Complete\\n"
                    "IP Address Source       : Static Address\\n"
                    "IP Address              : 10.20.0.17\\n"
                    "Subnet Mask             : 255.255.255.0\\n'\n")
    fake.chmod(0o755)
    env = {**fake_machine(tmp_path / "m"), "PATH": str(tools)}
    proc = bbsh(bbpath, "dp_facts", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hwfacts.parse(proc.stdout)["bmc_address"] == "10.20.0.17"
    fake.write_text("#!/bin/sh\necho 'Could not open device at /dev/ipmi0' >&2\nexit 1\n")
    proc = bbsh(bbpath, "dp_facts", env=env)
    assert proc.returncode == 0 and "bmc_address" not in hwfacts.parse(proc.stdout)


@pytest.mark.unit
def test_parser_keeps_only_well_formed_facts_and_is_bounded():
    text = "\n".join(["cpus 8", "cpus -1", "memory_kib 2048x", "memory_kib 4096",
                      "serial A\x1b[31mB;rm -rf /$(x)", "bmc_address 10.0.0.300",
                      "bmc_address 10.0.0.7", "disk ../../etc 100", "disk sda 12",
                      "nic eth0 zz:zz", "nic eth0 52:54:00:AA:BB:CC", "shell $(reboot)"]
                     + [f"nic e{i} 52:54:00:00:{i // 256:02x}:{i % 256:02x}"
                        for i in range(1000)])
    facts = hwfacts.parse(text)
    assert facts["cpus"] == 8 and facts["memory_mib"] == 4
    assert facts["serial"] == "A31mBrm -rf /(x)"  # no ESC, ; or $ left
    assert facts["bmc_address"] == "10.0.0.7"
    assert facts["disks"] == [{"name": "sda", "bytes": 12}]
    assert facts["nics"][0] == {"name": "eth0", "mac": "52:54:00:aa:bb:cc"}
    assert len(facts["nics"]) == hwfacts.MAX_ITEMS
    assert "shell" not in facts
    assert len(json.dumps(hwfacts.parse("x" * 10**6 + "\ncpus 1"))) < 100  # only MAX_TEXT read
    assert hwfacts.is_empty(hwfacts.parse("garbage\n"))


@pytest.mark.integration
def test_call_home_carries_facts_into_nodes_show_and_the_faces(lo_site, tmp_path, bbpath):
    add_image_and_node(lo_site, tmp_path)
    cfg = lo_site.cfg
    token = Inventory(cfg).get("n001").boot_token
    port = cfg.raw["serve"]["http_port"]
    cmdline = tmp_path / "cmdline"
    env = {**fake_machine(tmp_path / "m"), "DYNPROV_CMDLINE_FILE": str(cmdline)}
    script = "dp_parse_cmdline; DP_FACTS=$(dp_facts); dp_report booting initramfs"

    before = lo_site.run("nodes", "show", "n001", check=True).stdout
    assert "not reported yet" in before
    with serving(lo_site):
        cmdline.write_text(f"dynprov.server=http://127.0.0.1:{port} dynprov.node=n001 "
                           "dynprov.token=wrong-token\n")
        refused = bbsh(bbpath, script, env=env)
        assert refused.returncode == 1, refused.stderr
        conn = db.connect(cfg.database)
        assert hwfacts.load(conn, ["n001"]) == {}  # a refused report stores nothing
        cmdline.write_text(f"dynprov.server=http://127.0.0.1:{port} dynprov.node=n001 "
                           f"dynprov.token={token}\n")
        sent = bbsh(bbpath, script, env=env)
        assert sent.returncode == 0, sent.stderr
    stored = hwfacts.load(conn, ["n001"])["n001"]
    assert {k: v for k, v in stored.items() if k != "reported"} == EXPECTED
    assert hwfacts.scheduler_resources(conn, ["n001", "n002"]) == \
        {"n001": {"procs": 4, "memory_mb": 15931}}

    shown = lo_site.run("nodes", "show", "n001", check=True).stdout
    assert "cpus          4 (Intel(R) Xeon(R) E5-2670 0 @ 2.60GHz)" in shown
    assert "memory        15931 MiB" in shown
    assert f"eth0 {MAC}" in shown and "serial        SN-4711" in shown
    data = json.loads(lo_site.run("nodes", "show", "n001", "--json", check=True).stdout)
    assert data[0]["hardware"]["nics"][1]["mac"] == "52:54:00:20:00:02"
    # Moab's cluster query (a real process, read as Moab reads it) carries them
    wiki = parse_wiki(lo_site.run(cmd="cluster-query", check=True).stdout)
    assert (wiki["n001"]["CPROC"], wiki["n001"]["CMEMORY"]) == ("4", "15931")

    lo_site.run("nodes", "remove", "n001", check=True)  # facts go with the node
    assert conn.execute("SELECT COUNT(*) FROM node_facts").fetchone()[0] == 0
    conn.close()


@pytest.mark.integration
def test_release_1_database_gains_the_facts_tables_with_its_data(tmp_path):
    from tests.test_db_migrations import fill, make_release_1, rows

    path = tmp_path / "state" / "dynprov.db"
    path.parent.mkdir()
    make_release_1(path)
    fill(path)
    before = rows(path)
    conn = db.connect(path)
    assert db.schema_version(conn) >= 3
    hwfacts.store(conn, "n001", {"cpus": 2})
    with pytest.raises(sqlite3.IntegrityError, match="(?i)foreign key"):
        hwfacts.store(conn, "nope", {"cpus": 2})
    conn.execute("DELETE FROM node_facts")
    conn.close()
    assert rows(path) == before
