"""e2e: the original demo on the virtual cluster. A minimal Debian generated with
fg-image-generate (one package, a check command that needs it) is uploaded with
fg-moab-image, switched to with os-switch, boots stateless (squashfs + RAM overlay) in a QEMU
node, and reports ready from inside the image, with the package present and the check passed.

One node, one boot (2 cores, TCG). The Debian build is shared with the integration test."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lab import cluster
from pxe import db
from tests.test_e2e_stack import _need_stack, lab_up
from tests.test_generate_support import CHECK, CHECK_OUTPUT, PACKAGE, debian_bundle

pytestmark = pytest.mark.e2e

NODE = '  {name = "g1", mac = "52:54:00:e2:09:01", ip = "198.18.0.91", power = "ipmi"},'
BOOT_TIMEOUT = 600  # a PXE boot is 16-30 s alone; the 45 MB root crosses HTTP into RAM


def test_generated_debian_boots_and_reports_ready_with_its_package(site, tmp_path_factory):
    _need_stack()
    generated = debian_bundle(tmp_path_factory)
    with lab_up(site, NODE) as lab:
        up = _fg_moab_image(site, "-upload", "-image", str(generated))
        assert up.returncode == 0, up.stderr
        listed = _fg_moab_image(site, "-list")
        assert "deb12-hello" in listed.stdout and "debian-12" in listed.stdout
        t0 = time.monotonic()
        sw = lab.os_switch("g1", "deb12-hello")
        assert sw.returncode == 0, sw.stderr
        states = lab.wait_final(["g1"], timeout=BOOT_TIMEOUT)
        took = time.monotonic() - t0
        assert states == {"g1": "ready"}, states
        print(f"os-switch -> ready from inside the generated Debian: {took:.1f} s")

        conn = db.connect(site.cfg.database)
        reports = [(r["kind"], r["detail"]) for r in conn.execute(
            "SELECT kind, detail FROM events WHERE node = 'g1' AND kind LIKE 'report-%' "
            "ORDER BY id")]
        details = [d for k, d in reports if k == "report-progress"]
        assert any(d.startswith(f"packages: {PACKAGE}=") for d in details), reports
        assert any(d.startswith(f"check {CHECK}: exit 0: {CHECK_OUTPUT}") for d in details), \
            reports
        assert reports[-1] == ("report-ready", "deb12-hello"), reports
        assert lab.query()["g1"]["OS"] == "deb12-hello"
        log = (cluster.lab_dir(site.cfg) / "serial" / "g1.log").read_text(errors="replace")
        after = log.split("switch_root")[-1]
        print("\n".join(ln for ln in after.splitlines() if "dynprov" in ln or CHECK_OUTPUT in ln))
        assert "dynprov: image deb12-hello is up" in after
        assert CHECK_OUTPUT in after


def _fg_moab_image(site, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    return subprocess.run([sys.executable, "-m", "msm_plugin.fg_moab_image", *argv],
                          capture_output=True, text=True, env=env, timeout=600)
