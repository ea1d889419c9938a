"""fg-image-generate -slurm without the network: what the image carries (the Slurm node side,
slurmd and munge in the package proof, no munge key), how its boot orders enroll -> munged and
slurmd -> ready, and the bad input refused before anything is written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pxe import bundle
from pxe.imagegen import build, pack, slurm
from tests.test_generate_support import fake_kernel_root, generate, tiny_container

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def _build(tmp_path: Path, *extra: str) -> tuple[Path, str]:
    # as Debian's munge package leaves it: a key generated at install time
    image = tiny_container(tmp_path / "img.tar", {"etc/munge/munge.key": b"k" * 128,
                                                  "usr/sbin/munged": b"#!fake\n"})
    kroot = fake_kernel_root(tmp_path / "kernel")
    out = tmp_path / "out" / "sl.bundle"
    out.parent.mkdir()
    proc = generate("-from-oci", str(image), "-label", "sl", "-o", str(out), "-kernel-root",
                    str(kroot), "-comp", "gzip", "-json", "-slurm", *extra)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["label"] == "sl"
    found = bundle.open_bundle(out, tmp_path / "members")
    listing = subprocess.run(["unsquashfs", "-lls", str(found.rootfs)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    return found.rootfs, listing


def _cat(rootfs: Path, rel: str) -> str:
    return subprocess.run(["unsquashfs", "-cat", str(rootfs), rel], capture_output=True,
                          text=True, timeout=60, check=True).stdout


def _mode(listing: str, rel: str) -> str:
    lines = [ln for ln in listing.splitlines() if ln.split()[-1] == f"squashfs-root/{rel}"]
    assert lines, rel
    return lines[0].split()[0]


def test_slurm_image_carries_the_node_side_and_no_munge_key(tmp_path):
    rootfs, listing = _build(tmp_path, "-slurm-server", "ctl1.example:6817")
    for name in ("dynprov-slurm-node", "dynprov-slurm-helper", "dynprov-slurm-reboot", "start"):
        assert _mode(listing, f"usr/lib/dynprov/slurm/{name}") == "-rwxr-xr-x", name
    # the node side is the shipped one, byte for byte
    for name in ("dynprov-slurm-node", "dynprov-slurm-helper"):
        assert _cat(rootfs, f"usr/lib/dynprov/slurm/{name}") == \
            (ROOT / "contrib/slurm" / name).read_text()
    # slurmd and munge are proven installed at boot like every requested package
    assert _cat(rootfs, "etc/dynprov/packages").split() == ["slurmd", "munge"]
    assert _cat(rootfs, "etc/dynprov/slurm") == "ctl1.example:6817\n".join(["ctld=", ""])
    assert "ConditionPathExists=\n" in _cat(rootfs, "etc/systemd/system/slurmd.service.d/"
                                                    "dynprov.conf")
    # the key comes over the token channel at boot, never in the image; configless slurmd
    assert "squashfs-root/usr/sbin/munged" in listing  # the container's own files are kept
    assert "munge.key" not in listing and "etc/slurm/slurm.conf" not in listing
    init = _cat(rootfs, "usr/lib/dynprov/init")
    assert init == pack.IMAGE_INIT


def test_slurm_conf_goes_into_the_image_with_helpers_conf(tmp_path):
    conf = tmp_path / "site"
    conf.mkdir()
    (conf / "slurm.conf").write_text("ClusterName=c\nSlurmctldHost=head(10.0.0.1)\n")
    (conf / "helpers.conf").write_text(f"Feature=a Helper={slurm.HELPER_PATH}\n")
    rootfs, listing = _build(tmp_path, "-slurm-conf", str(conf / "slurm.conf"))
    assert _cat(rootfs, "etc/slurm/slurm.conf").endswith("SlurmctldHost=head(10.0.0.1)\n")
    assert _cat(rootfs, "etc/slurm/helpers.conf") == \
        "Feature=a Helper=/usr/lib/dynprov/slurm/dynprov-slurm-helper\n"
    assert _cat(rootfs, "etc/dynprov/slurm") == ""  # the controller is in slurm.conf


def test_image_init_runs_slurm_start_before_the_agent(tmp_path):
    init = pack.IMAGE_INIT
    start = init.index("$D/slurm/start")
    assert start < init.index("$D/agent") and start < init.index("exec /sbin/init")
    # start: enroll (munge key) before munged, munged before slurmd
    text = slurm.START
    assert text.index("enroll --munge-key") < text.index("/usr/sbin/munged") \
        < text.index("/usr/sbin/slurmd")
    for name, script in (("start", slurm.START), ("reboot", slurm.REBOOT),
                         ("init", pack.IMAGE_INIT)):
        path = tmp_path / name
        path.write_text(script)
        for shell in (["busybox", "sh"], ["sh"]):
            proc = subprocess.run([*shell, "-n", str(path)], capture_output=True, text=True,
                                  timeout=30)
            assert proc.returncode == 0, f"{name}: {proc.stderr}"


def test_a_munge_key_symlink_is_removed_not_followed(tmp_path):
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "etc" / "munge").mkdir(parents=True)
    outside.mkdir()
    (outside / "munge.key").write_bytes(b"host key")
    (tree / "etc" / "munge" / "munge.key").symlink_to(outside / "munge.key")
    written = slurm.add(tree)
    assert not (tree / "etc" / "munge" / "munge.key").exists()
    assert (outside / "munge.key").read_bytes() == b"host key"
    assert "/usr/lib/dynprov/slurm/start" in written and not slurm.remove_munge_key(tree)


def test_slurm_adds_its_packages_once():
    req = build.Request(label="x", output=Path("/tmp/none"), slurm=True,
                        packages=("hello", "munge=0.5.15-2"))
    assert build.wanted_packages(req) == ["hello", "munge=0.5.15-2", "slurmd"]
    assert build.wanted_packages(build.Request(label="x", output=Path("/tmp/none"),
                                               packages=("hello",))) == ["hello"]


@pytest.mark.parametrize("argv, message", [
    (["-slurm-server", "ctl;reboot"], "invalid -slurm-server"),
    (["-slurm-server", "ctl:99999"], "port"),
    (["-slurm-server", "ctl..example"], "invalid -slurm-server host"),
    (["-slurm-conf", "/nonexistent/slurm.conf"], "no such file"),
    (["-slurm-conf", "EMPTY"], "no SlurmctldHost= line"),
])
def test_bad_slurm_input_exits_2_and_writes_nothing(tmp_path, argv, message):
    work = tmp_path / "work"
    work.mkdir()
    empty = tmp_path / "slurm.conf"
    empty.write_text("ClusterName=c\n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    proc = generate("-label", "x", "-slurm", *argv, "-o", str(work / "x.bundle"),
                    "-workdir", str(work))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("fg-image-generate: ")
    assert list(work.iterdir()) == []


def test_slurm_options_need_slurm(tmp_path):
    proc = generate("-label", "x", "-slurm-server", "ctl", "-o", str(tmp_path / "x.bundle"))
    assert proc.returncode == 2 and "go with -slurm" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_one_build_packed_as_two_labels(tmp_path):
    """-also-label: the same tree in a second bundle; only the label (IMAGE_ID) differs."""
    rootfs, _ = _build(tmp_path, "-also-label", "sl2")
    second = tmp_path / "out" / "sl2.bundle"
    found = bundle.open_bundle(second, tmp_path / "members2")
    assert found.manifest.label == "sl2" and found.manifest.os_name == "tiny-1.0"
    assert _cat(rootfs, "etc/os-release").endswith("IMAGE_ID=sl\n")
    assert _cat(found.rootfs, "etc/os-release").endswith("IMAGE_ID=sl2\n")
    assert _cat(found.rootfs, "etc/dynprov/packages") == _cat(rootfs, "etc/dynprov/packages")
    first = bundle.open_bundle(tmp_path / "out" / "sl.bundle", tmp_path / "members1")
    assert found.kernel.read_bytes() == first.kernel.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sl.bundle", "sl2.bundle"]


@pytest.mark.parametrize("argv, message", [
    (["-also-label", "x"], "each label once"),
    (["-also-label", "../y"], "invalid image label"),
    (["-also-label", "y", "-also-label", "y"], "each label once"),
    (["-also-label", "y", "-customize", "."], "cannot go with -customize"),
])
def test_bad_also_label_exits_2(tmp_path, argv, message):
    proc = generate("-label", "x", *argv, "-o", str(tmp_path / "x.bundle"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
