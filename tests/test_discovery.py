"""Discovery: an unknown MAC's loader boots the discovery image, the machine reports its
hardware to a real `pxe-stage serve` on loopback (lib.sh with busybox sh), the admin lists and
adopts it; floods are bounded; bad input is refused with nothing changed."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from initramfs_support import bbsh, busybox_path

from pxe import bootfetch, db, discovery
from pxe.config import load as load_config
from pxe.errors import InputError
from tests.conftest import Site, fake_bzimage
from tests.test_explain import add_image_and_node, make_lo_site, serving
from tests.test_hwfacts import fake_machine

UNKNOWN = "52:54:00:20:00:01"  # fake_machine's eth0 (the NIC it reports from)
SECOND = "52:54:00:20:00:02"   # its eth1
CAP = 20
STATE_BUDGET = 1 << 20  # bytes the state directory may grow by in the flood test


@pytest.fixture(scope="module")
def bbpath(tmp_path_factory) -> Path:
    return busybox_path(tmp_path_factory.mktemp("bb"))


@pytest.fixture
def disco_site(tmp_path: Path) -> Site:
    site = make_lo_site(tmp_path)
    with open(site.config_path, "a") as fh:
        fh.write(f'\n[discovery]\nenabled = true\nimage = "disco"\nmax_machines = {CAP}\n'
                 "min_interval = 3600\n")
    kernel = fake_bzimage(tmp_path / "vmlinuz-disco", os.urandom(5000))
    initrd = tmp_path / "dynprov-initrd.img"
    initrd.write_bytes(os.urandom(9000))
    site.run("images", "add", "disco", "--kernel", str(kernel), "--initrd", str(initrd),
             check=True)
    # n001 holds 127.0.0.10 and the MAC 52:54:00:20:00:01 is NOT used: add_image_and_node uses
    # it, so give the known node another MAC here.
    site.run("nodes", "add", "n001", "--mac", "52:54:00:99:00:01", "--ip", "127.0.0.10",
             check=True)
    site.run("render", check=True)
    return site


def post(port: int, mac: str, facts: str = "cpus 2\n") -> int:
    return httpx.post(f"http://127.0.0.1:{port}/discover", data={"mac": mac, "facts": facts},
                      timeout=60).status_code


@pytest.mark.integration
def test_unknown_mac_boots_discovery_reports_and_is_adopted(disco_site, tmp_path, bbpath):
    cfg = disco_site.cfg
    port = cfg.raw["serve"]["http_port"]
    disco = json.loads(disco_site.run("images", "show", "disco", "--json", check=True).stdout)
    disco = disco if isinstance(disco, dict) else disco[0]
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"dynprov.server=http://127.0.0.1:{port} dynprov.mode=discover\n")
    env = {**fake_machine(tmp_path / "m"), "DYNPROV_CMDLINE_FILE": str(cmdline)}
    script = f"dp_parse_cmdline; dp_discover_report {UNKNOWN}"
    with serving(disco_site):
        # The loader of an unknown MAC: pxelinux falls through to default, which is discovery.
        default = bootfetch.tftp_get("127.0.0.1", cfg.raw["serve"]["tftp_port"],
                                     "pxelinux.cfg/default")
        assert default.ok, default.error
        assert f"KERNEL blobs/{disco['kernel_sha']}" in default.text
        assert f"INITRD blobs/{disco['initrd_sha']}" in default.text
        assert "dynprov.mode=discover" in default.text and "IPAPPEND 2" in default.text
        ipxe = bootfetch.http_get(f"http://127.0.0.1:{port}/boot.ipxe")
        assert "goto discover" in ipxe.text and disco["kernel_sha"] in ipxe.text

        first = bbsh(bbpath, script, env=env)
        assert first.returncode == 0, first.stderr
        again = bbsh(bbpath, script, env=env)  # within min_interval: refused, nothing written
        assert again.returncode == 1 and "429" in again.stderr
        assert post(port, "52:54:00:99:00:01") == 409  # a known node is not "discovered"

    listed = json.loads(disco_site.run("nodes", "discovered", "--json", check=True).stdout)
    assert [r["mac"] for r in listed] == [UNKNOWN] and listed[0]["reports"] == 1
    assert listed[0]["facts"]["cpus"] == 4 and listed[0]["facts"]["serial"] == "SN-4711"
    table = disco_site.run("nodes", "discovered", check=True).stdout
    assert UNKNOWN in table and "15931 MiB" in table
    assert disco_site.run("nodes", "show", "n017").returncode == 1  # nothing added by itself

    out = disco_site.run("nodes", "adopt", UNKNOWN, "--name", "n017", "--ip", "127.0.0.17",
                         check=True)
    assert "adopted 52:54:00:20:00:01 as n017" in out.stdout and "pxe-stage render" in out.stdout
    node = json.loads(disco_site.run("nodes", "show", "n017", "--json", check=True).stdout)[0]
    assert node["macs"] == [UNKNOWN, SECOND] and node["ip"] == "127.0.0.17"
    assert node["firmware"] == "bios" and node["hardware"]["product"] == "PowerEdge R620"
    assert json.loads(disco_site.run("nodes", "discovered", "--json").stdout) == []


@pytest.mark.integration
def test_adopt_refuses_taken_names_ips_macs_and_changes_nothing(disco_site, tmp_path):
    conn = db.connect(disco_site.cfg.database)
    settings = discovery.load(disco_site.cfg)
    assert discovery.record(conn, settings, UNKNOWN, "127.0.0.150",
                            "cpus 2\nnic eth0 " + UNKNOWN + "\n") == discovery.STORED
    before = disco_site.snapshot()
    cases = [
        (("--name", "n017", "--ip", "127.0.0.10"), 2, "IP 127.0.0.10 already belongs to node n001"),
        (("--name", "n001"), 2, "node n001 already exists"),
        (("--name", "bad_name!"), 2, "name"),
        (("--name", "n017", "--ip", "10.9.9.9"), 2, "outside the subnet"),
    ]
    for flags, code, message in cases:
        proc = disco_site.run("nodes", "adopt", UNKNOWN, *flags)
        assert proc.returncode == code and message in proc.stderr, (flags, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    unknown = disco_site.run("nodes", "adopt", "52:54:00:77:77:77", "--name", "n018")
    assert unknown.returncode == 1 and "no discovered machine has MAC" in unknown.stderr
    bad = disco_site.run("nodes", "adopt", "not-a-mac", "--name", "n018")
    assert bad.returncode == 2 and "MAC" in bad.stderr
    assert disco_site.snapshot() == before
    # The MAC was given to a node by hand meanwhile: adopting it is refused by name.
    disco_site.run("nodes", "add", "n020", "--mac", UNKNOWN, check=True)
    taken = disco_site.run("nodes", "adopt", UNKNOWN, "--name", "n018")
    assert taken.returncode == 2 and f"MAC {UNKNOWN} already belongs to node n020" in taken.stderr
    conn.close()


@pytest.mark.integration
def test_adopt_leaves_out_a_second_nic_another_node_has_and_says_so(disco_site):
    conn = db.connect(disco_site.cfg.database)
    settings = discovery.load(disco_site.cfg)
    facts = f"cpus 2\nnic eth0 {UNKNOWN}\nnic eth1 {SECOND}\n"
    assert discovery.record(conn, settings, UNKNOWN, None, facts) == discovery.STORED
    conn.close()
    disco_site.run("nodes", "add", "n020", "--mac", SECOND, check=True)
    out = disco_site.run("nodes", "adopt", UNKNOWN, "--name", "n017", check=True).stdout
    assert f"note: its NIC {SECOND} was left out: that MAC belongs to node n020" in out
    node = json.loads(disco_site.run("nodes", "show", "n017", "--json", check=True).stdout)[0]
    assert node["macs"] == [UNKNOWN]


def _state_bytes(site: Site) -> int:
    """Bytes of everything under the state directory (database, WAL, report files)."""
    return sum(p.stat().st_size for p in Path(site.cfg.paths.state_dir).rglob("*") if p.is_file())


@pytest.mark.integration
def test_a_flood_of_unknown_macs_is_bounded(disco_site):
    """1,000 unknown machines report at once (16 at a time, a fresh connection each, as 1,000
    machines would): exactly max_machines are kept, the rest answered 507 with nothing written;
    one machine reporting in a loop is answered 429; the state directory and the log stay small."""
    port = disco_site.cfg.raw["serve"]["http_port"]
    url = f"http://127.0.0.1:{port}/discover"
    big = "nic eth0 52:54:00:00:00:01\n" * 1000  # 27 KB: over the size limit
    facts = "cpus 64\nmemory_kib 268435456\n" + "".join(
        f"disk sd{chr(97 + i)} 1000000000\n" for i in range(20))  # a full-sized report
    before = _state_bytes(disco_site)
    fresh = httpx.Limits(max_keepalive_connections=0)

    with serving(disco_site), httpx.Client(timeout=60, limits=fresh) as client:
        def one(i: int) -> int:  # a client of its own: no connection pool shared by threads
            mac = f"52:54:01:00:{i // 256:02x}:{i % 256:02x}"
            with httpx.Client(timeout=60, limits=fresh) as own:
                return own.post(url, data={"mac": mac, "facts": facts}).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            codes = Counter(pool.map(one, range(1000)))
        minutes = 1 + int((time.monotonic() - started) // 60)
        stored = discovery.listing(db.connect(disco_site.cfg.database))[0]["mac"]
        repeats = {client.post(url, data={"mac": stored}).status_code for _ in range(50)}
        too_big = client.post(url, data={"mac": stored, "facts": big}).status_code
        bad = client.post(url, data={"mac": "zz"}).status_code
    assert codes == {200: CAP, 507: 1000 - CAP}
    assert repeats == {429} and too_big == 413 and bad == 400
    conn = db.connect(disco_site.cfg.database)
    assert tuple(conn.execute("SELECT COUNT(*), SUM(reports) FROM discovered").fetchone()) == \
        (CAP, CAP)
    assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'discovered'").fetchone()[0] \
        == CAP
    conn.close()
    # Disk: what CAP machines cost, not what 1,000 would (~20 KB of WAL per stored report).
    grown = _state_bytes(disco_site) - before
    assert grown < STATE_BUDGET, f"state grew by {grown} bytes"
    log = (disco_site.root / "serve.log").read_text()
    workers = disco_site.cfg.raw["serve"].get("http_workers") or os.cpu_count() or 1
    # Warned once per HTTP worker process per minute, not once per machine.
    assert 1 <= log.count(f"max_machines={CAP}") <= min(workers, 8) * minutes
    assert log.count("\n") < 200, "serve logged per refused machine"


@pytest.mark.integration
def test_a_full_list_is_cleared_by_the_admin_and_takes_machines_again(disco_site):
    conn = db.connect(disco_site.cfg.database)
    settings = discovery.load(disco_site.cfg)
    flood = [f"52:54:02:00:00:{i:02x}" for i in range(CAP)]
    for mac in flood:
        assert discovery.record(conn, settings, mac, None, "cpus 1\n") == discovery.STORED
    assert discovery.record(conn, settings, UNKNOWN, None, "cpus 4\n") == discovery.FULL
    before = disco_site.snapshot()
    for flags, code, message in (
            (("--forget", flood[0], "--forget", "52:54:02:00:99:99"), 1,
             "no discovered machine has MAC 52:54:02:00:99:99; nothing forgotten"),
            (("--forget", "nonsense"), 2, "MAC"),
            (("--forget", flood[0], "--forget-all"), 2, "not allowed with")):
        proc = disco_site.run("nodes", "discovered", *flags)
        assert proc.returncode == code and message in proc.stderr, (flags, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == (2 if "not allowed" in message else 1)  # argparse adds its usage
    assert disco_site.snapshot() == before  # all or nothing
    out = disco_site.run("nodes", "discovered", "--forget", flood[0].upper(), "--forget",
                         flood[1], check=True).stdout
    assert out == "forgot 2 discovered machine(s)\n"
    assert discovery.record(conn, settings, UNKNOWN, None, "cpus 4\n") == discovery.STORED
    out = disco_site.run("nodes", "discovered", "--forget-all", check=True).stdout
    assert out == f"forgot {CAP - 1} discovered machine(s)\n"
    assert discovery.listing(conn) == []
    assert conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 1  # n001 untouched
    conn.close()


@pytest.mark.integration
def test_discovery_off_stores_nothing_and_config_is_checked(tmp_path):
    site = make_lo_site(tmp_path)
    add_image_and_node(site, tmp_path)
    port = site.cfg.raw["serve"]["http_port"]
    with serving(site):
        assert post(port, "52:54:00:77:00:01") == 403
        default = bootfetch.tftp_get("127.0.0.1", site.cfg.raw["serve"]["tftp_port"],
                                     "pxelinux.cfg/default")
    assert "LOCALBOOT 0" in default.text
    conn = db.connect(site.cfg.database)
    assert conn.execute("SELECT COUNT(*) FROM discovered").fetchone()[0] == 0
    for section, message in (('enabled = true\n', "names no image"),
                             ('enabled = "yes"\n', "true or false"),
                             ('enabled = false\nmax_machines = 0\n', "max_machines"),
                             ('enabled = false\nflood = 1\n', "unknown key")):
        path = tmp_path / f"c{len(message)}.toml"
        path.write_text(site.config_path.read_text() + "\n[discovery]\n" + section)
        with pytest.raises(InputError, match=message):
            discovery.load(load_config(path))


@pytest.mark.integration
def test_render_refuses_a_bad_discovery_section_before_writing(tmp_path):
    site = make_lo_site(tmp_path)
    site.run("nodes", "add", "n001", "--mac", "52:54:00:99:00:01", check=True)
    site.run("render", check=True)
    with open(site.config_path, "a") as fh:
        fh.write("\n[discovery]\nenabled = true\n")
    site.run("nodes", "add", "n002", "--mac", "52:54:00:99:00:02", check=True)
    before = site.snapshot()
    proc = site.run("render")
    assert proc.returncode == 2 and "discovery.image" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert site.snapshot() == before  # the DHCP config does not get n002 half-way
