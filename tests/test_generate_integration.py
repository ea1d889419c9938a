"""fg-image-generate for real: mmdebstrap against the Debian archive (the package registry this
machine reaches), a package that does not exist, and disks too small for the build.

Kept few on purpose: one real Debian build per session (shared with the e2e test through
tests/test_generate_support.debian_bundle), one package-list check (~10 s)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pxe import bundle
from pxe.errors import DynprovError
from pxe.imagegen import build, debian
from tests.test_generate_support import (
    CHECK,
    PACKAGE,
    debian_bundle,
    fake_kernel_root,
    generate,
    small_tmpfs,
    tiny_container,
)

pytestmark = pytest.mark.integration
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mmdebstrap root mode, mounts)")


def _need_tools() -> None:
    for tool in ("mmdebstrap", "mksquashfs"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (tools/install-deps)")


@as_root
def test_minimal_debian_image_with_one_package(tmp_path_factory, tmp_path):
    _need_tools()
    out = debian_bundle(tmp_path_factory)
    found = bundle.open_bundle(out, tmp_path / "m")
    man = found.manifest
    assert (man.label, man.os_name, man.mode) == ("deb12-hello", "debian-12", "stateless")
    assert man.cmdline.endswith("init=/usr/lib/dynprov/init")
    assert found.rootfs_kind == "squashfs"
    listing = subprocess.run(["unsquashfs", "-l", str(found.rootfs)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    for path in (f"usr/bin/{PACKAGE}", "usr/lib/dynprov/init", "usr/lib/dynprov/agent",
                 "usr/bin/dpkg-query", "etc/dynprov/packages"):
        assert f"squashfs-root/{path}" in listing, path
    # slim: no manuals, no .debs left from the build, no package lists
    assert "squashfs-root/usr/share/man/man1/hello.1.gz" not in listing
    assert not any(line.endswith(".deb") for line in listing.splitlines())
    release = subprocess.run(["unsquashfs", "-cat", str(found.rootfs), "etc/os-release"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert "ID=debian" in release and "IMAGE_ID=deb12-hello" in release
    packages = subprocess.run(["unsquashfs", "-cat", str(found.rootfs), "etc/dynprov/check"],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    assert packages == f"{CHECK}\n"
    # the package cache kept the downloads for the next build
    count, size = debian.cache_stats(debian.DEFAULT_CACHE / "bookworm-amd64")
    assert count > 50 and size > 10_000_000
    print(f"bundle {out.stat().st_size / 1e6:.1f} MB, package cache {count} debs "
          f"{size / 1e6:.0f} MB")


@as_root
def test_a_package_that_does_not_exist_is_named_and_nothing_is_left(tmp_path):
    _need_tools()
    out = tmp_path / "out"
    out.mkdir()
    cache = tmp_path / "cache"
    proc = generate("-packages", f"{PACKAGE},no-such-package-dynprov", "-label", "bad",
                    "-o", str(out / "bad.bundle"), "-cache", str(cache))
    assert proc.returncode == 2, proc.stderr
    assert ("package(s) not found in Debian bookworm (amd64): no-such-package-dynprov"
            in proc.stderr), proc.stderr
    assert PACKAGE + "," not in proc.stderr.split("not found")[1]
    assert list(out.iterdir()) == []
    assert [p.name for p in (cache / "bookworm-amd64").iterdir()] == [".lock"]  # nothing synced


@as_root
def test_disk_too_small_is_refused_before_the_build(tmp_path):
    _need_tools()
    with small_tmpfs(tmp_path, "16m") as disk:
        proc = generate("-packages", PACKAGE, "-label", "small", "-o", str(disk / "s.bundle"),
                        "-no-cache")
        assert proc.returncode == 1, proc.stderr
        assert "not enough disk space for a Debian build" in proc.stderr
        assert "MiB free" in proc.stderr
        assert list(disk.iterdir()) == []


@as_root
def test_disk_filling_up_during_the_build_leaves_nothing(tmp_path, monkeypatch):
    """The estimate said yes, the disk said no (ENOSPC in the middle): a clear error, the work
    directory and any partial output removed."""
    from pxe.imagegen.progress import Progress

    image = tiny_container(tmp_path / "big.tar", {"data/blob": os.urandom(12 << 20)})
    kroot = fake_kernel_root(tmp_path / "k")
    monkeypatch.setattr(build, "_need_space", lambda *a: None)
    with small_tmpfs(tmp_path, "20m") as disk:
        req = build.Request(label="big", output=disk / "big.bundle", from_oci=image,
                            kernel_root=kroot, compressor="gzip", config=Path("/nonexistent"))
        monkeypatch.setattr(build, "label_in_use", lambda *a: None)
        with pytest.raises(DynprovError, match="no space left on device while building big"):
            build.generate(req, Progress(0, quiet=True))
        assert list(disk.iterdir()) == []
