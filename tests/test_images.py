"""Image catalog: kernel check, content-addressed store, garbage collection."""

import hashlib
from pathlib import Path

import pytest

from pxe.errors import DynprovError, InputError
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from tests.conftest import fake_bzimage

pytestmark = pytest.mark.unit


def test_add_stores_content_addressed(site, kernel, tmp_path):
    cfg = site.cfg
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd-bytes")
    image = Catalog(cfg).add("centos5", kernel, initrd, cmdline="console=ttyS0")
    ksha = hashlib.sha256(kernel.read_bytes()).hexdigest()
    assert image.kernel_sha == ksha
    for root in (cfg.paths.tftp_root, cfg.paths.http_root):
        assert (root / "blobs" / ksha).read_bytes() == kernel.read_bytes()
        assert (root / "blobs" / image.initrd_sha).read_bytes() == b"initrd-bytes"
    assert Catalog(cfg).get("centos5").cmdline == "console=ttyS0"


def test_not_a_kernel_is_refused_and_nothing_stored(site, tmp_path):
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"\x7fELF" + b"\0" * 2000)
    cat = Catalog(site.cfg)
    before = site.snapshot()
    with pytest.raises(InputError, match="not a Linux kernel"):
        cat.add("centos5", bogus)
    with pytest.raises(InputError, match="no such file"):
        cat.add("centos5", tmp_path / "missing")
    assert site.snapshot() == before


def test_shared_blobs_survive_until_last_user_goes(site, kernel):
    cfg = site.cfg
    cat = Catalog(cfg)
    a = cat.add("centos5", kernel)
    cat.add("sles11", kernel, cmdline="quiet")
    blob = cfg.paths.tftp_root / "blobs" / a.kernel_sha
    cat.remove("centos5")
    assert blob.exists()
    cat.remove("sles11")
    assert not blob.exists()
    assert not (cfg.paths.http_root / "blobs" / a.kernel_sha).exists()


def test_labels_and_duplicates(site, kernel):
    cat = Catalog(site.cfg)
    assert cat.add("centos5", kernel).version == 1
    assert cat.add("centos5", kernel).version == 2  # a label that exists gets a new version
    assert [v.version for v in cat.history("centos5")] == [1, 2]
    for bad in ("../x", "a b", "{{x}}", "x/y"):
        with pytest.raises(InputError, match="invalid label"):
            cat.add(bad, kernel)


def test_remove_in_use_needs_force(site, kernel):
    cfg = site.cfg
    Catalog(cfg).add("centos5", kernel)
    Inventory(cfg).add([build(cfg, {"name": "n001", "mac": "52:54:00:00:00:01",
                                    "desired_os": "centos5"})])
    with pytest.raises(DynprovError, match="used by node"):
        Catalog(cfg).remove("centos5")
    Catalog(cfg).remove("centos5", force=True)
    assert Catalog(cfg).labels() == []


def test_stateful_needs_rootfs(site, tmp_path):
    with pytest.raises(InputError, match="stateful"):
        Catalog(site.cfg).add("disk1", fake_bzimage(tmp_path / "k"), mode="stateful")


def test_inputs_are_regular_files_opened_without_following_links(site, kernel, tmp_path):
    import os

    cat = Catalog(site.cfg)
    link = tmp_path / "vmlinuz-link"
    link.symlink_to(kernel)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = site.snapshot()
    with pytest.raises(InputError, match="is a symbolic link"):
        cat.add("centos5", link, from_user=True)
    with pytest.raises(InputError, match="is a FIFO, not a regular file"):
        cat.add("centos5", kernel, fifo)
    with pytest.raises(InputError, match="is a device"):
        cat.add("centos5", kernel, rootfs=Path("/dev/zero"))
    with pytest.raises(InputError, match="outside 30..86400"):
        cat.add("centos5", kernel, prov_seconds=-5, from_user=True)
    assert site.snapshot() == before
    assert cat.add("centos5", link).kernel_sha  # the site's own paths may be links
