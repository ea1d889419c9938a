"""`pxe-stage explain` against a real `pxe-stage serve` on loopback: a healthy node, a missing
blob, a stopped server, an unknown node, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab.ports import free_port
from pxe import config
from tests.conftest import ROOT, Site, fake_bzimage
from tests.test_serve_support import children_of, serve_section, wait_for

pytestmark = pytest.mark.integration

MAC = "52:54:00:20:00:01"


def make_lo_site(tmp_path: Path, boot_extra: str = "", backend: str = "dnsmasq") -> Site:
    """A site whose provisioning network is loopback, its ports fresh: the node's chain is then
    exactly what explain can fetch. ``boot_extra``: more lines for [boot]."""
    root = tmp_path / "site"
    root.mkdir()
    path = root / "dynprov.toml"
    tftp_port, http_port = free_port(), free_port()
    if "ipxe_http" not in boot_extra:  # these tests walk the all-TFTP chain unless they say so
        boot_extra = "ipxe_http = false\n" + boot_extra
    path.write_text(config.example(root, backend=backend, interface="lo", subnet="127.0.0.0/24",
                                   server="127.0.0.1")
                    + f"\n[boot]\nhttp_port = {http_port}\n{boot_extra}\n")
    site = Site(root, path)
    serve_section(site, tftp_address="127.0.0.1", tftp_port=tftp_port,
                  http_address="127.0.0.1", http_port=http_port)
    return site


@pytest.fixture
def lo_site(tmp_path: Path, request) -> Site:
    """make_lo_site; ``@pytest.mark.parametrize("lo_site", [...], indirect=True)`` adds [boot]
    lines."""
    return make_lo_site(tmp_path, getattr(request, "param", ""))


@pytest.fixture
def image(lo_site: Site, tmp_path: Path) -> dict[str, str]:
    return add_image_and_node(lo_site, tmp_path)


def add_image_and_node(lo_site: Site, tmp_path: Path, *node_flags: str) -> dict[str, str]:
    kernel = fake_bzimage(tmp_path / "vmlinuz", os.urandom(70_000))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(os.urandom(150_000))
    rootfs = tmp_path / "root.tar"
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(30_000))
    with tarfile.open(rootfs, "w") as tar:
        tar.add(payload, arcname="bin/payload")
    lo_site.run("images", "add", "centos5", "--kernel", str(kernel), "--initrd", str(initrd),
                "--rootfs", str(rootfs), check=True)
    lo_site.run("nodes", "add", "n001", "--mac", MAC, "--ip", "127.0.0.10", *node_flags,
                check=True)
    lo_site.run("set-boot", "n001", "--os", "centos5", check=True)
    lo_site.run("render", check=True)
    out = json.loads(lo_site.run("images", "show", "centos5", "--json", check=True).stdout)
    return out if isinstance(out, dict) else out[0]


@contextlib.contextmanager
def serving(site: Site) -> Iterator[None]:
    """`pxe-stage serve` with the site's own [serve] section; stopped by PID."""
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    with open(site.root / "serve.log", "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pxe.cli.main", "serve"], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    port = config.load(site.config_path).raw["serve"]["http_port"]
    try:
        wait_for(lambda: proc.poll() is None and httpx.get(
            f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200, "serve /healthz")
        yield
    finally:
        kids = children_of(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def explain(site: Site, *argv: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = site.run("explain", *argv, "--json")
    data = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc, data


def steps(data: dict) -> dict[str, dict]:
    return {s["link"]: s for s in data["steps"]}


def test_healthy_node_every_link_fetched_and_matching(lo_site, image):
    from pxe import db

    conn = db.connect(lo_site.cfg.database)  # the node's run, as pxe.run records it
    with db.transaction(conn):
        run = conn.execute("INSERT INTO runs(label, mode, created) VALUES ('centos5', "
                           "'ondemand', 1.0) RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO run_nodes(run_id, node, state, reason, deadline, updated) "
                     "VALUES (?, 'n001', 'power-cycled', '', NULL, 2.0)",
                     (run,))
    conn.close()
    with serving(lo_site):
        proc, data = explain(lo_site, "n001")
        text = lo_site.run("explain", "n001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["ok"] is True
    by = steps(data)
    dhcp = by["dhcp"]["facts"]
    assert dhcp["backend"] == "dnsmasq"
    assert dhcp["options"]["address"] == "127.0.0.10"
    assert dhcp["options"]["filename (BIOS PXE ROM)"] == "pxelinux.0"
    assert any(MAC in line and "127.0.0.10" in line for line in dhcp["host lines"][MAC])
    assert by["loader (BIOS PXE ROM): pxelinux.0"]["facts"]["size"] == \
        Path("/usr/lib/PXELINUX/pxelinux.0").stat().st_size
    conf = by[f"loader config ({MAC})"]["facts"]
    assert f"KERNEL blobs/{image['kernel_sha']}" in conf["content"]
    assert "dynprov.token=<redacted>" in conf["content"]  # a credential: never shown
    for what in ("kernel", "initrd"):
        facts = by[f"{what} over TFTP"]["facts"]
        assert facts["sha256"] == image[f"{what}_sha"] == facts["image sha256"]
        assert facts["size"] == facts["size on disk"]
    rootfs = by["rootfs over HTTP"]["facts"]
    assert rootfs["sha256"] == image["rootfs_sha"] and rootfs["size"] == rootfs["size on disk"]
    assert by["call-home"]["facts"]["url"].endswith("/report")
    assert by["call-home"]["facts"]["live"] == "serve answers /healthz"
    assert by["run"]["facts"]["current run"] == {"id": run, "image": "centos5",
                                                 "state": "power-cycled", "reason": ""}
    assert text.returncode == 0 and "no problems found" in text.stdout
    assert f"|   KERNEL blobs/{image['kernel_sha']}" in text.stdout
    assert "HTTP Request" not in text.stderr


def test_two_nics_each_config_checked_and_shared_links_once(lo_site, tmp_path):
    second = "52:54:00:20:00:02"
    image = add_image_and_node(lo_site, tmp_path, "--mac", second)
    with serving(lo_site):
        proc, data = explain(lo_site, "n001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    links = [s["link"] for s in data["steps"]]
    assert links.count("loader (BIOS PXE ROM): pxelinux.0") == 1
    assert links.count("kernel over TFTP") == 1
    by = steps(data)
    for mac in (MAC, second):
        assert f"KERNEL blobs/{image['kernel_sha']}" in by[f"loader config ({mac})"]["facts"]["content"]
    assert set(by["dhcp"]["facts"]["host lines"]) == {MAC, second}


def test_missing_blob_is_one_problem_with_its_fix(lo_site, image):
    for root in ("tftp", "http"):
        (lo_site.root / root / "blobs" / image["initrd_sha"]).unlink()
    with serving(lo_site):
        proc, data = explain(lo_site, "n001")
        text = lo_site.run("explain", "n001")
    assert proc.returncode == 1
    problems = [s for s in data["steps"] if s["problem"]]
    assert [s["link"] for s in problems] == ["initrd over TFTP"]
    assert "TFTP error 1" in problems[0]["problem"]
    assert "pxe-stage images add centos5" in problems[0]["fix"]
    assert "problem 1: initrd over TFTP:" in text.stdout and "fix: re-add the image" in text.stdout
    assert steps(data)["kernel over TFTP"]["problem"] is None


@pytest.mark.parametrize("lo_site", ["write_files = true"], indirect=True)  # files on disk
def test_stale_loader_config_on_disk_is_named(lo_site, image):
    conf = lo_site.root / "tftp" / "pxelinux.cfg" / ("01-" + MAC.replace(":", "-"))
    conf.write_text(conf.read_text().replace("KERNEL blobs/", "KERNEL old/"))
    with serving(lo_site):
        proc, data = explain(lo_site, "n001")
    link = steps(data)[f"loader config ({MAC})"]
    if link["problem"] is None:  # serve renders loader configs from the database itself
        assert "KERNEL blobs/" in link["facts"]["content"]
        return
    assert proc.returncode == 1
    assert "not what the inventory renders" in link["problem"]
    assert "pxe-stage render" in link["fix"]


def test_stopped_server_says_start_serve(lo_site, image):
    proc, data = explain(lo_site, "n001", "--timeout", "0.3")
    assert proc.returncode == 1
    problems = [s for s in data["steps"] if s["problem"]]
    links = [s["link"] for s in problems]
    assert links[0] == "loader (BIOS PXE ROM): pxelinux.0"
    assert "TFTP server at 127.0.0.1" in problems[0]["problem"]
    assert "pxe-stage serve" in problems[0]["fix"]
    # One problem per server, not one per file it would have served.
    assert len([lk for lk in links if "TFTP" in lk or "loader" in lk]) == 1
    http = [s for s in problems if "HTTP server" in s["problem"]]
    assert len(http) == 1 and "pxe-stage serve" in http[0]["fix"]


def test_unknown_node_and_bad_name(lo_site, image):
    before = lo_site.snapshot()
    proc = lo_site.run("explain", "n999")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "unknown node 'n999'" in proc.stderr and "pxe-stage nodes add" in proc.stderr
    bad = lo_site.run("explain", "n0/../x")
    assert bad.returncode == 2 and bad.stderr.startswith("pxe-stage: ")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert lo_site.snapshot() == before


@pytest.mark.parametrize("lo_site", ['ipxe_http = true\nuefi_loader = "grubx64.efi"'],
                         indirect=True)
def test_uefi_node_given_grub_walks_the_grub_chain_only(lo_site, tmp_path):
    """GRUB never asks for boot.ipxe (it sends no option 175), even with ipxe_http on."""
    image = add_image_and_node(lo_site, tmp_path, "--firmware", "uefi")
    with serving(lo_site):
        proc, data = explain(lo_site, "n001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by = steps(data)
    assert by["dhcp"]["facts"]["options"]["filename (UEFI PXE ROM)"] == "grubx64.efi"
    assert by["dhcp"]["facts"]["chain"].startswith("grubx64.efi (GRUB) over TFTP")
    assert "configfile /grub/grub.cfg-${net_default_mac}" in \
        by["loader dispatcher (GRUB)"]["facts"]["content"]
    assert f"linux /blobs/{image['kernel_sha']}" in by[f"loader config ({MAC})"]["facts"]["content"]
    for what in ("kernel", "initrd"):
        assert by[f"{what} over TFTP"]["facts"]["sha256"] == image[f"{what}_sha"]
        assert f"{what} over HTTP" not in by
    assert not [link for link in by if "iPXE" in link]


@pytest.mark.parametrize("lo_site", ["ipxe_http = true"], indirect=True)  # the default loaders
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_ipxe_chain_is_loader_over_tftp_then_http_only(lo_site, tmp_path, firmware):
    image = add_image_and_node(lo_site, tmp_path, "--firmware", firmware)
    loader = {"bios": "undionly.kpxe", "uefi": "ipxe.efi"}[firmware]
    with serving(lo_site):
        proc, data = explain(lo_site, "n001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by = steps(data)
    dhcp = by["dhcp"]["facts"]
    assert dhcp["options"][f"filename ({firmware.upper()} PXE ROM)"] == loader
    assert dhcp["options"]["filename (iPXE, option 175)"].endswith("/boot.ipxe")
    assert any("tag:ipxe" in line and "boot.ipxe" in line for line in dhcp["boot file lines"])
    first = by[f"loader (iPXE, {firmware.upper()} PXE ROM): {loader}"]["facts"]
    assert first["size"] == Path(f"/usr/lib/ipxe/{loader}").stat().st_size
    assert "chain --autofree" in by["iPXE script (shared)"]["facts"]["content"]
    assert f"/blobs/{image['kernel_sha']}" in by[f"iPXE script ({MAC})"]["facts"]["content"]
    for what in ("kernel", "initrd"):
        assert by[f"{what} over HTTP"]["facts"]["sha256"] == image[f"{what}_sha"]
        assert by[f"{what} over HTTP"]["facts"]["fetch"].startswith("http://127.0.0.1:")
        assert f"{what} over TFTP" not in by  # iPXE never asks TFTP for them
    # pxelinux/GRUB configs are not part of this chain
    assert not [link for link in by if link.startswith(("loader config", "loader dispatcher"))]


def test_isc_dhcpd_backend_names_its_host_and_filename_lines(tmp_path):
    site = make_lo_site(tmp_path, backend="isc")
    add_image_and_node(site, tmp_path)
    with serving(site):
        proc, data = explain(site, "n001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dhcp = steps(data)["dhcp"]["facts"]
    assert dhcp["backend"] == "isc" and dhcp["config"].endswith("dhcpd.conf")
    assert any(f"hardware ethernet {MAC};" in line and "fixed-address 127.0.0.10;" in line
               for line in dhcp["host lines"][MAC])
    assert any('filename "pxelinux.0";' in line for line in dhcp["boot file lines"])


def test_proxy_mode_says_who_gives_the_address(tmp_path):
    site = make_lo_site(tmp_path)
    site.config_path.write_text(site.config_path.read_text().replace(
        'backend = "dnsmasq"\n', 'backend = "dnsmasq"\nmode = "proxy"\n', 1))
    add_image_and_node(site, tmp_path)
    with serving(site):
        proc, data = explain(site, "n001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dhcp = steps(data)["dhcp"]["facts"]
    assert dhcp["mode"].startswith("proxy") and "site's DHCP server" in dhcp["options"]["address"]
    assert dhcp["options"]["boot file (BIOS PXE ROM, pxe-service)"] == "pxelinux.0"
    assert any(line.split(": ", 1)[1].startswith("pxe-service=") and "x86PC" in line
               and "pxelinux.0" in line for line in dhcp["boot file lines"])
    assert any("set:dynprov,n001" in line for line in dhcp["host lines"][MAC])


def test_node_set_to_its_local_disk_has_no_image_links(lo_site, image):
    lo_site.run("set-boot", "n001", "--local", check=True)
    lo_site.run("render", check=True)
    with serving(lo_site):
        proc, data = explain(lo_site, "n001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by = steps(data)
    assert by["image"]["facts"]["boot target"] == "local"
    assert "LOCALBOOT 0" in by[f"loader config ({MAC})"]["facts"]["content"]
    assert not [link for link in by if link.startswith(("kernel", "initrd", "rootfs"))]


QUICK = ("--timeout", "0.2")  # no server runs in this test: its fetches may give up early


def test_image_version_it_will_boot_and_the_one_it_last_booted(lo_site, image, tmp_path):
    """The image step names the current version of the node's label (what its next boot gets,
    so a rollback shows at once) and the label and version it last booted. No server runs: only
    the image step matters here, so the fetches give up quickly."""
    from pxe import db

    proc, data = explain(lo_site, "n001", *QUICK)
    facts = steps(data)["image"]["facts"]
    assert facts["version"] == 1 and facts["last booted"] is None  # never booted by dynprov
    kernel = fake_bzimage(tmp_path / "vmlinuz2", os.urandom(70_000))
    lo_site.run("images", "add", "centos5", "--kernel", str(kernel), check=True)  # version 2
    conn = db.connect(lo_site.cfg.database)  # the node booted version 1, as call-home records it
    with db.transaction(conn):
        conn.execute("UPDATE nodes SET current_os = 'centos5', current_version = 1 "
                     "WHERE name = 'n001'")
    conn.close()
    proc, data = explain(lo_site, "n001", *QUICK)
    facts = steps(data)["image"]["facts"]
    assert facts["version"] == 2
    assert facts["last booted"] == {"image": "centos5", "version": 1}
    text = lo_site.run("explain", "n001", *QUICK).stdout
    assert "    version: 2\n" in text
    assert "    last booted:\n      image: centos5\n      version: 1\n" in text
    lo_site.run("images", "rollback", "centos5", check=True)
    proc, data = explain(lo_site, "n001", *QUICK)
    assert steps(data)["image"]["facts"]["version"] == 1
    lo_site.run("set-boot", "n001", "--local", check=True)  # no image to boot: no version line
    proc, data = explain(lo_site, "n001", *QUICK)
    facts = steps(data)["image"]["facts"]
    assert "version" not in facts and facts["last booted"] == {"image": "centos5", "version": 1}
