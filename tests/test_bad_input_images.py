"""Hostile inputs to the image commands, through the real console scripts and the REST service.

Each case is what a user could try - another user's image, a huge (sparse) file, a FIFO, a
symbolic link, /dev/zero, a directory, a file they cannot read, a crafted label, a garbage or
dangerous bundle, a label that is taken - and each checks the refusal message, the exit code
(or HTTP status) and that nothing stored changed (Site.snapshot()). Real unix users and groups
(made here, removed after) act through sudo and PAM; huge files are sparse, never written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pxe.images import Catalog
from tests.conftest import ROOT, Site, fake_bzimage, make_site
from tests.test_bundle import good_files, hand_bundle, manifest, write_tar

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
FG = BIN / "fg-moab-image"
GIB = 1 << 30


def run(site: Site, *argv: str, cmd: str = "pxe-stage", env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A console script as a real process; a hang (FIFO) fails by the timeout."""
    module = {"pxe-stage": "pxe.cli.main", "fg-moab-image": "msm_plugin.fg_moab_image",
              "fg-image-generate": "pxe.cli.fg_image_generate"}[cmd]
    full_env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def refused(proc: subprocess.CompletedProcess[str], code: int, *messages: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one clear line
    for message in messages:
        assert message in proc.stderr, (message, proc.stderr)


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of ``size`` bytes that uses no disk: ``head`` then a hole."""
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


def kernel_head() -> bytes:
    return fake_bzimage(Path(tempfile.mkdtemp()) / "k").read_bytes()


@pytest.fixture
def files(site: Site, tmp_path: Path) -> dict[str, Path]:
    """Good inputs for `images add`, and the site's database created (so snapshots compare)."""
    made = {"kernel": fake_bzimage(tmp_path / "vmlinuz", os.urandom(1024)),
            "initrd": tmp_path / "initrd.img", "rootfs": tmp_path / "rootfs.tar"}
    made["initrd"].write_bytes(os.urandom(2048))
    made["rootfs"].write_bytes(good_files()["rootfs.tar"])
    assert run(site, "images", "list").returncode == 0
    return made


def add(site: Site, label: str, f: dict[str, Path], *extra: str,
        env: dict[str, str] | None = None, **over: Path) -> subprocess.CompletedProcess[str]:
    paths = {**f, **over}
    return run(site, "images", "add", label, "--kernel", str(paths["kernel"]), "--initrd",
               str(paths["initrd"]), "--rootfs", str(paths["rootfs"]), *extra, env=env)


# -- pxe-stage images add: what it is given to read ---------------------------------------------
def _symlink_to(target: Callable[[dict[str, Path], Path], Path]):
    def make(f: dict[str, Path], tmp: Path) -> Path:
        link = tmp / f"link-{secrets.token_hex(3)}"
        link.symlink_to(target(f, tmp))
        return link
    return make


def _secret(f: dict[str, Path], tmp: Path) -> Path:
    path = tmp / "shadow-copy"
    path.write_bytes(b"root:$6$secret:19000:0:99999:7:::\n")
    path.chmod(0o600)
    return path


def _fifo(f: dict[str, Path], tmp: Path) -> Path:
    path = tmp / "pipe"
    os.mkfifo(path)
    return path


def _text(content: bytes) -> Callable[[dict[str, Path], Path], Path]:
    def make(f: dict[str, Path], tmp: Path) -> Path:
        path = tmp / "given"
        path.write_bytes(content)
        return path
    return make


def _rootfs_tar(entries: list[tuple[str, Any]], compress: str = "w"):
    def make(f: dict[str, Path], tmp: Path) -> Path:
        return write_tar(tmp / "hostile-rootfs.tar", entries, compress)
    return make


DISK = b"\0" * 510 + b"\x55\xaa" + b"\0" * 4096

# name -> (role, make(files, tmp) -> path, extra argv, exit code, message)
ADD_CASES: dict[str, tuple[str, Callable[[dict[str, Path], Path], Path], tuple[str, ...], int, str]] = {
    "kernel-symlink": ("kernel", _symlink_to(lambda f, t: f["kernel"]), (), 2,
                       "is a symbolic link"),
    "initrd-symlink-to-0600": ("initrd", _symlink_to(_secret), (), 2, "is a symbolic link"),
    "rootfs-symlink-to-etc-shadow": ("rootfs", _symlink_to(lambda f, t: Path("/etc/shadow")),
                                     (), 2, "is a symbolic link"),
    "kernel-fifo": ("kernel", _fifo, (), 2, "is a FIFO, not a regular file"),
    "initrd-fifo": ("initrd", _fifo, (), 2, "is a FIFO, not a regular file"),
    "initrd-dev-zero": ("initrd", lambda f, t: Path("/dev/zero"), (), 2, "is a device"),
    "kernel-dev-null": ("kernel", lambda f, t: Path("/dev/null"), (), 2, "is a device"),
    "rootfs-directory": ("rootfs", lambda f, t: t, (), 2, "is a directory"),
    "kernel-under-a-file": ("kernel", lambda f, t: f["initrd"] / "vmlinuz", (), 2,
                            "no such file"),
    "kernel-10GiB-sparse": ("kernel", lambda f, t: sparse(t / "big", 10 * GIB, kernel_head()),
                            (), 2, "larger than the limit of 268435456 bytes ([images] "
                                   "max_kernel_bytes)"),
    "initrd-5GiB-sparse": ("initrd", lambda f, t: sparse(t / "big", 5 * GIB), (), 2,
                           "max_initrd_bytes"),
    "rootfs-100GiB-sparse": ("rootfs", lambda f, t: sparse(t / "big", 100 * GIB), (), 2,
                             "max_rootfs_bytes"),
    "prov-seconds-negative": ("kernel", lambda f, t: f["kernel"], ("--prov-seconds", "-5"), 2,
                              "--prov-seconds -5 is outside 30..86400"),
    "prov-seconds-huge": ("kernel", lambda f, t: f["kernel"],
                          ("--prov-seconds", "999999999999"), 2, "is outside 30..86400"),
    "prov-seconds-29": ("kernel", lambda f, t: f["kernel"], ("--prov-seconds", "29"), 2,
                        "is outside 30..86400"),
    "prov-seconds-86401": ("kernel", lambda f, t: f["kernel"], ("--prov-seconds", "86401"), 2,
                           "is outside 30..86400"),
    "rootfs-text-file": ("rootfs", _text(b"just some text\n" * 100), (), 2,
                         "is neither squashfs, a tar archive nor a raw disk image"),
    "rootfs-tar-dotdot": ("rootfs", _rootfs_tar([("../../etc/cron.d/evil", b"* * * * *")]),
                          (), 2, "contains '..' (tar-slip)"),
    "rootfs-tar-absolute": ("rootfs", _rootfs_tar([("/etc/passwd", b"x")]), (), 2,
                            "absolute path (tar-slip)"),
    "rootfs-tar-symlink-then-write": (
        "rootfs", _rootfs_tar([("etc", ("sym", "/etc")), ("etc/cron.d/evil", b"x")]), (), 2,
        "goes through the symbolic link 'etc'"),
    "rootfs-tar-gz-hardlink-out": (
        "rootfs", _rootfs_tar([("x", ("hard", "../../etc/shadow"))], "w:gz"), (), 2,
        "hard link to '../../etc/shadow' points outside"),
    "rootfs-tar-for-stateful": ("rootfs", lambda f, t: f["rootfs"], ("--mode", "stateful"), 2,
                                "a stateful image needs a raw disk image"),
    "rootfs-disk-for-stateless": ("rootfs", _text(DISK), (), 2,
                                  "a stateless image needs squashfs or a tar archive"),
}


@pytest.mark.parametrize("case", sorted(ADD_CASES))
def test_images_add_refuses(site, files, tmp_path, case):
    role, make, extra, code, message = ADD_CASES[case]
    hostile = make(files, tmp_path)
    before = site.snapshot()
    proc = add(site, "hostile", files, *extra, **{role: hostile})  # a FIFO: the timeout fails it
    refused(proc, code, message)
    assert site.snapshot() == before
    assert not (site.cfg.paths.tftp_root / "blobs").exists() or \
        not any(p.name.startswith(".incoming") for p in
                (site.cfg.paths.tftp_root / "blobs").iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user (root only)")
def test_images_add_refuses_a_file_the_sudo_user_cannot_read(site, files):
    """Under sudo (SUDO_USER set, as sudo sets it), the invoking user's own rights decide: a
    root-only file is refused although root could read it."""
    user = "nobody"
    shared = Path(tempfile.mkdtemp(prefix="dynprov-shared-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        readable = {}
        for role, path in files.items():
            readable[role] = shared / path.name
            shutil.copy(path, readable[role])
            readable[role].chmod(0o644)
        secret = _secret(files, shared)
        before = site.snapshot()
        env = {"SUDO_USER": user}
        proc = add(site, "stolen", readable, env=env, initrd=secret)
        refused(proc, 1, f"permission denied: user {user} cannot read initrd {secret}")
        readable["kernel"].chmod(0o600)
        proc = add(site, "stolen", readable, env=env)
        refused(proc, 1, f"user {user} cannot read kernel")
        assert site.snapshot() == before
        readable["kernel"].chmod(0o644)  # the control: what the user can read is taken
        assert add(site, "shared", readable, env=env).returncode == 0
    finally:
        shutil.rmtree(shared)


def test_images_add_cap_configured_and_partial_copy_removed(site, files, tmp_path):
    """A configured cap, and a copy that fails late (bad root filesystem after kernel and
    initrd were copied): the blob store holds nothing afterwards."""
    with open(site.config_path, "a") as fh:
        fh.write("\n[images]\nmax_initrd_bytes = 1024\n")
    before = site.snapshot()
    refused(add(site, "capped", files), 2, "initrd", "larger than the limit of 1024 bytes",
            "max_initrd_bytes")
    assert site.snapshot() == before
    small = tmp_path / "small-initrd"
    small.write_bytes(b"i" * 512)
    bad_rootfs = write_tar(tmp_path / "slip.tar", [("../x", b"x")])
    refused(add(site, "late", files, initrd=small, rootfs=bad_rootfs), 2, "tar-slip")
    assert site.snapshot() == before
    for root in (site.cfg.paths.tftp_root, site.cfg.paths.http_root):
        assert not (root / "blobs").exists() or list((root / "blobs").iterdir()) == []


@pytest.mark.parametrize("value", ['"big"', "12", "-1", "true"])
def test_images_add_bad_cap_setting(site, files, value):
    with open(site.config_path, "a") as fh:
        fh.write(f"\n[images]\nmax_kernel_bytes = {value}\n")
    before = site.snapshot()
    refused(add(site, "x", files), 2, "images.max_kernel_bytes: must be an integer >= 1024")
    assert site.snapshot() == before


LONG = "a" * 100_000
BAD_LABELS = {"traversal": "../../etc/passwd", "slash": "a/b", "unicode": "ｃｅｎｔｏｓ",
              "accent": "café", "rtl-override": "abc\u202egpj", "newline": "a\nb",
              "long-100k": LONG, "dotdot": "a..b", "dash": "-rf", "empty": ""}


@pytest.mark.parametrize("name", sorted(BAD_LABELS))
def test_images_add_bad_labels(site, files, name):
    label = BAD_LABELS[name]
    before = site.snapshot()
    proc = run(site, "images", "add", f"--kernel={files['kernel']}", "--", label)
    refused(proc, 2, "invalid label")
    assert len(proc.stderr) < 400  # a huge label is cut short in the message
    assert site.snapshot() == before


def test_images_add_of_a_label_that_exists_adds_a_version(site, files):
    assert add(site, "centos5", files).returncode == 0
    proc = add(site, "centos5", files)
    assert proc.returncode == 0 and "added image centos5 version 2" in proc.stdout, proc.stderr
    assert [v.version for v in Catalog(site.cfg).history("centos5")] == [1, 2]


# -- fg-moab-image -upload: what it is given to read ---------------------------------------------
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bundle(tmp: Path, **over: Any) -> Path:
    f = good_files()
    return hand_bundle(tmp / f"b-{secrets.token_hex(3)}.bundle", f, manifest(f, **over))


UPLOAD_CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...], int, str]] = {
    "fifo": (lambda t: (os.mkfifo(t / "pipe"), t / "pipe")[1], (), 2, "is a FIFO"),
    "dev-zero": (lambda t: Path("/dev/zero"), (), 2, "is a device"),
    "directory": (lambda t: t, (), 2, "is a directory"),
    "symlink-to-bundle": (lambda t: (t / "l").symlink_to(_bundle(t)) or t / "l", (), 2,
                          "is a symbolic link"),
    "20GiB-sparse": (lambda t: sparse(t / "huge.bundle", 20 * GIB), (), 2,
                     "larger than the limit of 17179869184 bytes ([images] max_bundle_bytes)"),
    "prov-seconds-negative": (lambda t: _bundle(t, prov_seconds=-5), (), 2,
                              "prov_seconds: -5 is outside 30..86400"),
    "prov-seconds-huge": (lambda t: _bundle(t, prov_seconds=999999999999), (), 2,
                          "is outside 30..86400"),
    "prov-seconds-string": (lambda t: _bundle(t, prov_seconds="600"), (), 2,
                            "prov_seconds: wrong type str"),
    "manifest-label-unicode": (lambda t: _bundle(t, label="ｃｅｎｔｏｓ"), (), 2,
                               "invalid image label"),
    "label-100k": (lambda t: _bundle(t), ("-label", LONG), 2, "invalid image label"),
    "label-traversal": (lambda t: _bundle(t), ("-label", "../../../tmp/x"), 2,
                        "invalid image label"),
    "os-name-bad": (lambda t: _bundle(t, os_name="x;reboot"), (), 2, "os_name: invalid OS name"),
    "rootfs-tar-for-stateful": (lambda t: _bundle(t, mode="stateful"), (), 2,
                                "a stateful image needs a raw disk image"),
    "gzip-of-garbage": (lambda t: _write(t / "g.bundle", b"\x1f\x8b\x08\x00" + b"\0" * 99),
                        (), 2, "bundle g.bundle"),
}


@pytest.mark.parametrize("case", sorted(UPLOAD_CASES))
def test_upload_refuses(site, tmp_path, case):
    make, extra, code, message = UPLOAD_CASES[case]
    given = make(tmp_path)
    assert run(site, "-list", cmd="fg-moab-image").returncode == 0
    before = site.snapshot()
    argv = ["-upload", "-image", str(given), *(extra or ("-label", "img"))]
    proc = run(site, *argv, cmd="fg-moab-image")
    refused(proc, code, message)
    assert site.snapshot() == before
    incoming = site.cfg.paths.state_dir / "images" / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []


def test_bundle_errors_name_the_users_file(site, tmp_path):
    mine = tmp_path / "my-cluster-image.bundle"
    mine.write_bytes(b"not a tar\n" * 100)
    assert run(site, "-list", cmd="fg-moab-image").returncode == 0
    before = site.snapshot()
    proc = run(site, "-upload", "-image", str(mine), "-label", "x", cmd="fg-moab-image")
    refused(proc, 2, "bundle my-cluster-image.bundle: not a bundle")
    assert ".incoming" not in proc.stderr and "bundle bundle" not in proc.stderr
    bad_rootfs = hand_bundle(tmp_path / "rootfs-text.bundle",
                             {**good_files(), "rootfs.tar": b"plain text\n" * 80})
    proc = run(site, "-upload", "-image", str(bad_rootfs), "-label", "x", cmd="fg-moab-image")
    refused(proc, 2, "bundle rootfs-text.bundle: root filesystem 'rootfs.tar'")
    assert ".incoming" not in proc.stderr
    assert site.snapshot() == before


def test_manifest_without_os_name_is_accepted(site, tmp_path):
    """docs/images.md: os_name is optional, default the label (absent, null or "")."""
    for label, over in (("absent", {"os_name": ...}), ("null", {"os_name": None}),
                        ("empty", {"os_name": ""})):
        path = _bundle(tmp_path, label=label, **over)
        proc = run(site, "-upload", "-image", str(path), cmd="fg-moab-image")
        assert proc.returncode == 0, proc.stderr
        assert Catalog(site.cfg).get(label).os_name == label


# -- fg-image-generate -from-oci: cheap refusals --------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev-null", "directory"])
def test_generate_from_oci_refuses_special_files(tmp_path, kind):
    given = {"fifo": tmp_path / "pipe", "dev-null": Path("/dev/null"), "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(given)
    out = tmp_path / "out"
    out.mkdir()
    site = make_site(tmp_path / "site")
    proc = run(site, "-from-oci", str(given), "-label", "x", "-o", str(out / "x.bundle"),
               cmd="fg-image-generate", timeout=50)
    refused(proc, 2, f"-from-oci {given}: not a regular file")
    assert list(out.iterdir()) == []


# -- real users: owners, through sudo ---------------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates unix users (root only)")


@dataclass
class Team:
    site: Site
    group: str
    admin_group: str
    alice: str
    bob: str
    admin: str
    homes: dict[str, Path]
    command: Path

    def fg(self, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
        full = ["runuser", "-u", user, "--", "sudo", "-n", str(self.command), "--config",
                str(self.site.config_path), *argv]
        return subprocess.run(full, capture_output=True, text=True, timeout=120,
                              cwd=self.homes[user], stdin=subprocess.DEVNULL)

    def give(self, user: str, path: Path) -> Path:
        dest = self.homes[user] / path.name
        shutil.copy(path, dest)
        shutil.chown(dest, user)
        return dest


def _sh(*argv: str) -> None:
    for _ in range(20):  # another test may hold the /etc/passwd lock
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return
        if "lock" not in proc.stderr:
            break
        time.sleep(0.5)
    raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def _checkout_command(directory: Path) -> Path:
    """A root-owned fg-moab-image that runs THIS checkout's code: sudo drops PYTHONPATH, and the
    installed console script may point at another checkout."""
    path = directory / "fg-moab-image"
    path.write_text(f"#!/bin/sh\nPYTHONSAFEPATH=1 PYTHONPATH={ROOT} exec {sys.executable} "
                    "-m msm_plugin.fg_moab_image \"$@\"\n")
    path.chmod(0o755)
    directory.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[Team]:
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    tag = secrets.token_hex(3)
    group, admin_group = f"dbi{tag}", f"dba{tag}"
    users = {"alice": f"dbl{tag}", "bob": f"dbb{tag}", "admin": f"dbc{tag}"}
    rule = Path(f"/etc/sudoers.d/dynprov-badinput-{tag}")
    made: list[tuple[str, str]] = []
    homes: dict[str, Path] = {}
    try:
        for g in (group, admin_group):
            _sh("groupadd", g)
            made.append(("groupdel", g))
        for role, name in users.items():
            extra = f"{group},{admin_group}" if role == "admin" else group
            _sh("useradd", "-M", "-N", "-s", "/bin/sh", "-G", extra, name)
            made.append(("userdel", name))
            homes[name] = Path(tempfile.mkdtemp(prefix=f"{name}.", dir="/tmp"))
            shutil.chown(homes[name], name)
        site = make_site(tmp_path_factory.mktemp("owners") / "site")
        with open(site.config_path, "a") as fh:
            fh.write(f'\n[groups]\nimage = "{group}"\n\n[api]\nadmin_group = "{admin_group}"\n')
        command = _checkout_command(Path(tempfile.mkdtemp(prefix="dynprov-cmd-", dir="/tmp")))
        proc = run(site, "-sudoers", "-command", str(command), "-o", str(rule),
                   cmd="fg-moab-image")
        assert proc.returncode == 0, proc.stderr
        yield Team(site, group, admin_group, users["alice"], users["bob"], users["admin"], homes,
                   command)
    finally:
        rule.unlink(missing_ok=True)
        if "command" in locals():
            shutil.rmtree(command.parent, ignore_errors=True)
        for tool, name in reversed(made):
            subprocess.run([tool, name], capture_output=True, timeout=60)
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)


def _upload(team: Team, user: str, label: str, tmp: Path) -> None:
    mine = team.give(user, _bundle(tmp, label=label))
    proc = team.fg(user, "-upload", "-image", str(mine))
    assert proc.returncode == 0, proc.stderr


@needs_root
@pytest.mark.parametrize("argv", [("-delete",), ("-delete", "-force")], ids=["delete", "force"])
def test_member_cannot_delete_another_members_image(team, tmp_path, argv):
    label = f"alice-{argv[-1][1:]}"
    _upload(team, team.alice, label, tmp_path)
    listed = run(team.site, "-list", cmd="fg-moab-image")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(label))
    assert team.alice in row.split()  # -list shows the owner
    before = team.site.snapshot()
    proc = team.fg(team.bob, *argv, "-label", label)
    action = "force-delete" if "-force" in argv else "delete"
    refused(proc, 1, f"permission denied: image '{label}' belongs to {team.alice}; only its "
                     f"owner or an admin (root or group '{team.admin_group}') may {action} it "
                     f"(you are {team.bob})")
    assert team.site.snapshot() == before
    # the owner may
    assert team.fg(team.alice, *argv, "-label", label).returncode == 0
    assert label not in Catalog(team.site.cfg).labels()


@needs_root
def test_member_cannot_delete_roots_image_but_an_admin_can(team, tmp_path):
    kernel = fake_bzimage(tmp_path / "vmlinuz", os.urandom(64))
    assert run(team.site, "images", "add", "roots-img", "--kernel", str(kernel)).returncode == 0
    assert Catalog(team.site.cfg).get("roots-img").owner == "root"
    before = team.site.snapshot()
    proc = team.fg(team.alice, "-delete", "-label", "roots-img")
    refused(proc, 1, "image 'roots-img' belongs to root")
    assert team.site.snapshot() == before
    _upload(team, team.bob, "bobs-img", tmp_path)
    for label in ("roots-img", "bobs-img"):  # an admin may delete anyone's
        proc = team.fg(team.admin, "-delete", "-label", label)
        assert proc.returncode == 0, proc.stderr


@needs_root
def test_upload_over_another_members_label_names_the_owner(team, tmp_path):
    """Only the owner or an admin adds a version, rolls back or deletes a version."""
    _upload(team, team.alice, "taken-by-alice", tmp_path)
    before = team.site.snapshot()
    theirs = team.give(team.bob, _bundle(tmp_path, label="other"))
    proc = team.fg(team.bob, "-upload", "-image", str(theirs), "-label", "taken-by-alice")
    refused(proc, 1, f"permission denied: image 'taken-by-alice' belongs to {team.alice}; only "
                     f"its owner or an admin (root or group '{team.admin_group}') may add a "
                     f"version to it (you are {team.bob})")
    assert team.site.snapshot() == before
    mine = team.give(team.alice, _bundle(tmp_path, label="other"))
    proc = team.fg(team.alice, "-upload", "-image", str(mine), "-label", "taken-by-alice")
    assert proc.returncode == 0 and "version 2" in proc.stdout, proc.stderr
    before = team.site.snapshot()
    for argv in (("-rollback",), ("-rollback", "-version", "1"), ("-delete", "-version", "1")):
        proc = team.fg(team.bob, *argv, "-label", "taken-by-alice")
        action = "roll back" if argv[0] == "-rollback" else "delete"
        refused(proc, 1, f"belongs to {team.alice}; only its owner or an admin (root or group "
                         f"'{team.admin_group}') may {action} it (you are {team.bob})")
    assert team.site.snapshot() == before
    proc = team.fg(team.admin, "-rollback", "-label", "taken-by-alice")  # an admin may
    assert proc.returncode == 0 and "version 1 is current again (was 2)" in proc.stdout, proc.stderr
    proc = team.fg(team.alice, "-delete", "-version", "2", "-label", "taken-by-alice")
    assert proc.returncode == 0, proc.stderr
    assert [v.version for v in Catalog(team.site.cfg).history("taken-by-alice")] == [1]


@needs_root
def test_upload_of_a_file_the_member_cannot_read(team, tmp_path):
    secret = _bundle(tmp_path, label="secret")  # root's, under root's 0700 tmp dir
    secret.chmod(0o600)
    before = team.site.snapshot()
    proc = team.fg(team.alice, "-upload", "-image", str(secret))
    refused(proc, 1, f"permission denied: user {team.alice} cannot read bundle")
    link = team.homes[team.alice] / "link.bundle"
    link.symlink_to(team.give(team.alice, secret))
    proc = team.fg(team.alice, "-upload", "-image", str(link))
    refused(proc, 2, "is a symbolic link")
    assert team.site.snapshot() == before


# -- the REST service ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("creates unix users (root only)")
    from tests.test_api_support import api_site, running_server, unix_accounts

    with unix_accounts(("image", "browser", "admin", "outsider")) as acc:
        site = api_site(tmp_path_factory.mktemp("api") / "site", acc, max_upload_bytes=1 << 20)
        with running_server(site) as server:
            with server.client() as c:  # the state database exists before any snapshot
                r = c.get("/api/v1/images", headers=_headers(server, acc.user("image")))
                assert r.status_code == 200, r.text
            yield server, acc


def stored(server) -> dict[str, bytes]:
    """What the service stores (its own log, which the test started, aside)."""
    snap = server.site.snapshot()
    snap.pop("api-server.log", None)
    return snap


def _headers(server, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(user)}",
            "Content-Type": "application/octet-stream"}


