"""Every EXAMPLES line of the man pages that needs no hardware runs, in order, against a fresh site.

Lines ending in '# hardware' (a real BMC, a booted node) are skipped; the rest must exit 0, so a
page whose examples go stale fails CI.
"""

import shlex
import subprocess

import pytest

from pxe import manpage
from tests.conftest import fake_bzimage, make_site

pytestmark = pytest.mark.integration

PAGES = sorted(p.stem for p in manpage.EXTRA_DIR.glob("*.md") if manpage.examples(p.stem))


def workdir_for_examples(tmp_path):
    """A fresh site plus the sample files the examples name (nodes.csv, vmlinuz, ...)."""
    site = make_site(tmp_path / "site")
    work = tmp_path / "work"
    work.mkdir()
    (work / "nodes.csv").write_text("name,mac,ip,firmware\n"
                                    "n001,52:54:00:aa:00:01,198.18.0.11,bios\n"
                                    "n002,52:54:00:aa:00:02,198.18.0.12,uefi\n")
    (work / "nodes.yaml").write_text("nodes:\n  - {name: n003, mac: '52:54:00:aa:00:03'}\n")
    fake_bzimage(work / "vmlinuz", b"kernel")
    (work / "initrd.img").write_bytes(b"initrd")
    return site, work


@pytest.mark.parametrize("page", PAGES)
def test_man_page_examples_run(page, tmp_path):
    site, work = workdir_for_examples(tmp_path)
    env = {"DYNPROV_CONFIG": str(site.config_path)}
    import os

    env = {**os.environ, **env}
    ran = 0
    for line in manpage.examples(page):
        if line.endswith("# hardware"):
            continue
        argv = shlex.split(line, comments=True)
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{page}: `{line}` -> {proc.returncode}\n{proc.stderr}"
        ran += 1
    assert ran, f"{page}: no runnable example"
