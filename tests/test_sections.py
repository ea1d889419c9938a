"""pxe.sections: the shared checks of open config sections ([moab], [slurm] ...)."""

from __future__ import annotations

import pytest

from msm_plugin import fg_moab
from pxe.errors import InputError
from pxe.sections import Section
from slurm_plugin import conf
from tests.conftest import make_site


def _site(tmp_path, text: str):
    site = make_site(tmp_path / "s")
    site.config_path.write_text(site.config_path.read_text() + "\n" + text)
    return site.cfg


@pytest.mark.unit
@pytest.mark.parametrize(("text", "message"), [
    ("[moab]\nprovduration = 5\n", "moab.provduration: must be an integer >= 10, got 5"),
    ("[moab]\ntimeout = true\n", "moab.timeout: must be an integer >= 3, got True"),
    ("[moab]\ntools_dir = \"bin; rm -rf /\"\n", "moab.tools_dir: must be an absolute path"),
    ("[moab]\nrevert_to = \"../x\"\n", "moab.revert_to: "),
    ("[moab]\nfoo = 1\n", "moab.foo: unknown key (known: margin, provduration, revert_to"),
])
def test_moab_section_refusals_name_file_and_key(tmp_path, text, message):
    cfg = _site(tmp_path, text)
    with pytest.raises(InputError) as err:
        fg_moab.settings(cfg)
    assert str(err.value).startswith(f"{cfg.path}: ") and message in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize(("text", "message"), [
    ("[slurm]\nresume_timeout = 10\n", "slurm.resume_timeout: must be an integer >= 30, got 10"),
    ("[slurm]\nhelper = \"relative/helper\"\n", "slurm.helper: must be an absolute path"),
    ("[slurm]\nbogus = 1\n", "slurm.bogus: unknown key"),
])
def test_slurm_section_refusals_name_file_and_key(tmp_path, text, message):
    cfg = _site(tmp_path, text)
    with pytest.raises(InputError) as err:
        conf.settings(cfg)
    assert message in str(err.value)


@pytest.mark.unit
def test_section_getters(tmp_path):
    cfg = _site(tmp_path, "[slurm]\nexec_time = 20\ntools_dir = \"/usr/local/bin\"\n")
    sec = Section(cfg, "slurm", {"exec_time", "tools_dir", "flag"})
    assert sec.integer("exec_time", 1, 60) == 20
    assert sec.integer("missing", 1, default=7) == 7
    assert sec.path("tools_dir") == "/usr/local/bin" and sec.path("missing") is None
    assert sec.boolean("flag") is False
    with pytest.raises(InputError, match=r"slurm\.exec_time: must be an integer from 1 to 10, got 20"):
        sec.integer("exec_time", 1, 10)
    ok = conf.settings(cfg)
    assert (ok.exec_time, ok.tools_dir) == (20, "/usr/local/bin")