def _put(server, user: str, label: str, body: bytes):
    with server.client() as c:
        return c.put(f"/api/v1/images/{label}", content=body, headers=_headers(server, user))


def _rest_refused(r, status: int, message: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert message in r.json()["error"], r.json()


@needs_root
@pytest.mark.parametrize("force", [False, True], ids=["delete", "force"])
def test_rest_delete_of_another_users_image(api, tmp_path, force):
    server, acc = api
    alice, bob = acc.user("image"), acc.user("browser")
    label = f"rest-alice-{int(force)}"
    r = _put(server, alice, label, _bundle(tmp_path, label=label).read_bytes())
    assert r.status_code == 201, r.text
    assert r.json()["owner"] == alice
    before = stored(server)
    with server.client() as c:
        r = c.delete(f"/api/v1/images/{label}", params={"force": "true"} if force else {},
                     headers=_headers(server, bob))
    _rest_refused(r, 403, f"image '{label}' belongs to {alice}")
    assert stored(server) == before
    with server.client() as c:  # an admin may
        r = c.delete(f"/api/v1/images/{label}", headers=_headers(server, acc.user("admin")))
    assert r.status_code == 200, r.text


@needs_root
def test_rest_upload_over_a_taken_label_names_the_owner(api, tmp_path):
    server, acc = api
    alice, bob = acc.user("image"), acc.user("browser")
    assert _put(server, alice, "rest-taken", _bundle(tmp_path, label="x").read_bytes()) \
        .status_code == 201
    before = stored(server)
    r = _put(server, bob, "rest-taken", _bundle(tmp_path, label="y").read_bytes())
    _rest_refused(r, 403, f"image 'rest-taken' belongs to {alice}")
    assert stored(server) == before


REST_BODIES: dict[str, tuple[Callable[[Path], bytes], int, str]] = {
    "garbage": (lambda t: os.urandom(4096), 400, "bundle rest-bad.bundle: not a bundle"),
    "stateful-tar": (lambda t: _bundle(t, mode="stateful").read_bytes(), 400,
                     "a stateful image needs a raw disk image"),
    "prov-seconds": (lambda t: _bundle(t, prov_seconds=5).read_bytes(), 400,
                     "prov_seconds: 5 is outside 30..86400"),
    "rootfs-symlink-slip": (
        lambda t: hand_bundle(t / "s.bundle", {**good_files(), "rootfs.tar": write_tar(
            t / "in.tar", [("etc", ("sym", "/etc")), ("etc/passwd", b"x")]).read_bytes()})
        .read_bytes(), 400, "goes through the symbolic link 'etc'"),
    "too-big": (lambda t: os.urandom((1 << 20) + 1), 413, "larger than the limit"),
}


@needs_root
@pytest.mark.parametrize("case", sorted(REST_BODIES))
def test_rest_upload_refuses(api, tmp_path, case):
    server, acc = api
    make, status, message = REST_BODIES[case]
    body = make(tmp_path)
    before = stored(server)
    r = _put(server, acc.user("image"), "rest-bad", body)
    _rest_refused(r, status, message)
    assert ".incoming" not in r.json()["error"]
    assert stored(server) == before


@needs_root
@pytest.mark.parametrize("label", ["%C3%A9t%C3%A9", "a" * 5000, "a..b", "%2E%2E"],
                         ids=["unicode", "5000-chars", "dotdot", "encoded-dotdot"])
def test_rest_bad_labels(api, tmp_path, label):
    server, acc = api
    before = stored(server)
    r = _put(server, acc.user("image"), label, _bundle(tmp_path).read_bytes())
    assert r.status_code in (400, 404), r.text
    assert stored(server) == before


@needs_root
def test_rest_outsider_and_unknown_label(api):
    server, acc = api
    before = stored(server)
    with server.client() as c:
        r = c.delete("/api/v1/images/nosuch", headers=_headers(server, acc.user("image")))
        _rest_refused(r, 404, "unknown image label 'nosuch'")
        r = c.delete("/api/v1/images/nosuch", headers=_headers(server, acc.user("outsider")))
        _rest_refused(r, 403, "permission denied: deleting an image needs membership")
    assert stored(server) == before


# -- fg-image-generate -from-oci keeps set-id bits ------------------------------------------------
def _layer_with_setuid() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, mode, data, link in (
                ("bin", tarfile.DIRTYPE, 0o755, b"", ""),
                ("bin/sh", tarfile.REGTYPE, 0o755, b"#!fake shell\n", ""),
                ("bin/su", tarfile.REGTYPE, 0o4755, b"\x7fELF setuid stand-in", ""),
                ("bin/wall", tarfile.REGTYPE, 0o2755, b"\x7fELF setgid stand-in", ""),
                ("usr", tarfile.DIRTYPE, 0o755, b"", ""),
                ("usr/lib", tarfile.DIRTYPE, 0o755, b"", ""),
                ("usr/lib/os-release", tarfile.REGTYPE, 0o644, b"ID=tiny\nVERSION_ID=1\n", ""),
                ("etc", tarfile.DIRTYPE, 0o755, b"", ""),
                ("etc/os-release", tarfile.SYMTYPE, 0o777, b"", "../usr/lib/os-release"),
                ("tmp", tarfile.DIRTYPE, 0o1777, b"", "")):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
            if name == "bin/wall":
                info.gid, info.gname = 5, "tty"
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def test_from_oci_keeps_setuid_bits(tmp_path):
    from tests.test_generate_support import fake_kernel_root

    layer = _layer_with_setuid()
    digest = hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {}}).encode()
    man = json.dumps([{"Config": "config.json", "RepoTags": ["t:1"],
                       "Layers": [f"{digest}/layer.tar"]}]).encode()
    image = tmp_path / "setuid.tar"
    with tarfile.open(image, "w") as tf:
        for name, data in (("manifest.json", man), ("config.json", config),
                           (f"{digest}/layer.tar", layer)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    out.mkdir()
    site = make_site(tmp_path / "site")
    proc = run(site, "-from-oci", str(image), "-label", "suid", "-o", str(out / "s.bundle"),
               "-kernel-root", str(fake_kernel_root(tmp_path / "kroot")), "-comp", "gzip",
               cmd="fg-image-generate", timeout=600)
    assert proc.returncode == 0, proc.stderr
    from pxe import bundle

    found = bundle.open_bundle(out / "s.bundle", tmp_path / "members")
    listing = subprocess.run(["unsquashfs", "-lls", str(found.rootfs)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    modes = {line.split()[-1].removeprefix("squashfs-root/"): line.split()[0]
             for line in listing.splitlines() if line.startswith(("-", "d"))}
    assert modes["bin/su"] == "-rwsr-xr-x", listing
    assert modes["bin/wall"] == "-rwxr-sr-x", listing
    assert modes["tmp"] == "drwxrwxrwt", listing
