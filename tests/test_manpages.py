"""Man pages: one per command, generated from the parsers, rendered by groff without warnings."""

import shutil
import subprocess

import pytest

from tools import manpage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    return {p.name: p for p in manpage.write_all(out)}


def test_every_console_script_has_a_page(pages):
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(manpage.PROJECT_ROOT) / "pyproject.toml").read_text())
    for script in scripts["project"]["scripts"]:
        assert f"{script}.1" in pages, f"no man page for {script} (add it to tools.manpage.COMMANDS)"
    assert "dynprov.toml.5" in pages


def test_options_come_from_the_parsers(pages):
    text = pages["pxe-stage-set-boot.1"].read_text()
    assert "\\-\\-os" in text and "\\-\\-local" in text
    assert "\\-set" in pages["os-switch.1"].read_text()


@pytest.mark.skipif(not shutil.which("groff"), reason="groff is installed by tools/install-deps")
def test_groff_renders_every_page_without_warnings(pages):
    for name, path in pages.items():
        proc = subprocess.run(["groff", "-ww", "-man", "-Tutf8", "-z", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not proc.stderr.strip(), f"{name}: {proc.stderr}"
