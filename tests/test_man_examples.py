"""Every EXAMPLES line of the man pages that needs no hardware runs, in order, against a fresh site.

Lines ending in one of SKIP_MARKS are skipped: '# hardware' (a real BMC, the provisioning network,
a booted node, the lab's VMs), '# system' (changes this host's accounts, sudoers or services),
'# network' (needs the Debian archive), '# postgresql' (needs a PostgreSQL server). The rest
must exit 0, so a page whose examples go stale fails CI. Each page runs in a fresh site (plus
SITE_EXTRA[page] appended to its config).
"""

import shlex
import subprocess

import pytest

from tests.conftest import fake_bzimage, make_site
from tools import manpage

pytestmark = pytest.mark.integration

SKIP_MARKS = ("# hardware", "# system", "# network", "# postgresql")

# Per page: TOML appended to the throw-away site's config ({work} = the examples' directory).
SITE_EXTRA = {
    # -list needs the image group to exist; a group every Debian system has (read only).
    "fg-moab-group": '\n[groups]\nimage = "root"\n',
    "pxe-stage-api": '\n[api]\ncert = "{work}/api.crt"\nkey = "{work}/api.key"\n',
}

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
    # moab.cfg for fg-moab -install
    (work / "slurm.conf").write_text("ClusterName=c1\n")
    (work / "moab.cfg").write_text("# moab.cfg\nSCHEDCFG[Moab] SERVER=head:42559\n")
    # BMC passwords for the nodes the pages add (n010 names its key; others use default)
    secrets = site.cfg.paths.secrets_file
    secrets.write_text('default = "example-password"\nbmc-n010 = "example-password"\n')
    secrets.chmod(0o600)
    # a bundle for fg-moab-image, a kernel package and a container image for the builders
    from pxe import bundle
    from tests.test_generate_support import fake_kernel_root, tiny_container

    bundle.build_bundle(work / "deb12.bundle", label="deb12", kernel=work / "vmlinuz",
                        initrd=work / "initrd.img")
    fake_kernel_root(work / "kernel")
    tiny_container(work / "myimage.tar", {"usr/bin/hello": b"#!/bin/sh\necho hello\n"})
    return site, work


@pytest.mark.parametrize("page", PAGES)
def test_man_page_examples_run(page, tmp_path):
    site, work = workdir_for_examples(tmp_path)
    if page in SITE_EXTRA:
        with open(site.config_path, "a") as fh:
            fh.write(SITE_EXTRA[page].format(work=work))
    env = {"DYNPROV_CONFIG": str(site.config_path)}
    import os

    env = {**os.environ, **env}
    ran = 0
    for line in manpage.examples(page):
        if line.endswith(SKIP_MARKS):
            continue
        argv = shlex.split(line, comments=True)
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{page}: `{line}` -> {proc.returncode}\n{proc.stderr}"
        ran += 1
    assert ran, f"{page}: no runnable example"


def test_config_page_example_passes_every_section_check(tmp_path):
    """dynprov.toml(5)'s EXAMPLES block is a config every owner of a section accepts."""
    from msm_plugin.fg_moab import settings as moab_settings
    from pxe import config, repository
    from pxe.api import settings as api_settings
    from pxe.power import settings as power_settings
    from pxe.serve import settings as serve_settings

    text = manpage._extra_sections("dynprov.toml")["EXAMPLES"]
    # the section is stripped, so the first line has lost its indent; the block is all of it
    toml = "\n".join(ln.removeprefix("    ") for ln in text.splitlines())
    path = tmp_path / "dynprov.toml"
    path.write_text(toml)
    cfg = config.load(path)
    assert set(cfg.raw) >= {"power", "serve", "moab", "images", "api"}
    assert power_settings.load(cfg).soft_off_command[0] == "ssh"
    assert serve_settings.load(cfg).max_transfers == 1024
    assert moab_settings(cfg).max_run_seconds == 780
    assert repository.settings(cfg).max_bundle_bytes == 8589934592
    assert api_settings.load(cfg).auth == ("pam", "file")
