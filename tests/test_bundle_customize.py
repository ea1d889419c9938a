"""HPC customization: site scripts applied, in order, to a generic image when it is deployed."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from pxe import customize
from pxe.errors import DynprovError, InputError
from pxe.images import Catalog
from pxe.repository import Repository
from tests.test_bundle import build_good_bundle, busybox_tree

pytestmark = pytest.mark.unit


def script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nset -e\n" + body + "\n")
    path.chmod(mode)
    return path


@pytest.fixture
def scripts_dir(tmp_path: Path) -> Path:
    base = tmp_path / "customize"
    for d in ("all", "gpu"):
        (base / d).mkdir(parents=True)
    script(base / "all", "20-second", 'echo "all/20 $DYNPROV_IMAGE $DYNPROV_SET" >> "$1/order"')
    script(base / "all", "10-first", 'echo "all/10 $DYNPROV_ARCH $DYNPROV_MODE" >> "$1/order"\n'
                                     'echo "hello from 10-first"')
    script(base / "gpu", "10-driver", 'echo gpu/10 >> "$DYNPROV_ROOT/order"\n'
                                      'mkdir -p "$1/etc" && echo nvidia > "$1/etc/gpu"')
    (base / "all" / "README.md").write_text("not a script\n")
    script(base / "all", "30-old.disabled", "exit 1")
    script(base / "all", "40-backup~", "exit 1")
    return base


def test_select_orders_and_skips(scripts_dir):
    names = [s.name for s in customize.select(scripts_dir, ["gpu"])]
    assert names == ["all/10-first", "all/20-second", "gpu/10-driver"]
    assert [s.name for s in customize.select(scripts_dir)] == ["all/10-first", "all/20-second"]
    assert customize.select(scripts_dir / "nothing-here") == []


def test_run_in_order_with_a_log(scripts_dir, tmp_path):
    tree = busybox_tree(tmp_path / "tree")
    log = tmp_path / "state" / "customize" / "img.log"
    done = customize.run(customize.select(scripts_dir, ["gpu"]), tree, label="img",
                         arch="x86_64", mode="stateless", log_path=log)
    assert done == ["all/10-first", "all/20-second", "gpu/10-driver"]
    assert (tree / "order").read_text().splitlines() == [
        "all/10 x86_64 stateless", "all/20 img all", "gpu/10"]
    text = log.read_text()
    assert "== all/10-first started" in text and "hello from 10-first" in text
    assert "== gpu/10-driver exit status 0" in text


def test_failing_script_stops_loudly(scripts_dir, tmp_path):
    script(scripts_dir / "all", "15-broken", 'echo "cannot find torque server" >&2\nexit 3')
    tree = busybox_tree(tmp_path / "tree")
    log = tmp_path / "c.log"
    with pytest.raises(DynprovError) as err:
        customize.run(customize.select(scripts_dir), tree, label="img", arch="x86_64",
                      mode="stateless", log_path=log)
    message = str(err.value)
    assert "all/15-broken exited with status 3" in message
    assert "cannot find torque server" in message and str(log) in message
    assert (tree / "order").read_text().splitlines() == ["all/10 x86_64 stateless"]


def test_timeout_kills_the_script(scripts_dir, tmp_path):
    script(scripts_dir / "all", "05-hang", "sleep 60")
    with pytest.raises(DynprovError, match="did not finish within 1 s"):
        customize.run(customize.select(scripts_dir), busybox_tree(tmp_path / "t"), label="i",
                      arch="x86_64", mode="stateless", log_path=tmp_path / "l", timeout=1)


def test_bad_script_directories(scripts_dir, tmp_path):
    with pytest.raises(InputError, match="no customization scripts for node group 'ib'"):
        customize.select(scripts_dir, ["ib"])
    with pytest.raises(InputError, match="invalid node group"):
        customize.select(scripts_dir, ["../etc"])
    script(scripts_dir / "all", "50-not-executable", "true", mode=0o644)
    with pytest.raises(DynprovError, match="is not executable"):
        customize.select(scripts_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply when run as root")
def test_unsafe_scripts_are_not_run(scripts_dir):
    (scripts_dir / "all" / "10-first").chmod(0o777)
    with pytest.raises(DynprovError, match="not writable by group or others"):
        customize.select(scripts_dir)
    (scripts_dir / "all" / "10-first").chmod(0o755)
    (scripts_dir / "gpu").chmod(0o777)
    with pytest.raises(DynprovError, match="not writable by group or others"):
        customize.select(scripts_dir, ["gpu"])


@pytest.mark.parametrize("kind", ["tar.gz", "squashfs"])
def test_customize_rootfs_round_trip(scripts_dir, tmp_path, kind):
    from pxe import bundle

    tree = busybox_tree(tmp_path / "tree")
    rootfs = bundle.rootfs_from_tree(tree, tmp_path / f"rootfs.{kind}", kind)
    work = tmp_path / "work"
    work.mkdir()
    packed, names = customize.customize_rootfs(
        rootfs, kind, work, customize.select(scripts_dir, ["gpu"]), label="img", arch="x86_64",
        mode="stateless", log_path=tmp_path / "log")
    assert packed.name == rootfs.name and bundle.rootfs_kind(packed) == kind
    assert names[-1] == "gpu/10-driver"
    out = tmp_path / "check"
    if kind == "squashfs":
        subprocess.run(["unsquashfs", "-no-progress", "-quiet", "-d", str(out), str(packed)],
                       check=True, capture_output=True, timeout=60)
    else:
        out.mkdir()
        bundle.extract_rootfs(packed, out)
    assert (out / "etc" / "gpu").read_text() == "nvidia\n"
    assert (out / "bin" / "sh").is_symlink()


def _site_with_customize(site, scripts_dir: Path, initrd: bool = True) -> None:
    with open(site.config_path, "a") as fh:
        fh.write(f'\n[images]\ncustomize_dir = "{scripts_dir}"\n')


def test_deploy_customizes_what_nodes_boot_but_get_returns_the_upload(site, scripts_dir,
                                                                      tmp_path):
    _site_with_customize(site, scripts_dir)
    path = build_good_bundle(tmp_path)
    repo = Repository(site.cfg)
    done = repo.upload(path, "tiny-gpu", groups=["gpu"])
    assert done.customized == ["all/10-first", "all/20-second", "gpu/10-driver"]
    image = Catalog(site.cfg).get("tiny-gpu")
    blob = site.cfg.paths.http_root / "blobs" / image.rootfs_sha
    with tarfile.open(blob) as tf:
        assert tf.extractfile("etc/gpu").read() == b"nvidia\n"  # type: ignore[union-attr]
    out = tmp_path / "back.bundle"
    repo.get("tiny-gpu", str(out))
    assert out.read_bytes() == path.read_bytes()
    meta = json.loads((repo.bundles / "tiny-gpu.json").read_text())
    assert meta["groups"] == ["gpu"] and meta["customized"][-1] == "gpu/10-driver"
    assert "gpu/10-driver exit status 0" in (site.cfg.paths.state_dir / "customize" /
                                             "tiny-gpu.log").read_text()


def test_failed_customization_publishes_nothing(site, scripts_dir, tmp_path):
    script(scripts_dir / "all", "25-fail", "echo 'no room for mom'; exit 7")
    _site_with_customize(site, scripts_dir)
    path = build_good_bundle(tmp_path)
    repo = Repository(site.cfg)
    assert repo.catalog.labels() == []

    def files() -> dict[str, bytes]:  # the database's own file is never opened outside SQLite
        return {str(p): p.read_bytes() for p in site.root.rglob("*") if p.is_file()
                and not p.name.startswith("dynprov.db") and "customize" not in p.parts
                and p.name != "config.cache"}  # derived from dynprov.toml, not state

    before = files()
    with pytest.raises(DynprovError, match="all/25-fail exited with status 7"):
        repo.upload(path, "tiny")
    assert files() == before
    assert repo.catalog.labels() == [] and repo.catalog.conn.execute(
        "SELECT COUNT(*) FROM images").fetchone()[0] == 0
    assert list(repo.incoming.iterdir()) == []
    assert "no room for mom" in (site.cfg.paths.state_dir / "customize" / "tiny.log").read_text()
