"""A customization log (<state_dir>/customize/<label>.log) goes with its image's last version,
through the real commands (`pxe-stage images remove`, `fg-moab-image -delete`); deleting one kept
version keeps it; the audit log and the events keep the removal's record."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from pxe import audit, db
from tests.test_bundle import build_good_bundle
from tests.test_bundle_customize import script

pytestmark = pytest.mark.integration


def fg_moab_image(site, *argv: str) -> subprocess.CompletedProcess[str]:
    """fg-moab-image of this checkout, as a process against the site."""
    return subprocess.run([sys.executable, "-m", "msm_plugin.fg_moab_image", *argv],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DYNPROV_CONFIG": str(site.config_path)})


def test_the_log_goes_with_the_last_version(site, tmp_path):
    scripts = tmp_path / "customize"
    script(scripts / "all", "10-hello", 'echo "customized $DYNPROV_IMAGE"')
    with open(site.config_path, "a") as fh:
        fh.write(f'\n[images]\ncustomize_dir = "{scripts}"\n')
    bundle = build_good_bundle(tmp_path)
    for label in ("alpha", "beta", "beta"):  # beta twice: versions 1 and 2
        proc = fg_moab_image(site, "-upload", "-image", str(bundle), "-label", label)
        assert proc.returncode == 0, proc.stderr
    logs = site.cfg.paths.state_dir / "customize"
    assert sorted(p.name for p in logs.iterdir()) == ["alpha.log", "beta.log"]
    assert "customized beta" in (logs / "beta.log").read_text()

    proc = site.run("images", "remove", "alpha")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in logs.iterdir()) == ["beta.log"]  # only alpha's
    with contextlib.closing(db.connect(site.cfg.database)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'image-removed' AND "
                            "detail = 'alpha'").fetchone()[0] == 1

    proc = fg_moab_image(site, "-delete", "-label", "beta", "-version", "1")
    assert proc.returncode == 0, proc.stderr
    assert (logs / "beta.log").exists()  # version 2 is still there: so is its log
    proc = fg_moab_image(site, "-delete", "-label", "beta")
    assert proc.returncode == 0, proc.stderr
    assert list(logs.iterdir()) == []
    deletes = [r for r in audit.read(site.cfg.paths.state_dir) if r["action"] == "image-delete"]
    assert [(r["label"], r.get("version")) for r in deletes] == [("beta", 1), ("beta", None)]
