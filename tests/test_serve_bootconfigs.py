"""Loader configs served from the database (pxe.serve.bootconfigs): set-boot writes no files, the
server renders what each loader asks for, and a later set-boot shows at the next request."""

from __future__ import annotations

import os

import pytest
from test_serve_support import curl_tftp, tftp_thread

from pxe import db
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from pxe.render import Renderer
from pxe.serve import files
from pxe.serve.bootconfigs import BootConfigs
from pxe.setboot import render_all, set_boot

BIOS_MAC, UEFI_MAC = "52:54:00:aa:00:01", "52:54:00:aa:00:02"


def _site_with_image(site, kernel, tmp_path):
    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": "n001", "mac": BIOS_MAC}),
                        build(cfg, {"name": "n002", "mac": UEFI_MAC, "firmware": "uefi"})])
    initrd = tmp_path / "initrd"
    initrd.write_bytes(os.urandom(1000))
    image = Catalog(cfg).add("centos5", kernel, initrd, cmdline="console=ttyS0,115200")
    return cfg, image


@pytest.mark.unit
def test_set_boot_writes_no_files_and_the_server_renders_what_the_file_would_say(
        site, kernel, tmp_path):
    cfg, image = _site_with_image(site, kernel, tmp_path)
    def tree() -> set:
        return {p for root in (cfg.paths.tftp_root, cfg.paths.http_root) if root.exists()
                for p in root.rglob("*")}

    before, files_before = db.read_stamp(cfg.database), tree()
    set_boot(cfg, "n[001-002]", "centos5")
    assert db.read_stamp(cfg.database) != before  # the writer bumped the stamp after COMMIT
    assert tree() == files_before  # the image's blobs, and not one config file
    configs = BootConfigs(cfg)
    renderer = Renderer(cfg)
    inv = Inventory(cfg)
    expected = {**renderer.node_boot_files(inv.get("n001"), image),
                **renderer.node_boot_files(inv.get("n002"), image),
                **renderer.shared_boot_files({image.label: image})}
    for name, text in expected.items():
        assert configs.lookup(name) == text.encode(), name
    assert f"KERNEL blobs/{image.kernel_sha}" in configs.lookup(
        "pxelinux.cfg/01-52-54-00-aa-00-01").decode()
    token = inv.get("n001").boot_token
    assert f"dynprov.token={token}" in configs.lookup("ipxe/52-54-00-aa-00-01.ipxe").decode()

    # The same (cached) server sees the next set-boot at its next request.
    set_boot(cfg, "n001", None)
    assert b"LOCALBOOT 0" in configs.lookup("pxelinux.cfg/01-52-54-00-aa-00-01")
    assert b"\nexit\n" in configs.lookup("ipxe/52-54-00-aa-00-01.ipxe")
    assert b"\nexit\n" not in configs.lookup("ipxe/52-54-00-aa-00-02.ipxe")


@pytest.mark.unit
def test_unknown_macs_are_missing_and_other_names_are_the_file_trees(site, kernel, tmp_path):
    cfg, _ = _site_with_image(site, kernel, tmp_path)
    configs = BootConfigs(cfg)
    with pytest.raises(files.Missing):
        configs.lookup("pxelinux.cfg/01-52-54-00-ff-ff-ff")  # pxelinux then tries `default`
    with pytest.raises(files.Missing):
        configs.lookup("grub/grub.cfg-52:54:00:ff:ff:ff")
    for name in ("pxelinux.0", "pxelinux.cfg/C612000B", "grub/x86_64-efi/command.lst",
                 "ipxe/readme.txt", "blobs/" + "0" * 64):
        assert configs.lookup(name) is None, name  # not a loader config: the file tree answers
    # Whatever case a client uses, the MAC is the MAC.
    assert b"LOCALBOOT 0" in configs.lookup("pxelinux.cfg/01-52-54-00-AA-00-01")


@pytest.mark.unit
def test_render_prunes_an_earlier_file_tree(site, kernel, tmp_path):
    cfg, _ = _site_with_image(site, kernel, tmp_path)
    site.config_path.write_text(site.config_path.read_text() + "\n[boot]\nwrite_files = true\n")
    render_all(site.cfg, reload=False)
    old = cfg.paths.tftp_root / "pxelinux.cfg/01-52-54-00-aa-00-01"
    assert old.exists()
    site.config_path.write_text(site.config_path.read_text().replace("write_files = true",
                                                                     "write_files = false"))
    report = render_all(site.cfg, reload=False)
    assert not old.exists() and "pxelinux.cfg/01-52-54-00-aa-00-01" in report.pruned
    assert not (cfg.paths.tftp_root / "pxelinux.cfg/default").exists()


@pytest.mark.integration
def test_tftp_serves_rendered_configs_and_follows_set_boot(site, kernel, tmp_path):
    cfg, image = _site_with_image(site, kernel, tmp_path)
    set_boot(cfg, "n[001-002]", "centos5")
    out = tmp_path / "out"
    with tftp_thread(site) as srv:
        proc = curl_tftp(srv.port, "pxelinux.cfg/01-52-54-00-aa-00-01", out, 1468)
        assert proc.returncode == 0, proc.stderr
        assert f"KERNEL blobs/{image.kernel_sha}" in out.read_text()
        proc = curl_tftp(srv.port, "grub/grub.cfg-52:54:00:aa:00:02", out, None)
        assert proc.returncode == 0, proc.stderr
        assert f"linux /blobs/{image.kernel_sha}" in out.read_text()
        proc = curl_tftp(srv.port, "pxelinux.cfg/default", out, None)
        assert proc.returncode == 0 and "LOCALBOOT 0" in out.read_text()
        proc = curl_tftp(srv.port, "pxelinux.cfg/01-52-54-00-ff-ff-ff", out, None)
        assert proc.returncode != 0  # unknown MAC: TFTP "file not found"
        set_boot(cfg, "n001", None)
        proc = curl_tftp(srv.port, "pxelinux.cfg/01-52-54-00-aa-00-01", out, 1468)
        assert proc.returncode == 0 and "LOCALBOOT 0" in out.read_text()
