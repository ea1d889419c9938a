"""Image versions (issue 20): every add of a label keeps the previous version, rollback restores
one in a single step, retention prunes old unused versions and then their blobs, nodes record the
version they booted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pxe import db, imageversions, reports, run, setboot
from pxe.errors import DynprovError, InputError, NotFound
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from tests.conftest import fake_bzimage

pytestmark = pytest.mark.unit


def kernels(tmp_path: Path, n: int) -> list[Path]:
    return [fake_bzimage(tmp_path / f"vmlinuz-{i}", os.urandom(2048)) for i in range(n)]


def blob(cat: Catalog, sha: str) -> Path:
    return cat.cfg.paths.tftp_root / "blobs" / sha


def with_keep(site, keep: int) -> None:
    text = site.config_path.read_text()
    site.config_path.write_text(text + f"\n[images]\nkeep_versions = {keep}\n")


def test_versions_are_numbered_per_label_and_blobs_stay_shared(site, tmp_path):
    k1, k2 = kernels(tmp_path, 2)
    cat = Catalog(site.cfg)
    a1 = cat.add("centos7", k1, owner="alice")
    a2 = cat.add("centos7", k2, owner="bob")
    other = cat.add("sles15", k1)
    assert (a1.version, a2.version, other.version) == (1, 2, 1)
    current = cat.get("centos7")
    assert (current.version, current.kernel_sha, current.owner) == (2, a2.kernel_sha, "alice")
    hist = cat.history("centos7")
    assert [(v.version, v.owner, v.current) for v in hist] == [(1, "alice", False),
                                                                (2, "bob", True)]
    assert hist[0].sizes["kernel"] == k1.stat().st_size and hist[0].sizes["rootfs"] is None
    assert sorted(os.listdir(site.cfg.paths.tftp_root / "blobs")) == sorted(
        {a1.kernel_sha, a2.kernel_sha})  # sles15 shares version 1's kernel file


def test_rollback_defaults_to_the_previous_version_and_can_roll_forward(site, tmp_path):
    k1, k2, k3 = kernels(tmp_path, 3)
    cat = Catalog(site.cfg)
    shas = [cat.add("centos7", k).kernel_sha for k in (k1, k2, k3)]
    assert cat.rollback("centos7") == (3, 2)
    assert cat.get("centos7").kernel_sha == shas[1]
    assert cat.rollback("centos7") == (2, 1)
    assert (cat.get("centos7").version, cat.get("centos7").kernel_sha) == (1, shas[0])
    assert cat.rollback("centos7", 3) == (1, 3)
    assert cat.get("centos7").kernel_sha == shas[2]
    assert all(blob(cat, s).exists() for s in shas)
    assert cat.add("centos7", k1).version == 4  # numbering continues after the newest


def test_rollback_bad_input_changes_nothing(site, tmp_path):
    k1, k2 = kernels(tmp_path, 2)
    cat = Catalog(site.cfg)
    cat.add("centos7", k1)
    with pytest.raises(InputError, match="has no version older than its current version 1"):
        cat.rollback("centos7")
    cat.add("centos7", k2)
    before = site.snapshot()
    with pytest.raises(InputError, match=r"^image 'centos7' has no version 9 \(kept versions: 1, 2\)$"):
        cat.rollback("centos7", 9)
    with pytest.raises(InputError, match="already the current one"):
        cat.rollback("centos7", 2)
    with pytest.raises(NotFound, match="unknown image label 'nope'"):
        cat.rollback("nope")
    assert site.snapshot() == before
    for bad in ("0", "-1", "two", "1.5", "", "1e3", "01"):
        with pytest.raises(InputError, match="is not a version number"):
            imageversions.parse_version(bad)
    assert imageversions.parse_version("12") == 12


def test_retention_prunes_oldest_unused_versions_and_then_their_blobs(site, tmp_path):
    with_keep(site, 2)
    ks = kernels(tmp_path, 4)
    cat = Catalog(site.cfg)
    shas = [cat.add("centos7", k).kernel_sha for k in ks[:2]]
    # a node runs version 1: it survives retention although it is the oldest
    Inventory(site.cfg).add([build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    cat.conn.execute("UPDATE nodes SET current_os = 'centos7', current_version = 1")
    shas.append(cat.add("centos7", ks[2]).kernel_sha)
    assert [v.version for v in cat.history("centos7")] == [1, 3]  # 2 pruned, 1 in use
    assert cat.pruned == [2]
    assert not blob(cat, shas[1]).exists() and blob(cat, shas[0]).exists()
    assert cat.history("centos7")[0].running == ["n001"]
    cat.conn.execute("UPDATE nodes SET current_os = 'sles15'")
    shas.append(cat.add("centos7", ks[3]).kernel_sha)
    assert [v.version for v in cat.history("centos7")] == [3, 4]
    assert not blob(cat, shas[0]).exists()
    assert blob(cat, shas[2]).exists() and blob(cat, shas[3]).exists()


def test_retention_never_prunes_a_version_a_run_is_booting(site, tmp_path):
    with_keep(site, 1)
    k1, k2 = kernels(tmp_path, 2)
    cat = Catalog(site.cfg)
    cat.add("centos7", k1)
    Inventory(site.cfg).add([build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    req = run.request(site.cfg, cat.conn, ["n001"], "centos7", mode="ondemand")
    assert req.started == ["n001"]
    assert cat.conn.execute("SELECT image_version FROM run_nodes").fetchone()[0] == 1
    cat.add("centos7", k2)
    assert [v.version for v in cat.history("centos7")] == [1, 2]


def test_bad_keep_versions_is_refused_before_anything_is_stored(site, tmp_path):
    with_keep(site, 0)
    cat = Catalog(site.cfg)
    before = site.snapshot()
    with pytest.raises(InputError, match=r"images.keep_versions: must be an integer 1..1000, got 0"):
        cat.add("centos7", kernels(tmp_path, 1)[0])
    assert site.snapshot() == before


def test_remove_version_refuses_current_and_in_use(site, tmp_path):
    k1, k2, k3 = kernels(tmp_path, 3)
    cat = Catalog(site.cfg)
    shas = [cat.add("centos7", k).kernel_sha for k in (k1, k2, k3)]
    Inventory(site.cfg).add([build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    cat.conn.execute("UPDATE nodes SET current_os = 'centos7', current_version = 2")
    with pytest.raises(InputError, match="version 3 is the current version"):
        cat.remove_version("centos7", 3)
    with pytest.raises(InputError, match="has no version 7"):
        cat.remove_version("centos7", 7)
    with pytest.raises(DynprovError, match=r"version 2 of image 'centos7' is in use: node\(s\) n001"):
        cat.remove_version("centos7", 2)
    assert cat.remove_version("centos7", 1) == []
    assert not blob(cat, shas[0]).exists()
    assert cat.remove_version("centos7", 2, force=True) == ["n001"]
    assert [v.version for v in cat.history("centos7")] == [3]
    cat.remove("centos7", force=True)
    assert cat.conn.execute("SELECT COUNT(*) FROM image_versions").fetchone()[0] == 0
    assert not any(blob(cat, s).exists() for s in shas)


def test_a_rollback_before_the_power_cycle_is_what_the_node_boots(site, tmp_path):
    """The run starts on version 2; a rollback comes before the node is power-cycled: the node
    fetches its config after the power cycle, boots version 1, and records 1."""
    from pxe import states

    k1, k2 = kernels(tmp_path, 2)
    cat = Catalog(site.cfg)
    cat.add("centos7", k1)
    cat.add("centos7", k2)
    Inventory(site.cfg).add([build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    conn = cat.conn
    req = run.request(site.cfg, conn, ["n001"], "centos7", mode="ondemand")
    setboot.set_boot(site.cfg, ["n001"], "centos7")
    assert conn.execute("SELECT image_version FROM run_nodes").fetchone()[0] == 2
    cat.rollback("centos7")
    with db.transaction(conn):
        assert states.transition(conn, req.run_id, "n001", states.POWER_CYCLED)
    assert conn.execute("SELECT image_version FROM run_nodes").fetchone()[0] == 1
    cat.rollback("centos7", 2)  # after the power cycle: the node has its config already
    token = conn.execute("SELECT boot_token FROM nodes").fetchone()[0]
    reports.record_report(conn, "n001", token, "booting")
    reports.record_report(conn, "n001", token, "ready")
    assert tuple(conn.execute("SELECT current_os, current_version FROM nodes").fetchone()) == \
        ("centos7", 1)


def test_a_node_records_the_version_its_run_started_with(site, tmp_path):
    """Rolled back while n001 runs version 2: n001 keeps 2; its next run boots version 1, and the
    loader config rendered for it names version 1's kernel."""
    k1, k2 = kernels(tmp_path, 2)
    cat = Catalog(site.cfg)
    v1, v2 = cat.add("centos7", k1), cat.add("centos7", k2)
    Inventory(site.cfg).add([build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    conn = cat.conn
    from pxe.serve.bootconfigs import BootConfigs

    served = BootConfigs(site.cfg)  # one worker across the rollback: its cache must follow

    def loader_config() -> str:
        return (served.lookup("ipxe/52-54-00-00-00-01.ipxe") or b"").decode()

    def boot() -> None:
        req = run.request(site.cfg, conn, ["n001"], "centos7", mode="ondemand", force=True)
        assert req.started == ["n001"]
        setboot.set_boot(site.cfg, ["n001"], "centos7")
        token = conn.execute("SELECT boot_token FROM nodes").fetchone()[0]
        reports.record_report(conn, "n001", token, "booting")
        reports.record_report(conn, "n001", token, "ready")

    boot()
    assert v2.kernel_sha in loader_config()
    assert tuple(conn.execute("SELECT current_os, current_version FROM nodes")
                 .fetchone()) == ("centos7", 2)
    cat.rollback("centos7")
    assert conn.execute("SELECT current_version FROM nodes").fetchone()[0] == 2
    assert cat.history("centos7")[1].running == ["n001"]
    assert v1.kernel_sha in loader_config()
    assert v2.kernel_sha not in loader_config()
    boot()
    assert conn.execute("SELECT current_version FROM nodes").fetchone()[0] == 1
    assert [(v.version, v.booted) for v in cat.history("centos7")] == [(1, 1), (2, 1)]
