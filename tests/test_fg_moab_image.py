"""`fg-moab-image` and `fg-moab-group` as real processes: the repository cycle, every bad input
(nothing changed), deletes refused while in use, a disk that fills up, and the sudo design
proven with real users and groups created here (members can, non-members cannot)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pg_support
import pytest

from pxe import db
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from pxe.setboot import set_boot
from tests.conftest import ROOT, Site
from tests.test_bundle import BAD_BUNDLES, build_good_bundle, good_files, hand_bundle, manifest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
FG = BIN / "fg-moab-image"
FG_GROUP = BIN / "fg-moab-group"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (users, sudo, mounts)")


@pytest.fixture(autouse=True)
def _console_scripts() -> None:
    if not (FG.exists() and FG_GROUP.exists()):
        pytest.fail(f"{FG} missing: run tools/install-deps (pip install -e .)")


def fg(site: Site, *argv: str) -> subprocess.CompletedProcess[str]:
    return site.run(*argv, cmd=str(FG))


def fg_here(site: Site, *argv: str) -> subprocess.CompletedProcess[str]:
    """fg-moab-image from this checkout (python3 -m), whatever the installed script points at."""
    return subprocess.run([sys.executable, "-m", "msm_plugin.fg_moab_image", *argv],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DYNPROV_CONFIG": str(site.config_path)})


def add_config(site: Site, text: str) -> None:
    with open(site.config_path, "a") as fh:
        fh.write("\n" + text + "\n")


def state(site: Site) -> tuple[dict[str, bytes], list[str]]:
    """Every file, and the database by content (a WAL checkpoint rewrites its bytes). The
    database file is never opened outside SQLite: closing a plain fd on it would drop this
    process's SQLite locks. Not the checked-config cache (pxe.configcache: derived, not state)."""
    import sqlite3

    files = {}
    for path in sorted(site.root.rglob("*")):
        if path.is_file() and not path.name.startswith("dynprov.db") and \
                not path.name.endswith(".lock") and path.name != "config.cache":
            files[str(path.relative_to(site.root))] = path.read_bytes()
    if site.cfg.state.url:
        return files, pg_support.dump(site.cfg.state.url)
    conn = sqlite3.connect(site.cfg.db_path)
    try:
        return files, list(conn.iterdump())
    finally:
        conn.close()


def unchanged(site: Site, before: tuple[dict[str, bytes], list[str]]) -> bool:
    return state(site) == before


