"""Image bundles: the format, the builder (root tree, container images) and every bad input.

Archives are real tar files built here; kernels come from conftest.fake_bzimage(); the tiny
image is a real busybox root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pxe import bundle
from pxe.errors import InputError
from tests.conftest import ROOT, fake_bzimage

pytestmark = pytest.mark.unit

BUSYBOX = Path("/usr/bin/busybox")  # busybox-static (tools/install-deps)
MAKE_BUNDLE = ROOT / "tools" / "make-bundle"


# -- helpers (also used by tests/test_fg_moab_image.py) --------------------------------------
def busybox_tree(root: Path) -> Path:
    """A tiny real root: static busybox, its applet links, os-release."""
    for d in ("bin", "etc", "dev", "proc", "sys", "tmp", "usr/lib"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "ls", "echo", "mount"):
        os.symlink("busybox", root / "bin" / applet)
    os.symlink("usr/lib", root / "lib")
    (root / "etc" / "os-release").write_text('ID=busybox\nVERSION_ID="1.35"\n')
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tarinfo(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "",
            mode: int = 0o644, uid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mode, info.uid = size, kind, link, mode, uid
    return info


def write_tar(path: Path, entries: list[tuple[str, Any]], mode: str = "w") -> Path:
    """entries: (name, bytes) for files, or (name, ("sym"|"hard", target)), (name, ("dir",)),
    (name, ("chr",)), (name, ("fifo",))."""
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for name, what in entries:
            if isinstance(what, bytes):
                tf.addfile(tarinfo(name, len(what)), io.BytesIO(what))
            elif what[0] == "sym":
                tf.addfile(tarinfo(name, kind=tarfile.SYMTYPE, link=what[1]))
            elif what[0] == "hard":
                tf.addfile(tarinfo(name, kind=tarfile.LNKTYPE, link=what[1]))
            elif what[0] == "dir":
                tf.addfile(tarinfo(name, kind=tarfile.DIRTYPE, mode=0o755))
            elif what[0] == "chr":
                info = tarinfo(name, kind=tarfile.CHRTYPE)
                info.devmajor, info.devminor = 1, 3
                tf.addfile(info)
            elif what[0] == "fifo":
                tf.addfile(tarinfo(name, kind=tarfile.FIFOTYPE))
    return path


def kernel_bytes() -> bytes:
    head = bytearray(0x400)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    return bytes(head) + b"kernel-payload"


def manifest(files: dict[str, bytes], **over: Any) -> bytes:
    data: dict[str, Any] = {"format": bundle.FORMAT, "label": "tiny", "os_name": "busybox",
                            "arch": "x86_64", "mode": "stateless", "cmdline": "console=ttyS0",
                            "kernel": "vmlinuz", "initrd": "initrd.img",
                            "sha256": {n: sha(b) for n, b in files.items()}}
    if "rootfs.tar" in files:
        data["rootfs"] = "rootfs.tar"
    data.update(over)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def tiny_rootfs_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(tarinfo("bin", kind=tarfile.DIRTYPE, mode=0o755))
        tf.addfile(tarinfo("bin/hello", 5, mode=0o755), io.BytesIO(b"hello"))
        tf.addfile(tarinfo("bin/sh", kind=tarfile.SYMTYPE, link="/bin/busybox"))
    return buf.getvalue()


def good_files() -> dict[str, bytes]:
    return {"vmlinuz": kernel_bytes(), "initrd.img": b"initrd", "rootfs.tar": tiny_rootfs_tar()}


def hand_bundle(path: Path, files: dict[str, Any] | None = None,
                man: bytes | None = None, extra: tuple[tuple[str, Any], ...] = ()) -> Path:
    """A bundle written by hand (so that it can be wrong in every way)."""
    files = good_files() if files is None else files
    man = manifest({n: b for n, b in files.items() if isinstance(b, bytes)}) if man is None else man
    return write_tar(path, [("manifest.json", man), *files.items(), *extra])


def build_good_bundle(tmp: Path, label: str = "tiny", rootfs_bytes: int = 0,
                      mode: str = "stateless") -> Path:
    """A real bundle from a busybox root tree via the builder (rootfs.tar.gz)."""
    tree = busybox_tree(tmp / f"tree-{label}")
    if rootfs_bytes:
        (tree / "filler").write_bytes(os.urandom(rootfs_bytes))
    kernel = fake_bzimage(tmp / f"vmlinuz-{label}", os.urandom(2048))
    initrd = tmp / f"initrd-{label}"
    initrd.write_bytes(b"provisioning initramfs stand-in")
    fmt = "tar" if rootfs_bytes else "tar.gz"
    rootfs = bundle.rootfs_from_tree(tree, tmp / f"rootfs-{label}.{fmt}", fmt)
    out = tmp / f"{label}.bundle"
    bundle.build_bundle(out, label=label, kernel=kernel, initrd=initrd, rootfs=rootfs,
                        os_name="busybox-1.35", mode=mode, cmdline="console=ttyS0")
    return out


# bad bundles: name -> (builder(tmp) -> path, expected message)
def _truncated(tmp: Path) -> Path:
    good = hand_bundle(tmp / "good.tar")
    data = good.read_bytes()
    out = tmp / "cut.tar"
    out.write_bytes(data[: len(data) // 2])
    return out


def _truncated_gz(tmp: Path) -> Path:
    data = gzip.compress(hand_bundle(tmp / "good.tar").read_bytes())
    out = tmp / "cut.tar.gz"
    out.write_bytes(data[: len(data) - 40])
    return out


def _with_member(entry: tuple[str, Any]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        return hand_bundle(tmp / "b.tar", extra=(entry,))
    return make


def _manifest(**over: Any) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        files = good_files()
        return hand_bundle(tmp / "b.tar", files, manifest(files, **over))
    return make


def _no_kernel_member(tmp: Path) -> Path:
    files = good_files()
    man = manifest(files)
    del files["vmlinuz"]
    return hand_bundle(tmp / "b.tar", files, man)


def _not_a_kernel(tmp: Path) -> Path:
    files = {**good_files(), "vmlinuz": b"\x7fELF" + b"\0" * 2000}
    return hand_bundle(tmp / "b.tar", files)


def _checksum_mismatch(tmp: Path) -> Path:
    files = good_files()
    man = manifest(files)
    files["initrd.img"] = b"tampered"
    return hand_bundle(tmp / "b.tar", files, man)


def _text(content: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        out = tmp / "b.bundle"
        out.write_bytes(content)
        return out
    return make


def _rootfs(content: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        return hand_bundle(tmp / "b.tar", {**good_files(), "rootfs.tar": content})
    return make


def _rootfs_tar(entries: list[tuple[str, Any]]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        inner = write_tar(tmp / "inner.tar", entries).read_bytes()
        return hand_bundle(tmp / "b.tar", {**good_files(), "rootfs.tar": inner})
    return make


def _duplicate(tmp: Path) -> Path:
    files = good_files()
    return write_tar(tmp / "b.tar", [("manifest.json", manifest(files)), *files.items(),
                                     ("initrd.img", b"second copy")])


BAD_BUNDLES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not-an-archive": (_text(b"this is not a tar archive\n" * 40), "not a bundle"),
    "empty-file": (_text(b""), "not a bundle"),
    "truncated": (_truncated, "truncated"),
    "truncated-gzip": (_truncated_gz, "truncated or corrupt"),
    "no-manifest": (lambda t: write_tar(t / "b.tar", list(good_files().items())),
                    "no manifest.json"),
    "no-kernel-member": (_no_kernel_member, "no kernel"),
    "no-kernel-key": (_manifest(kernel=...), "missing key 'kernel'"),
    "kernel-not-a-kernel": (_not_a_kernel, "is not a Linux kernel"),
    "dotdot": (_with_member(("../../etc/cron.d/evil", b"x")), "contains '..' (tar-slip)"),
    "dotdot-inside": (_with_member(("a/../../evil", b"x")), "contains '..' (tar-slip)"),
    "absolute": (_with_member(("/etc/passwd", b"x")), "absolute path (tar-slip)"),
    "symlink-out": (_with_member(("initrd2", ("sym", "/etc/shadow"))),
                    "symbolic link to '/etc/shadow' points outside the bundle"),
    "symlink-out-relative": (_with_member(("initrd2", ("sym", "../../etc/shadow"))),
                             "points outside the bundle"),
    "hardlink-out": (_with_member(("initrd2", ("hard", "/etc/shadow"))),
                     "hard link to '/etc/shadow' points outside the bundle"),
    "hardlink-out-relative": (_with_member(("initrd2", ("hard", "../etc/shadow"))),
                              "hard link to '../etc/shadow' points outside"),
    "symlink-inside": (_with_member(("initrd2", ("sym", "initrd.img"))),
                       "must be regular files"),
    "device": (_with_member(("null", ("chr",))), "device file not allowed"),
    "fifo": (_with_member(("pipe", ("fifo",))), "FIFO not allowed"),
    "subdirectory": (_with_member(("boot/vmlinuz", b"x")), "top-level files only"),
    "duplicate": (_duplicate, "appears twice"),
    "unlisted-member": (_with_member(("extra.bin", b"x")), "not listed in the manifest"),
    "checksum-mismatch": (_checksum_mismatch, "checksum mismatch for member 'initrd.img'"),
    "bad-json": (lambda t: hand_bundle(t / "b.tar", man=b"{not json"), "not valid JSON"),
    "unknown-key": (_manifest(owner="me"), "unknown key(s) 'owner'"),
    "format": (_manifest(format="dynprov-bundle/9"), "is not supported"),
    "bad-label": (_manifest(label="bad label!"), "invalid image label"),
    "bad-label-slash": (_manifest(label="../etc"), "invalid image label"),
    "bad-arch": (_manifest(arch="sparc"), "invalid arch"),
    "bad-cmdline": (_manifest(cmdline="x; rm -rf /"), "invalid kernel command line"),
    "bad-sha": (_manifest(sha256={"vmlinuz": "abc"}), "64 lower-case hex"),
    "stateful-no-rootfs": (_manifest(mode="stateful", rootfs=None),
                           "stateful image needs a root filesystem"),
    "rootfs-garbage": (_rootfs(b"\0" * 4096), "neither squashfs, a tar archive nor a raw disk"),
    "stateless-disk": (_rootfs(gzip.compress(b"\0" * 510 + b"\x55\xaa" + b"\0" * 4096)),
                       "a stateless image needs squashfs or a tar archive"),
    "stateful-tar": (_manifest(mode="stateful"), "a stateful image needs a raw disk image"),
    "rootfs-corrupt-gzip": (_rootfs(b"\x1f\x8b\x08\x00" + b"\xff" * 64), "corrupt gz data"),
    "rootfs-dotdot": (_rootfs_tar([("../../etc/passwd", b"x")]), "contains '..' (tar-slip)"),
    "rootfs-absolute": (_rootfs_tar([("/etc/passwd", b"x")]), "absolute path (tar-slip)"),
    "rootfs-through-symlink": (_rootfs_tar([("etc", ("sym", "/etc")), ("etc/passwd", b"x")]),
                               "goes through the symbolic link 'etc'"),
    "rootfs-hardlink-out": (_rootfs_tar([("x", ("hard", "../../etc/shadow"))]),
                            "hard link to '../../etc/shadow' points outside"),
}


# -- the format ------------------------------------------------------------------------------
def test_build_from_busybox_tree_and_read_back(tmp_path):
    path = build_good_bundle(tmp_path)
    names = [m.name for m in tarfile.open(path).getmembers()]
    assert names == ["manifest.json", "vmlinuz", "initrd.img", "rootfs.tar.gz"]
    found = bundle.open_bundle(path, tmp_path / "out")
    man = found.manifest
    assert (man.label, man.os_name, man.arch, man.mode, man.cmdline) == \
        ("tiny", "busybox-1.35", "x86_64", "stateless", "console=ttyS0")
    assert found.rootfs_kind == "tar.gz"
    for name, digest in man.sha256.items():
        assert sha((found.directory / name).read_bytes()) == digest
    # the root filesystem is a working busybox root, owned by root
    tree = tmp_path / "unpacked"
    tree.mkdir()
    with tarfile.open(found.rootfs) as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
        assert all(m.uid == 0 and m.uname == "root" for m in members.values())
    bundle.extract_rootfs(found.rootfs, tree)
    out = subprocess.run([str(tree / "bin" / "busybox"), "echo", "hi"], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout == "hi\n"


def test_bundle_build_is_reproducible(tmp_path):
    kernel = fake_bzimage(tmp_path / "k", b"x" * 100)
    rootfs = tmp_path / "r.tar"
    rootfs.write_bytes(tiny_rootfs_tar())
    a, b = tmp_path / "a.bundle", tmp_path / "b.bundle"
    for out in (a, b):
        bundle.build_bundle(out, label="tiny", kernel=kernel, rootfs=rootfs)
    assert a.read_bytes() == b.read_bytes()


def test_squashfs_rootfs(tmp_path):
    tree = busybox_tree(tmp_path / "tree")
    squash = bundle.rootfs_from_tree(tree, tmp_path / "root.squashfs", "squashfs")
    assert bundle.rootfs_kind(squash) == "squashfs"
    kernel = fake_bzimage(tmp_path / "k")
    out = tmp_path / "sq.bundle"
    man = bundle.build_bundle(out, label="sq", kernel=kernel, rootfs=squash)
    assert man.rootfs == "rootfs.squashfs"
    found = bundle.open_bundle(out, tmp_path / "o")
    listing = subprocess.run(["unsquashfs", "-l", str(found.rootfs)], capture_output=True,
                             text=True, timeout=60).stdout
    assert "squashfs-root/bin/busybox" in listing


def disk_image(size: int = 64 * 1024) -> bytes:
    """A raw disk image as the node writes it: an MBR (signature 55aa) and zeros."""
    return b"\0" * 510 + b"\x55\xaa" + b"\0" * (size - 512)


@pytest.mark.parametrize("compress", [None, "gz", "xz", "bz2"])
def test_stateful_bundle_carries_a_disk_image(tmp_path, compress):
    import bz2
    import lzma

    raw = disk_image()
    data = {None: raw, "gz": gzip.compress(raw), "xz": lzma.compress(raw),
            "bz2": bz2.compress(raw)}[compress]
    disk = tmp_path / "disk.img"
    disk.write_bytes(data)
    kernel = fake_bzimage(tmp_path / "k")
    out = tmp_path / "sf.bundle"
    man = bundle.build_bundle(out, label="sf", kernel=kernel, rootfs=disk, mode="stateful")
    kind = "disk" + (f".{compress}" if compress else "")
    assert man.rootfs == f"rootfs.{kind}"
    found = bundle.open_bundle(out, tmp_path / "o")
    assert (found.manifest.mode, found.rootfs_kind) == ("stateful", kind)
    with pytest.raises(InputError, match="a stateless image needs squashfs"):
        bundle.build_bundle(tmp_path / "x.bundle", label="x", kernel=kernel, rootfs=disk)


def test_hand_written_good_bundle_is_accepted(tmp_path):
    found = bundle.open_bundle(hand_bundle(tmp_path / "b.tar"), tmp_path / "o")
    assert found.manifest.rootfs == "rootfs.tar" and found.rootfs_kind == "tar"
    gz = tmp_path / "b.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "b.tar").read_bytes()))
    assert bundle.open_bundle(gz, tmp_path / "o2").manifest.label == "tiny"


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundle_is_refused_clearly(tmp_path, case):
    make, message = BAD_BUNDLES[case]
    path = make(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(InputError) as err:
        bundle.open_bundle(path, tmp_path / "out")
    assert message in str(err.value)
    assert list(outside.iterdir()) == []
    # nothing but plain files we created ever lands in the unpack directory
    for entry in (tmp_path / "out").iterdir():
        assert entry.is_file() and not entry.is_symlink()


def test_size_limit(tmp_path):
    path = hand_bundle(tmp_path / "b.tar")
    with pytest.raises(InputError, match="max_bundle_bytes"):
        bundle.open_bundle(path, tmp_path / "o", max_bytes=1024)


# -- container images ------------------------------------------------------------------------
def _layer(entries: list[tuple[str, Any]], gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, what in entries:
            if isinstance(what, bytes):
                tf.addfile(tarinfo(name, len(what), mode=0o755, uid=1000 if "home" in name
                                   else 0), io.BytesIO(what))
            elif what[0] == "sym":
                tf.addfile(tarinfo(name, kind=tarfile.SYMTYPE, link=what[1]))
            elif what[0] == "hard":
                tf.addfile(tarinfo(name, kind=tarfile.LNKTYPE, link=what[1]))
            elif what[0] == "dir":
                tf.addfile(tarinfo(name, kind=tarfile.DIRTYPE, mode=0o755))
            elif what[0] == "chr":
                tf.addfile(tarinfo(name, kind=tarfile.CHRTYPE))
    data = buf.getvalue()
    return gzip.compress(data, mtime=0) if gz else data


def standard_layers(outside: Path) -> list[tuple[list[tuple[str, Any]], bool]]:
    busybox = BUSYBOX.read_bytes()
    return [
        ([("bin", ("dir",)), ("bin/busybox", busybox), ("bin/sh", ("sym", "busybox")),
          ("etc", ("dir",)), ("etc/os-release", b'ID=debian\nVERSION_ID="12"\n'),
          ("etc/removed", b"gone in layer 2"), ("usr/lib/a", b"a"), ("lib", ("sym", "usr/lib")),
          ("opt/old1", b"1"), ("opt/old2", b"2"), ("home/user/file", b"users"),
          ("evil", ("sym", str(outside)))], True),
        ([("etc/.wh.removed", b""), ("opt/.wh..wh..opq", b""), ("opt/new", b"new"),
          ("lib/b", b"through the lib symlink"), ("bin/busybox2", ("hard", "bin/busybox"))],
         False),
        ([("evil/pwned", b"must stay inside the tree")], True),
    ]


def oci_tarball(path: Path, layers: list[tuple[list[tuple[str, Any]], bool]],
                arch: str = "amd64", corrupt_digest: bool = False, zstd: bool = False) -> Path:
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = sha(data)
        blobs[digest] = data
        return f"sha256:{digest}"

    layer_descs: list[dict[str, Any]] = []
    for layer_entries, gz in layers:
        data = _layer(layer_entries, gz)
        digest = blob(data)
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
        if zstd:
            media = "application/vnd.oci.image.layer.v1.tar+zstd"
        layer_descs.append({"mediaType": media, "digest": digest, "size": len(data)})
    if corrupt_digest:
        first = str(layer_descs[0]["digest"]).split(":")[1]
        blobs[first] = blobs[first][:-1] + bytes([blobs[first][-1] ^ 1])
    config = json.dumps({"architecture": arch, "os": "linux"}).encode()
    man = json.dumps({"schemaVersion": 2, "config": {"digest": blob(config)},
                      "layers": layer_descs}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(man),
         "platform": {"architecture": arch, "os": "linux"}}]}).encode()
    entries: list[tuple[str, Any]] = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                                      ("index.json", index)]
    entries += [(f"blobs/sha256/{d}", b) for d, b in blobs.items()]
    return write_tar(path, entries)


def docker_save_tarball(path: Path, layers: list[tuple[list[tuple[str, Any]], bool]]) -> Path:
    entries: list[tuple[str, Any]] = []
    names = []
    for i, (layer_entries, _gz) in enumerate(layers):
        names.append(f"layer{i}/layer.tar")
        entries.append((names[-1], _layer(layer_entries, False)))
    entries.append(("cfg.json", json.dumps({"architecture": "arm64"}).encode()))
    entries.append(("manifest.json", json.dumps([{"Config": "cfg.json", "RepoTags": ["x:1"],
                                                  "Layers": names}]).encode()))
    return write_tar(path, entries)


def check_tree(tree: Path, outside: Path) -> None:
    assert not (tree / "etc" / "removed").exists()            # whiteout
    assert sorted(p.name for p in (tree / "opt").iterdir()) == ["new"]  # opaque directory
    assert (tree / "usr" / "lib" / "b").read_text() == "through the lib symlink"
    assert (tree / "lib").is_symlink()
    assert os.path.samefile(tree / "bin" / "busybox2", tree / "bin" / "busybox")
    assert not (outside / "pwned").exists()                    # the escape stayed inside
    assert (tree / outside.relative_to("/") / "pwned").read_text() == "must stay inside the tree"
    assert list(outside.iterdir()) == []


def test_oci_layout_layers_whiteouts_and_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tarball = oci_tarball(tmp_path / "oci.tar", standard_layers(outside), arch="arm64")
    tree = tmp_path / "tree"
    image = bundle.tree_from_container(tarball, tree)
    assert (image.arch, image.os_name, image.layers) == ("aarch64", "debian-12", 3)
    check_tree(tree, outside)
    assert image.owners["home/user/file"][0] == 1000


def test_docker_save_format(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tarball = docker_save_tarball(tmp_path / "docker.tar", standard_layers(outside))
    image = bundle.tree_from_container(tarball, tmp_path / "tree")
    assert image.arch == "aarch64" and image.layers == 3
    check_tree(tmp_path / "tree", outside)


@pytest.mark.parametrize("case,layers,kwargs,message", [
    ("dotdot", [([("../escape", b"x")], True)], {}, "contains '..' (tar-slip)"),
    ("absolute", [([("/etc/escape", b"x")], False)], {}, "absolute path (tar-slip)"),
    ("device", [([("dev/null", ("chr",))], False)], {}, "device file not allowed"),
    ("hardlink-out", [([("x", ("hard", "../../etc/shadow"))], False)], {},
     "hard link to '../../etc/shadow' points outside the tree (tar-slip)"),
    ("digest", [([("a", b"a")], True)], {"corrupt_digest": True}, "checksum mismatch"),
    ("zstd", [([("a", b"a")], False)], {"zstd": True}, "zstd-compressed layers"),
    ("arch", [([("a", b"a")], False)], {"arch": "s390x"}, "architecture 's390x'"),
])
def test_bad_container_images(tmp_path, case, layers, kwargs, message):
    tarball = oci_tarball(tmp_path / "oci.tar", layers, **kwargs)
    with pytest.raises(InputError, match=re.escape(message)):
        bundle.tree_from_container(tarball, tmp_path / "tree")
    assert not (tmp_path / "escape").exists()


def test_layer_checksum_mismatch_with_valid_compression(tmp_path):
    tarball = oci_tarball(tmp_path / "oci.tar", [([("a", b"a")], False)])
    # swap a layer's bytes for another valid layer: the tar reads fine, the digest does not
    with tarfile.open(tarball) as tf:
        entries = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]
    layer_name = next(n for n, d in entries if d.startswith(b"a\0"))
    swapped = [(n, _layer([("b", b"b")], False) if n == layer_name else d) for n, d in entries]
    write_tar(tmp_path / "swapped.tar", swapped)
    with pytest.raises(InputError, match="checksum mismatch"):
        bundle.tree_from_container(tmp_path / "swapped.tar", tmp_path / "tree")


def test_not_a_container_image(tmp_path):
    plain = write_tar(tmp_path / "plain.tar", [("hello", b"x")])
    with pytest.raises(InputError, match="not an exported container image"):
        bundle.tree_from_container(plain, tmp_path / "t1")
    junk = tmp_path / "junk"
    junk.write_bytes(b"junk" * 100)
    with pytest.raises(InputError, match="not a tar archive"):
        bundle.tree_from_container(junk, tmp_path / "t2")


# -- the builder's command line -------------------------------------------------------------
def make_bundle(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(MAKE_BUNDLE), *argv], capture_output=True,
                          text=True, timeout=300)


def test_make_bundle_from_container_then_check(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tarball = oci_tarball(tmp_path / "oci.tar", standard_layers(outside))
    kernel = fake_bzimage(tmp_path / "vmlinuz")
    out = tmp_path / "deb.bundle"
    proc = make_bundle("--label", "deb12", "--container", str(tarball), "--kernel", str(kernel),
                       "--cmdline", "console=ttyS0", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    check = make_bundle("--check", str(out))
    assert check.returncode == 0, check.stderr
    man = json.loads(check.stdout)
    assert (man["label"], man["os_name"], man["arch"], man["rootfs"]) == \
        ("deb12", "debian-12", "x86_64", "rootfs.tar.gz")
    found = bundle.open_bundle(out, tmp_path / "o")
    with tarfile.open(found.rootfs) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members["home/user/file"].uid == 1000            # ownership from the layer
    assert members["bin/busybox"].uid == 0
    assert "etc/removed" not in members and "opt/old1" not in members


def test_make_bundle_from_root_tree_finds_the_kernel(tmp_path):
    tree = busybox_tree(tmp_path / "tree")
    (tree / "boot").mkdir()
    fake_bzimage(tree / "boot" / "vmlinuz-6.1.0-test")
    out = tmp_path / "bb.bundle"
    proc = make_bundle("--label", "bb", "--root", str(tree), "--format", "squashfs",
                       "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert bundle.open_bundle(out, tmp_path / "o").rootfs_kind == "squashfs"


def test_make_bundle_usage_errors(tmp_path):
    tree = busybox_tree(tmp_path / "tree")
    proc = make_bundle("--label", "bb", "--root", str(tree), "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "no kernel" in proc.stderr
    proc = make_bundle("--label", "bad label", "--root", str(tree), "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "invalid image label" in proc.stderr
    assert make_bundle("--root", str(tree)).returncode == 2
    proc = make_bundle("--label", "bb", "--root", str(tree), "--mode", "stateful",
                       "--kernel", str(fake_bzimage(tmp_path / "k")), "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "needs a raw disk image" in proc.stderr
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(b"nope")
    proc = make_bundle("--check", str(bad))
    assert proc.returncode == 2 and "not a bundle" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("os_name", [..., None, ""], ids=["absent", "null", "empty"])
def test_manifest_os_name_is_optional(os_name):
    """docs/images.md: os_name defaults to the label."""
    man = bundle.Manifest.parse(manifest(good_files(), os_name=os_name))
    assert man.os_name == "tiny"
