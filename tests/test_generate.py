"""fg-image-generate without the network: argument checks (exit 2, nothing written), the
mmdebstrap command line, error reading, the node side, and the layout and manifest of a bundle
generated from a container image with a fake kernel."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from pxe import bundle
from pxe.errors import DynprovError, InputError
from pxe.imagegen import build, debian, pack
from tests.test_generate_support import (
    OS_RELEASE,
    fake_kernel_root,
    generate,
    tiny_container,
)

pytestmark = pytest.mark.unit


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["-os", "centos", "-label", "x"], "unknown OS 'centos'"),
    (["-version", "potato", "-label", "x"], "unknown Debian version 'potato'"),
    (["-version", "buster", "-label", "x"], "unknown Debian version 'buster'"),
    (["-arch", "arm64", "-label", "x"], "architecture 'arm64' is not supported"),
    (["-packages", "Bad_Name", "-label", "x"], "invalid package name 'Bad_Name'"),
    (["-packages", "hello;rm -rf /", "-label", "x"], "invalid package name"),
    (["-label", "../etc"], "invalid image label"),
    (["-label", "x", "-check", "echo\nhi"], "-check: one line"),
    (["-label", "x", "-cmdline", "init=/bin/sh"], "must not set init="),
    (["-label", "x", "-cmdline", "quiet; reboot"], "invalid kernel command line"),
    (["-label", "x", "-mirror", "ftp://x/debian"], "invalid mirror URL"),
    (["-label", "x", "-components", "main,evil"], "unknown archive component 'evil'"),
    (["-label", "x", "-group", "gpu"], "-group needs -customize"),
    (["-label", "x", "-from-oci", "/nonexistent.tar"], "no such file"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, argv, message):
    proc = generate(*argv, "-o", str(tmp_path / "out.bundle"), "-workdir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("fg-image-generate: ")
    assert _leftovers(tmp_path) == []


def test_usage_errors_and_help():
    assert generate().returncode == 2  # -label is required
    helped = generate("-help")
    assert helped.returncode == 0 and "-from-oci" in helped.stdout and "-packages" in helped.stdout


def test_packages_with_from_oci_and_existing_output_are_refused(tmp_path):
    image = tiny_container(tmp_path / "img.tar")
    proc = generate("-from-oci", str(image), "-packages", "hello", "-label", "x",
                    "-o", str(tmp_path / "x.bundle"))
    assert proc.returncode == 2 and "-packages goes with -os" in proc.stderr
    (tmp_path / "x.bundle").write_text("keep me")
    proc = generate("-from-oci", str(image), "-label", "x", "-o", str(tmp_path / "x.bundle"))
    assert proc.returncode == 2 and "exists (use -force" in proc.stderr
    assert (tmp_path / "x.bundle").read_text() == "keep me"


def test_not_a_container_image_is_refused_and_nothing_left(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    proc = generate("-from-oci", str(junk), "-label", "x", "-o", str(out / "x.bundle"),
                    "-kernel-root", str(fake_kernel_root(tmp_path / "k")))
    assert proc.returncode == 2 and "not a container image: not a tar archive" in proc.stderr
    plain = tmp_path / "plain.tar"  # a tar, but no manifest.json / index.json
    with tarfile.open(plain, "w") as tf:
        tf.add(__file__, arcname="notes.txt")
    proc = generate("-from-oci", str(plain), "-label", "x", "-o", str(out / "x.bundle"),
                    "-kernel-root", str(tmp_path / "k"))
    assert proc.returncode == 2 and "not an exported container image" in proc.stderr
    assert _leftovers(out) == []


def test_label_already_in_use_in_the_site_repository(site, kernel, tmp_path):
    site.run("images", "add", "taken", "--kernel", str(kernel), check=True)
    image = tiny_container(tmp_path / "img.tar")
    proc = generate("-from-oci", str(image), "-label", "taken", "-o", str(tmp_path / "t.bundle"),
                    env={"DYNPROV_CONFIG": str(site.config_path)})
    assert proc.returncode == 2, proc.stderr
    assert "image label 'taken' is already in use in the image catalog" in proc.stderr
    assert not (tmp_path / "t.bundle").exists()
    assert build.label_in_use("free", site.config_path) is None


def test_mmdebstrap_argv_sources_and_cache_hooks(tmp_path):
    req = build.check_request(build.Request(label="x", output=tmp_path / "x.bundle",
                                            version="12", packages=("openmpi-bin", "python3")))
    assert req is not None and req.suite == "bookworm"
    argv = debian.argv(req, "/w/root", Path("/var/cache/dynprov/apt/bookworm-amd64"))
    assert argv[:3] == ["mmdebstrap", "--mode=root", "--variant=minbase"]
    assert "--include=openmpi-bin,python3" in argv
    assert "--setup-hook=sync-in /var/cache/dynprov/apt/bookworm-amd64 /var/cache/apt/archives/" \
        in argv
    assert "--customize-hook=sync-out /var/cache/apt/archives /var/cache/dynprov/apt/" \
        "bookworm-amd64" in argv
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in argv
    tail = argv[argv.index("bookworm"):]
    assert tail == ["bookworm", "/w/root", f"deb {debian.MIRROR} bookworm main",
                    f"deb {debian.MIRROR} bookworm-updates main",
                    f"deb {debian.SECURITY_MIRROR} bookworm-security main"]
    sim = debian.argv(req, "/dev/null", None, simulate=True)
    assert "--simulate" in sim and not any("hook" in a for a in sim)
    with pytest.raises(InputError, match="package cache"):
        with debian.cache_dir(Path("/tmp/with space"), "bookworm", "amd64"):
            pass


def test_apt_errors_name_the_missing_packages(tmp_path):
    req = debian.Request(suite="bookworm", packages=("hello", "nosuch", "alsonot"))
    lines = ["I: running apt-get update...", "E: Unable to locate package nosuch",
             "E: Package 'alsonot' has no installation candidate",
             "E: setup failed: E: apt-get ... failed"]
    err = debian._explain(req, lines, tmp_path / "log")
    assert isinstance(err, InputError)
    assert str(err) == "package(s) not found in Debian bookworm (amd64): nosuch, alsonot"
    full = debian._explain(req, ["tar: ./usr/bin/x: No space left on device"], tmp_path / "log")
    assert "no space left" in str(full) and not isinstance(full, InputError)
    other = debian._explain(req, ["E: Failed to fetch http://x 503"], tmp_path / "log")
    assert isinstance(other, DynprovError) and "503" in str(other)


def test_image_init_and_env_are_valid_busybox_shell(tmp_path):
    for name, text in (("init", pack.IMAGE_INIT), ("env.sh", pack.ENV_SH)):
        script = tmp_path / name
        script.write_text(text)
        proc = subprocess.run(["busybox", "sh", "-n", str(script)], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    assert pack.IMAGE_INIT.startswith("#!/usr/lib/dynprov/bin/busybox sh\n")


def test_node_side_never_writes_outside_the_tree(tmp_path):
    """A container image whose usr/lib points at the host: everything still lands inside."""
    tree = tmp_path / "tree"
    outside = tmp_path / "outside"
    outside.mkdir()
    (tree / "usr").mkdir(parents=True)
    (tree / "usr" / "lib").symlink_to(outside)  # absolute: means the tree's own /.../outside
    (tree / "etc").mkdir()
    (tree / "etc" / "os-release").symlink_to("/etc/passwd")
    side = pack.add_node_side(tree, label="img", os_name="tiny-1", packages=["hello"],
                              check="hello")
    assert list(outside.iterdir()) == []
    assert not side.has_init and (tree / "etc" / "inittab").is_file()
    assert (tree / "etc" / "os-release").read_text().endswith("IMAGE_ID=img\n")
    assert not (tree / "etc" / "os-release").is_symlink()
    assert (tree / "etc" / "dynprov" / "packages").read_text() == "hello\n"


def test_os_release_gets_image_id():
    text = pack.os_release(OS_RELEASE + "IMAGE_ID=old\n", "deb12-mpi", "tiny-1.0")
    assert text.count("IMAGE_ID=") == 1 and text.endswith("IMAGE_ID=deb12-mpi\n")
    assert "ID=tiny" in text
    assert pack.os_release(None, "x", "debian-12").splitlines() == ["ID=debian", "IMAGE_ID=x"]


def test_bundle_layout_and_manifest_from_a_container_image(tmp_path):
    """The whole pipeline without the network: container image -> bundle for -upload."""
    image = tiny_container(tmp_path / "img.tar", {"usr/bin/mpirun": b"#!/bin/sh\necho mpi\n"})
    kroot = fake_kernel_root(tmp_path / "kernel")
    out = tmp_path / "out" / "tiny.bundle"
    out.parent.mkdir()
    proc = generate("-from-oci", str(image), "-label", "tiny", "-o", str(out), "-kernel-root",
                    str(kroot), "-check", "mpirun --version", "-cmdline", "quiet", "-json",
                    "-comp", "gzip")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["label"] == "tiny" and info["os_name"] == "tiny-1.0"
    assert info["kernel"] == "9.9.9-test" and info["kernel_source"] == "given"
    assert "[1/5] unpack the container image img.tar" in proc.stderr  # progress, one per step
    assert _leftovers(out.parent) == ["tiny.bundle"]  # work directory gone

    with tarfile.open(out) as tf:
        assert [m.name for m in tf.getmembers()] == ["manifest.json", "vmlinuz", "initrd.img",
                                                     "rootfs.squashfs"]
    found = bundle.open_bundle(out, tmp_path / "members")
    man = found.manifest
    assert (man.label, man.os_name, man.arch, man.mode) == ("tiny", "tiny-1.0", "x86_64",
                                                           "stateless")
    assert man.cmdline == "console=tty0 console=ttyS0,115200 quiet init=/usr/lib/dynprov/init"
    assert man.kernel == "vmlinuz" and man.initrd == "initrd.img"
    assert man.rootfs == "rootfs.squashfs" and found.rootfs_kind == "squashfs"
    assert found.kernel.read_bytes() == (kroot / "boot/vmlinuz-9.9.9-test").read_bytes()

    listing = subprocess.run(["unsquashfs", "-lls", str(found.rootfs)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    for path in ("usr/lib/dynprov/init", "usr/lib/dynprov/agent", "usr/lib/dynprov/lib.sh",
                 "usr/lib/dynprov/bin/busybox", "usr/lib/dynprov/bin/wget", "usr/bin/mpirun",
                 "etc/dynprov/check", "etc/dynprov/modules", "etc/inittab",
                 "lib/modules/9.9.9-test/modules.dep",
                 "lib/modules/9.9.9-test/kernel/drivers/squashfs.ko"):
        assert f"squashfs-root/{path}" in listing, path
    for line in listing.splitlines():
        if line.endswith("squashfs-root/usr/lib/dynprov/init"):
            assert line.startswith("-rwxr-xr-x root/root")
    cat = subprocess.run(["unsquashfs", "-cat", str(found.rootfs), "etc/os-release"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "IMAGE_ID=tiny" in cat and "ID=tiny" in cat
    check = subprocess.run(["unsquashfs", "-cat", str(found.rootfs), "etc/dynprov/check"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert check == "mpirun --version\n"

    # the initrd is the provisioning initramfs built for that kernel
    initrd = subprocess.run(["sh", "-c", f"zcat {found.initrd} | cpio -t 2>/dev/null"],
                            capture_output=True, text=True, timeout=60).stdout.split()
    assert "init" in initrd and "lib/modules/9.9.9-test/kernel/drivers/squashfs.ko" in initrd
