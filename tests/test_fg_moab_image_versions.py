"""Image versions through the real commands (issue 20): `fg-moab-image -upload` of a label that
exists keeps the old version, `-history`, `-rollback`, `-delete -version`, `-get -version`,
retention of bundles and blobs, and `pxe-stage images history|rollback`, `nodes show`,
`run show` naming the version a node booted. Every refusal: one line, its exit code, nothing
changed."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from pxe import reports, run, setboot
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from tests.conftest import fake_bzimage
from tests.test_bundle import build_good_bundle
from tests.test_fg_moab_image import add_config, fg, state, unchanged

pytestmark = pytest.mark.integration


def refused(proc, code: int, message: str) -> None:
    """The message as the one line of stderr (usage errors: argparse's usage, then the line)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 or lines[0].startswith("usage:"), proc.stderr


def upload(site, tmp_path, name: str, label: str = "centos7"):
    path = build_good_bundle(tmp_path, name)
    proc = fg(site, "-upload", "-image", str(path), "-label", label)
    assert proc.returncode == 0, proc.stderr
    return path


def bundles(site) -> list[str]:
    return sorted(p.name for p in (site.cfg.paths.state_dir / "images" / "bundles").iterdir())


def test_upload_history_get_rollback_delete(site, tmp_path):
    b1 = upload(site, tmp_path, "one")
    b2 = upload(site, tmp_path, "two")
    assert bundles(site) == ["centos7.bundle", "centos7.json", "centos7@2.bundle", "centos7@2.json"]
    hist = json.loads(fg(site, "-history", "-label", "centos7", "-json").stdout)
    assert [(h["version"], h["current"], h["owner"]) for h in hist] == \
        [(1, False, "root"), (2, True, "root")]
    assert hist[0]["kernel_sha"] != hist[1]["kernel_sha"] and hist[0]["sizes"]["kernel"] > 0
    table = fg(site, "-history", "-label", "centos7").stdout.splitlines()
    assert table[0].split()[:4] == ["VERSION", "CURRENT", "CREATED", "OWNER"]
    assert re.match(rf"2\s+\*\s+\S+ \S+\s+root\s+{hist[1]['kernel_sha'][:12]} \(\d+ B\)", table[2])
    listed = json.loads(fg(site, "-list", "-json").stdout)
    assert [(e["label"], e["version"], e["versions"]) for e in listed] == [("centos7", 2, 2)]
    assert fg(site, "-list").stdout.splitlines()[1].split()[:2] == ["centos7", "2/2"]

    out = tmp_path / "got"
    assert fg(site, "-get", "-label", "centos7", "-o", str(out)).returncode == 0
    assert out.read_bytes() == b2.read_bytes()
    assert fg(site, "-get", "-label", "centos7", "-version", "1", "-o", str(out)).returncode == 0
    assert out.read_bytes() == b1.read_bytes()

    proc = fg(site, "-rollback", "-label", "centos7")
    assert proc.returncode == 0 and "version 1 is current again (was 2)" in proc.stdout
    cat = Catalog(site.cfg)
    assert (cat.get("centos7").version, cat.get("centos7").kernel_sha) == (1, hist[0]["kernel_sha"])
    assert fg(site, "-get", "-label", "centos7", "-o", str(out)).returncode == 0
    assert out.read_bytes() == b1.read_bytes()  # -get follows the current version

    proc = fg(site, "-delete", "-label", "centos7", "-version", "2")
    assert proc.returncode == 0 and "deleted version 2 of image centos7" in proc.stdout
    assert bundles(site) == ["centos7.bundle", "centos7.json"]
    blobs = site.cfg.paths.tftp_root / "blobs"
    assert not (blobs / hist[1]["kernel_sha"]).exists() and (blobs / hist[0]["kernel_sha"]).exists()
    upload(site, tmp_path, "three")
    assert fg(site, "-delete", "-label", "centos7").returncode == 0  # every version
    assert bundles(site) == [] and Catalog(site.cfg).labels() == []
    assert not any(len(p.name) == 64 for p in blobs.iterdir())
    actions = [json.loads(line)["action"] for line in
               (site.cfg.paths.state_dir / "audit.log").read_text().splitlines()]
    assert actions.count("image-rollback") == 1 and actions.count("image-delete") == 2


def test_bad_versions_are_refused_and_change_nothing(site, tmp_path):
    upload(site, tmp_path, "one")
    proc = fg(site, "-rollback", "-label", "centos7")
    refused(proc, 2, "image 'centos7' has no version older than its current version 1")
    upload(site, tmp_path, "two")
    before = state(site)
    cases = [
        (("-rollback", "-label", "centos7", "-version", "9"), 2,
         "image 'centos7' has no version 9 (kept versions: 1, 2)"),
        (("-rollback", "-label", "centos7", "-version", "x1"), 2,
         "-version 'x1' is not a version number"),
        (("-rollback", "-label", "centos7", "-version", "0"), 2, "is not a version number"),
        (("-rollback", "-label", "centos7", "-version", "2"), 2, "already the current one"),
        (("-rollback", "-label", "nosuch"), 1, "unknown image label 'nosuch'"),
        (("-rollback", "-label", "../x"), 2, "invalid image label"),
        (("-delete", "-label", "centos7", "-version", "2"), 2,
         "version 2 is the current version of 'centos7'"),
        (("-delete", "-label", "centos7", "-version", "5"), 2, "has no version 5"),
        (("-get", "-label", "centos7", "-version", "5", "-o", str(tmp_path / "o")), 2,
         "has no version 5"),
        (("-history", "-label", "nosuch"), 1, "unknown image label 'nosuch'"),
        (("-history",), 2, "-history needs -label"),
        (("-list", "-version", "1"), 2, "-version goes with -rollback, -delete or -get"),
    ]
    for argv, code, message in cases:
        refused(fg(site, *argv), code, message)
    assert unchanged(site, before)
    assert not (tmp_path / "o").exists()


def test_retention_prunes_old_bundles_and_keeps_what_a_node_runs(site, tmp_path):
    add_config(site, "[images]\nkeep_versions = 2")
    upload(site, tmp_path, "one")
    Inventory(site.cfg).add([build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    cat = Catalog(site.cfg)
    cat.conn.execute("UPDATE nodes SET current_os = 'centos7', current_version = 1")
    upload(site, tmp_path, "two")
    upload(site, tmp_path, "three")
    assert [v.version for v in Catalog(site.cfg).history("centos7")] == [1, 3]
    assert bundles(site) == ["centos7.bundle", "centos7.json", "centos7@3.bundle", "centos7@3.json"]
    kernel = fake_bzimage(tmp_path / "vmlinuz-admin", b"admin's kernel")
    proc = site.run("images", "add", "centos7", "--kernel", str(kernel))
    assert proc.returncode == 0 and "added image centos7 version 4" in proc.stdout, proc.stderr
    assert [v.version for v in Catalog(site.cfg).history("centos7")] == [1, 4]
    assert bundles(site) == ["centos7.bundle", "centos7.json"]  # version 3's bundle went with it
    proc = fg(site, "-delete", "-label", "centos7", "-version", "1")
    refused(proc, 1, "version 1 of image 'centos7' is in use: node(s) n001 run it")
    proc = fg(site, "-delete", "-label", "centos7", "-version", "1", "-force")
    assert proc.returncode == 0 and "still used by n001" in proc.stdout


def test_pxe_stage_history_rollback_and_the_version_a_node_booted(site, tmp_path):
    """A node boots version 2 in a run; a rollback leaves it on 2 (nodes show, run show)."""
    upload(site, tmp_path, "one")
    upload(site, tmp_path, "two")
    Inventory(site.cfg).add([build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    cat = Catalog(site.cfg)
    req = run.request(site.cfg, cat.conn, ["n001"], "centos7", mode="ondemand")
    setboot.set_boot(site.cfg, ["n001"], "centos7")
    token = cat.conn.execute("SELECT boot_token FROM nodes").fetchone()[0]
    reports.record_report(cat.conn, "n001", token, "ready")

    proc = site.run("images", "rollback", "centos7")
    assert proc.returncode == 0 and "version 1 is current again (was 2)" in proc.stdout, proc.stderr
    shown = json.loads(site.run("nodes", "show", "n001", "--json").stdout)[0]
    assert (shown["current_os"], shown["current_version"]) == ("centos7", 2)
    assert re.search(r"^current_version\s+2$", site.run("nodes", "show", "n001").stdout, re.M)
    table = site.run("run", "show", str(req.run_id)).stdout.splitlines()
    assert table[1].split()[:3] == ["NODE", "STATE", "VERSION"]
    assert table[2].split()[:3] == ["n001", "ready", "2"]
    hist = json.loads(site.run("images", "history", "centos7", "--json").stdout)
    assert [(h["version"], h["current"], h["running"], h["booted"]) for h in hist] == \
        [(1, True, [], 0), (2, False, ["n001"], 1)]
    assert "VERSION" in site.run("images", "history", "centos7").stdout
    before = state(site)
    refused(site.run("images", "rollback", "centos7", "--version", "3"), 2, "has no version 3")
    refused(site.run("images", "rollback", "centos7", "--version", "-1"), 2,
            "--version '-1' is not a version number")
    assert unchanged(site, before)
    proc = site.run("images", "rollback", "centos7", "--version", "2")
    assert proc.returncode == 0, proc.stderr
    assert Catalog(site.cfg).get("centos7").version == 2


def test_the_running_server_serves_the_rolled_back_version_at_the_next_boot(site, tmp_path):
    """`pxe-stage serve` as a process: after -rollback, the loader config a booting node fetches
    (HTTP for iPXE, TFTP for pxelinux) names version 1's kernel, and that blob is served."""
    import httpx

    from tests.test_serve_support import curl_tftp, serve_process

    upload(site, tmp_path, "one")
    upload(site, tmp_path, "two")
    Inventory(site.cfg).add([build(site.cfg, {"name": "n001", "mac": "52:54:00:00:00:01"})])
    v1, v2 = Catalog(site.cfg).history("centos7")
    setboot.set_boot(site.cfg, ["n001"], "centos7")
    out = tmp_path / "pxelinux.cfg"
    with serve_process(site) as srv:
        def served() -> tuple[str, str]:
            ipxe = httpx.get(f"{srv.url}/ipxe/52-54-00-00-00-01.ipxe", timeout=10)
            assert ipxe.status_code == 200, ipxe.text
            proc = curl_tftp(srv.tftp_port, "pxelinux.cfg/01-52-54-00-00-00-01", out)
            assert proc.returncode == 0, proc.stderr
            return ipxe.text, out.read_text()

        for text in served():
            assert v2.kernel_sha in text and v1.kernel_sha not in text
        proc = fg(site, "-rollback", "-label", "centos7")
        assert proc.returncode == 0, proc.stderr
        for text in served():
            assert v1.kernel_sha in text and v2.kernel_sha not in text
        blob = httpx.get(f"{srv.url}/blobs/{v1.kernel_sha}", timeout=10)
        assert blob.status_code == 200
        assert hashlib.sha256(blob.content).hexdigest() == v1.kernel_sha