# -- the cycle -----------------------------------------------------------------------------
def test_upload_list_get_init_delete(site, tmp_path):
    path = build_good_bundle(tmp_path, "tiny")
    proc = fg(site, "-upload", "-image", str(path), "-label", "centos5")
    assert proc.returncode == 0, proc.stderr
    assert "uploaded image centos5" in proc.stdout and proc.stderr == ""
    cfg = site.cfg
    assert Catalog(cfg).labels() == ["centos5"]  # what cluster-query offers as OSLIST
    listed = json.loads(fg(site, "-list", "-json").stdout)
    assert [(e["label"], e["os_name"], e["owner"], e["bundle_bytes"]) for e in listed] == \
        [("centos5", "busybox-1.35", "root", path.stat().st_size)]
    assert "centos5" in fg(site, "--list").stdout
    out = tmp_path / "back.bundle"
    proc = fg(site, "-get", "-label", "centos5", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == path.read_bytes()
    to_stdout = subprocess.run([str(FG), "-get", "-label", "centos5", "-o", "-"],
                               capture_output=True, timeout=60,
                               env={**os.environ, "DYNPROV_CONFIG": str(site.config_path)})
    assert to_stdout.stdout == path.read_bytes()
    # the second upload of the same bundle under another label, then -init once
    assert fg(site, "--upload", "--image", str(path), "--label", "sles11", "--init").returncode == 0
    proc = fg(site, "-init")
    assert proc.returncode == 0 and "re-published the OS list" in proc.stdout
    # -init re-rendered: the first loader is staged, and `serve` answers the default config
    from pxe.serve.bootconfigs import BootConfigs

    assert (cfg.paths.tftp_root / cfg.boot.bios_loader).exists()
    served = BootConfigs(cfg)
    try:
        assert served.lookup("pxelinux.cfg/default")
    finally:
        served.close()
    image = Catalog(cfg).get("centos5")
    assert (image.cmdline, image.initrd_sha is not None, image.rootfs_name) == \
        ("console=ttyS0", True, "rootfs.tar.gz")
    assert fg(site, "-delete", "-label", "centos5").returncode == 0
    assert Catalog(cfg).labels() == ["sles11"]
    assert not (cfg.paths.state_dir / "images" / "bundles" / "centos5.bundle").exists()
    actions = [r["action"] for r in map(json.loads, (cfg.paths.state_dir / "audit.log")
                                        .read_text().splitlines())]
    assert actions == ["image-upload", "image-upload", "image-init", "image-init", "image-delete"]


def test_label_defaults_to_the_manifest(site, tmp_path):
    path = build_good_bundle(tmp_path, "fromman")
    assert fg(site, "-upload", "-image", str(path)).returncode == 0
    assert Catalog(site.cfg).labels() == ["fromman"]


def test_usage_errors_exit_2(site, tmp_path):
    assert fg(site, "--help").returncode == 0 and "-upload" in fg(site, "-help").stdout
    for argv in ([], ["-upload"], ["-upload", "-label", "x"], ["-get", "-label", "x"],
                 ["-delete"], ["-list", "-upload"], ["-list", "-init"], ["-frobnicate"],
                 ["-list", "-force"], ["-delete", "-label", "x", "-group", "gpu"]):
        proc = fg(site, *argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "fg-moab-image" in proc.stderr


# -- bad input: a clear message and nothing changed ------------------------------------------
@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundle_changes_nothing(site, tmp_path, case):
    make, message = BAD_BUNDLES[case]
    path = make(tmp_path)
    assert fg(site, "-list").returncode == 0
    before = state(site)
    proc = fg(site, "-upload", "-image", str(path), "-label", "img")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("fg-moab-image: ")
    assert unchanged(site, before)
    assert list((site.cfg.paths.state_dir / "images" / ".incoming").iterdir()) == []


@pytest.mark.parametrize("label", ["bad/label", "a b", "x;rm", "../etc", "-dash", "é"])
def test_bad_label_characters(site, tmp_path, label):
    path = build_good_bundle(tmp_path)
    assert fg(site, "-list").returncode == 0
    before = state(site)
    proc = fg(site, "-upload", "-image", str(path), f"-label={label}")
    assert proc.returncode == 2 and "invalid image label" in proc.stderr
    assert unchanged(site, before)


def test_label_that_exists_and_other_refusals(site, tmp_path):
    path = build_good_bundle(tmp_path)
    assert fg(site, "-upload", "-image", str(path), "-label", "centos5").returncode == 0
    before = state(site)
    proc = fg(site, "-upload", "-image", str(tmp_path / "missing"), "-label", "x")
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = fg(site, "-upload", "-image", str(tmp_path), "-label", "x")
    assert proc.returncode == 2
    proc = fg(site, "-get", "-label", "nosuch", "-o", str(tmp_path / "o"))
    assert proc.returncode == 1 and "unknown image label 'nosuch'" in proc.stderr
    proc = fg(site, "-delete", "-label", "nosuch")
    assert proc.returncode == 1 and "unknown image label" in proc.stderr
    assert unchanged(site, before)


def test_size_limit_and_config_checks(site, tmp_path):
    path = build_good_bundle(tmp_path)
    add_config(site, "[images]\nmax_bundle_bytes = 4096")
    assert fg(site, "-list").returncode == 0
    before = state(site)
    proc = fg(site, "-upload", "-image", str(path), "-label", "big")
    assert proc.returncode == 2 and "max_bundle_bytes" in proc.stderr
    assert unchanged(site, before)
    text = site.config_path.read_text()
    site.config_path.write_text(text.replace("max_bundle_bytes = 4096", "bogus = 1"))
    proc = fg(site, "-list")
    assert proc.returncode == 2 and "images.bogus: unknown key" in proc.stderr
    site.config_path.write_text(text.replace("max_bundle_bytes = 4096",
                                             'repository_dir = "relative/dir"'))
    proc = fg(site, "-list")
    assert proc.returncode == 2 and "images.repository_dir: must be an absolute path" in proc.stderr


def test_provisioning_initramfs_fills_in_a_missing_initrd(site, tmp_path):
    files = {k: v for k, v in good_files().items() if k != "initrd.img"}
    path = hand_bundle(tmp_path / "noinitrd.tar", files, manifest(files, initrd=None))
    assert fg(site, "-list").returncode == 0
    before = state(site)
    proc = fg(site, "-upload", "-image", str(path), "-label", "noinit")
    assert proc.returncode == 2 and "provisioning_initrd is not set" in proc.stderr
    assert unchanged(site, before)
    initramfs = tmp_path / "initramfs.cpio.gz"
    initramfs.write_bytes(b"site provisioning initramfs")
    add_config(site, f'[images]\nprovisioning_initrd = "{initramfs}"')
    assert fg(site, "-upload", "-image", str(path), "-label", "noinit").returncode == 0
    image = Catalog(site.cfg).get("noinit")
    assert image.initrd_sha == hashlib.sha256(initramfs.read_bytes()).hexdigest()


def test_stateful_disk_image_upload(site, tmp_path):
    import gzip

    from pxe import bundle
    from tests.conftest import fake_bzimage
    from tests.test_bundle import disk_image

    disk = tmp_path / "disk.img.gz"
    disk.write_bytes(gzip.compress(disk_image()))
    path = tmp_path / "sf.bundle"
    bundle.build_bundle(path, label="sf", kernel=fake_bzimage(tmp_path / "k"), rootfs=disk,
                        initrd=disk, mode="stateful")
    scripts = tmp_path / "customize" / "gpu"
    scripts.mkdir(parents=True)
    (scripts / "10-x").write_text("#!/bin/sh\ntrue\n")
    (scripts / "10-x").chmod(0o755)
    add_config(site, f'[images]\ncustomize_dir = "{scripts.parent}"')
    proc = fg(site, "-upload", "-image", str(path), "-group", "gpu")
    assert proc.returncode == 2 and "raw disk image (disk.gz) cannot be customized" in proc.stderr
    assert fg(site, "-upload", "-image", str(path)).returncode == 0
    image = Catalog(site.cfg).get("sf")
    assert (image.mode, image.rootfs_name) == ("stateful", "rootfs.disk.gz")


# -- deleting what is in use -----------------------------------------------------------------
def test_delete_in_use_needs_force(site, tmp_path):
    path = build_good_bundle(tmp_path)
    for label in ("centos5", "sles11"):
        assert fg(site, "-upload", "-image", str(path), "-label", label).returncode == 0
    cfg = site.cfg
    inv = Inventory(cfg)
    inv.add([build(cfg, {"name": "n001", "mac": "52:54:00:00:00:01"}),
             build(cfg, {"name": "n002", "mac": "52:54:00:00:00:02"})])
    set_boot(cfg, "n[001-002]", "centos5", inv)  # nodes switching to it
    inv.conn.close()
    before = state(site)
    proc = fg(site, "-delete", "-label", "centos5")
    assert proc.returncode == 1
    assert "node(s) n[001-002]" in proc.stderr and "-force" in proc.stderr
    assert unchanged(site, before)
    # a provisioning run (a job's request) that asked for sles11 and has not finished
    with contextlib.closing(db.connect(cfg.database)) as conn:
        conn.execute("INSERT INTO runs(label, mode, created) VALUES ('sles11', 'perjob', ?)",
                     (time.time(),))
    proc = fg(site, "-delete", "-label", "sles11")
    assert proc.returncode == 1 and "provisioning run(s) 1 asked for it" in proc.stderr
    proc = fg(site, "-delete", "-label", "centos5", "-force", "-init")
    assert proc.returncode == 0, proc.stderr
    assert "forced" in proc.stdout and Catalog(cfg).labels() == ["sles11"]


def test_removing_an_image_takes_its_uploaded_bundles(site, tmp_path):
    """`pxe-stage images remove LABEL` removes the bundles of every version of LABEL (once it
    left them behind), only LABEL's, and blobs only when no other label refers to them; a
    label removed before that (only its bundles left) loses them too; -delete likewise."""
    path = build_good_bundle(tmp_path)
    cfg = site.cfg
    bundles = cfg.paths.state_dir / "images" / "bundles"
    for label in ("base", "base", "base-b", "gone", "other"):  # base twice: versions 1 and 2
        proc = fg_here(site, "-upload", "-image", str(path), "-label", label)
        assert proc.returncode == 0, proc.stderr

    def names() -> list[str]:
        return sorted(p.name for p in bundles.iterdir())

    def blobs() -> set[str]:
        return {str(p.relative_to(site.root)) for root in (cfg.paths.tftp_root, cfg.paths.http_root)
                for p in (root / "blobs").iterdir() if len(p.name) == 64}

    def files(*labels: str) -> list[str]:
        return sorted(f"{label}.{ext}" for label in labels for ext in ("bundle", "json"))

    assert names() == files("base", "base@2", "base-b", "gone", "other")
    shared = blobs()  # one bundle under four labels: the same kernel, initrd, rootfs blobs
    assert len(shared) == 5  # kernel and initrd in both roots, the rootfs over HTTP
    inv = Inventory(cfg)  # in use: refused, nothing changes
    inv.add([build(cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    set_boot(cfg, "n001", "base", inv)
    before = state(site)
    proc = site.run("images", "remove", "base")
    assert proc.returncode == 1 and "use --force" in proc.stderr
    assert unchanged(site, before)
    proc = site.run("images", "remove", "base", "--force")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "removed image base and its 4 uploaded bundle file(s)\n"
    assert names() == files("base-b", "gone", "other")  # base-b is not base's
    assert blobs() == shared  # the other labels still refer to them
    # removed by the catalog alone (as `images remove` did before): the bundles stayed behind
    Catalog(cfg).remove("gone")
    proc = site.run("images", "remove", "gone")
    assert (proc.returncode, proc.stdout) == \
        (0, "removed image gone and its 2 uploaded bundle file(s)\n")
    assert names() == files("base-b", "other")
    before = state(site)
    proc = site.run("images", "remove", "gone")
    assert proc.returncode == 1 and "unknown image label 'gone'" in proc.stderr
    assert unchanged(site, before)
    proc = fg_here(site, "-delete", "-label", "base-b")
    assert proc.returncode == 0, proc.stderr
    assert names() == files("other") and blobs() == shared
    assert site.run("images", "remove", "other").returncode == 0
    assert names() == [] and blobs() == set()  # the last label referring to them


# -- a disk that fills up during the upload --------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _random_rootfs_bundle(tmp: Path, size: int) -> Path:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("filler")
        info.size = size
        tf.addfile(info, io.BytesIO(os.urandom(size)))
    files = {**good_files(), "rootfs.tar": buf.getvalue()}
    return hand_bundle(tmp / f"random-{size}.tar", files)


@as_root
@pytest.mark.parametrize("size,stage", [(1536 * 1024, "copy"), (600 * 1024, "unpack")])
def test_disk_full_during_upload(site, tmp_path, small_disk, size, stage):
    add_config(site, f'[images]\nrepository_dir = "{small_disk}"')
    path = _random_rootfs_bundle(tmp_path, size)
    assert fg(site, "-list").returncode == 0
    before = state(site)
    proc = fg(site, "-upload", "-image", str(path), "-label", "big")
    assert proc.returncode == 1, proc.stderr
    assert "no space left" in proc.stderr and "partial file was removed" in proc.stderr
    assert [p for p in small_disk.rglob("*") if not p.is_dir()] == []
    assert unchanged(site, before)
    assert Catalog(site.cfg).labels() == []
    # and the same disk still takes a bundle that fits
    small = hand_bundle(tmp_path / "small.tar")
    assert fg(site, "-upload", "-image", str(small), "-label", "fits").returncode == 0


# -- the scheduler sees the new image: OSLIST at its next poll ----------------------------------
@pytest.mark.skipif(not (ROOT / "msm_plugin" / "wiki.py").exists(), reason="the Moab face is not built")
def test_new_image_appears_in_nodes_oslist(site, tmp_path):
    from msm_plugin import wiki

    cfg = site.cfg
    with contextlib.closing(Inventory(cfg).conn) as conn:
        Inventory(cfg, conn).add([build(cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    path = build_good_bundle(tmp_path)

    def oslist(text: str) -> list[str]:
        line = next(x for x in text.splitlines() if x.startswith("n001 "))
        attrs = dict(kv.split("=", 1) for kv in line.split(" ", 1)[1].split(";") if "=" in kv)
        return attrs.get("OSLIST", "").split(",")

    assert fg(site, "-upload", "-image", str(path), "-label", "newos").returncode == 0
    # the file a file:// CLUSTERQUERYURL reads was rewritten by the upload itself
    assert "newos" in oslist(wiki.report_path(cfg.paths.state_dir).read_text())
    assert "newos" in oslist(site.run(cmd="cluster-query").stdout)
    assert fg(site, "-upload", "-image", str(path), "-label", "other", "-init").returncode == 0
    assert fg(site, "-delete", "-label", "newos").returncode == 0
    assert oslist(wiki.report_path(cfg.paths.state_dir).read_text()) == ["other"]


# -- real users, real groups, real sudo ---------------------------------------------------------
@dataclass
class People:
    group: str
    member: str
    other: str
    homes: dict[str, Path]
    sudoers: list[Path]
    config: Path

    def run(self, user: str, *argv: str, sudo: bool = True,
            cmd: Path = FG) -> subprocess.CompletedProcess[str]:
        full = ["runuser", "-u", user, "--", *(["sudo", "-n"] if sudo else []), str(cmd),
                "--config", str(self.config), *argv]
        return subprocess.run(full, capture_output=True, text=True, timeout=300,
                              cwd=self.homes[user], stdin=subprocess.DEVNULL)


def _run(*argv: str) -> None:
    """useradd & co., retried briefly: another test may hold the /etc/passwd lock."""
    for _ in range(20):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return
        if "lock" not in proc.stderr:
            break
        time.sleep(0.5)
    raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")


@pytest.fixture
def people(site: Site) -> Iterator[People]:
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    if not (shutil.which("sudo") and shutil.which("runuser") and shutil.which("useradd")):
        pytest.skip("needs sudo, runuser and useradd (tools/install-deps)")
    tag = secrets.token_hex(3)
    group, member, other = f"dpg{tag}", f"dpm{tag}", f"dpo{tag}"
    made: list[tuple[str, str]] = []
    homes: dict[str, Path] = {}
    sudoers: list[Path] = [Path(f"/etc/sudoers.d/dynprov-test-{tag}"),
                           Path(f"/etc/sudoers.d/dynprov-test-{tag}-other")]
    try:
        _run("groupadd", group)
        made.append(("groupdel", group))
        _run("useradd", "-M", "-N", "-s", "/bin/sh", "-G", group, member)
        made.append(("userdel", member))
        _run("useradd", "-M", "-N", "-s", "/bin/sh", other)
        made.append(("userdel", other))
        for user in (member, other):
            homes[user] = Path(tempfile.mkdtemp(prefix=f"{user}.", dir="/tmp"))
            shutil.chown(homes[user], user)
        add_config(site, f'[groups]\nimage = "{group}"')
        proc = fg(site, "-sudoers", "-o", str(sudoers[0]))
        assert proc.returncode == 0, proc.stderr
        yield People(group, member, other, homes, sudoers, site.config_path)
    finally:
        for path in sudoers:
            path.unlink(missing_ok=True)
        for tool, name in reversed(made):
            try:
                _run(tool, name)
            except AssertionError as exc:
                print(f"teardown: {exc}", file=sys.stderr)
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)


def _give(people: People, user: str, path: Path) -> Path:
    dest = people.homes[user] / path.name
    shutil.copy(path, dest)
    shutil.chown(dest, user)
    return dest


@as_root
def test_sudoers_rule_is_generated_and_checked(people):
    text = people.sudoers[0].read_text()
    assert f"%{people.group} ALL=(root) NOPASSWD: {FG}\n" in text
    assert oct(people.sudoers[0].stat().st_mode & 0o777) == "0o440"
    assert subprocess.run(["visudo", "-cf", str(people.sudoers[0])],
                          capture_output=True, timeout=30).returncode == 0


@as_root
def test_member_uploads_gets_and_deletes_through_sudo(site, people, tmp_path):
    mine = _give(people, people.member, build_good_bundle(tmp_path))
    proc = people.run(people.member, "-upload", "-image", str(mine), "-label", "alices")
    assert proc.returncode == 0, proc.stderr
    image = Catalog(site.cfg).get("alices")
    assert image.owner == people.member
    audit = [json.loads(x) for x in (site.cfg.paths.state_dir / "audit.log").read_text()
             .splitlines()]
    assert (audit[-1]["user"], audit[-1]["action"]) == (people.member, "image-upload")
    listed = people.run(people.member, "-list")
    assert listed.returncode == 0 and "alices" in listed.stdout
    out = people.homes[people.member] / "back.bundle"
    proc = people.run(people.member, "-get", "-label", "alices", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == mine.read_bytes()
    assert out.stat().st_uid != 0  # written as the user, not as root
    assert people.run(people.member, "-delete", "-label", "alices", "-init").returncode == 0
    assert Catalog(site.cfg).labels() == []


@as_root
def test_non_member_cannot_change_anything(site, people, tmp_path):
    theirs = _give(people, people.other, build_good_bundle(tmp_path))
    assert fg(site, "-list").returncode == 0
    before = state(site)
    # sudo itself keeps a non-member out
    proc = people.run(people.other, "-upload", "-image", str(theirs), "-label", "bobs")
    assert proc.returncode != 0 and "password is required" in proc.stderr
    # and with a broader sudo rule (a site's mistake) the program refuses, naming the group
    people.sudoers[1].write_text(f"{people.other} ALL=(root) NOPASSWD: {FG}\n")
    people.sudoers[1].chmod(0o440)
    proc = people.run(people.other, "-upload", "-image", str(theirs), "-label", "bobs")
    assert proc.returncode == 1
    assert f"permission denied: uploading an image needs membership of group " \
           f"'{people.group}' (user {people.other} is not a member)" in proc.stderr
    for argv in (["-delete", "-label", "x"], ["-init"], ["-get", "-label", "x", "-o", "o"]):
        proc = people.run(people.other, *argv)
        assert proc.returncode == 1 and "permission denied" in proc.stderr, argv
    assert unchanged(site, before)


@as_root
def test_member_gets_no_root_rights_over_paths(site, people, tmp_path):
    member = people.member
    good = _give(people, member, build_good_bundle(tmp_path))
    assert people.run(member, "-upload", "-image", str(good), "-label", "ok").returncode == 0
    before = state(site)
    secret = tmp_path / "root-only.bundle"           # root's file, unreadable for the member
    shutil.copy(good, secret)
    proc = people.run(member, "-upload", "-image", str(secret), "-label", "stolen")
    assert proc.returncode == 1 and f"user {member} cannot read" in proc.stderr
    target = Path(f"/etc/dynprov-test-{people.group}")
    proc = people.run(member, "-get", "-label", "ok", "-o", str(target))
    assert proc.returncode == 1 and "cannot write" in proc.stderr and not target.exists()
    evil = people.homes[member] / "evil.toml"
    evil.write_text(people.config.read_text())
    shutil.chown(evil, member)
    proc = subprocess.run(["runuser", "-u", member, "--", "sudo", "-n", str(FG), "--config",
                           str(evil), "-list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "only a root-owned configuration" in proc.stderr
    rule = Path(f"/etc/sudoers.d/dynprov-test-{people.group}-evil")
    proc = people.run(member, "-sudoers", "-command", "/bin/sh", "-o", str(rule))
    assert proc.returncode == 1 and "needs root itself" in proc.stderr and not rule.exists()
    assert unchanged(site, before)


@as_root
def test_fg_moab_group_add_list_remove(site, people, tmp_path):
    theirs = _give(people, people.other, build_good_bundle(tmp_path))

    def group(*argv: str) -> subprocess.CompletedProcess[str]:
        return site.run(*argv, cmd=str(FG_GROUP))

    assert group("-list").stdout.split() == [people.member]
    proc = group("-add", people.other)
    assert proc.returncode == 0, proc.stderr
    assert sorted(group("-list").stdout.split()) == sorted([people.member, people.other])
    # membership takes effect for sudo and for the program at once
    proc = people.run(people.other, "-upload", "-image", str(theirs), "-label", "bobs")
    assert proc.returncode == 0, proc.stderr
    assert group("-add", people.other).returncode == 2            # already a member
    assert group("-remove", people.other).returncode == 0
    assert group("-list").stdout.split() == [people.member]
    assert group("-remove", people.other).returncode == 2         # not a member
    proc = people.run(people.other, "-delete", "-label", "bobs")
    assert proc.returncode != 0 and Catalog(site.cfg).labels() == ["bobs"]
    proc = group("-add", f"nosuch{people.group}")
    assert proc.returncode == 2 and "no such user" in proc.stderr
    assert group("-add", "x;y").returncode == 2
    assert group().returncode == 2 and group("--help").returncode == 0
    actions = [json.loads(x)["action"] for x in (site.cfg.paths.state_dir / "audit.log")
               .read_text().splitlines()]
    assert actions.count("group-add") == 1 and actions.count("group-remove") == 1


def test_group_changes_need_root(monkeypatch):
    from pxe import groupadmin
    from pxe.authz import PermissionDenied

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionDenied, match="needs root"):
        groupadmin.add("fgimage", "root")
    with pytest.raises(PermissionDenied, match="needs root"):
        groupadmin.remove("fgimage", "root")
