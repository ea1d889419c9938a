"""Story A extras: `[moab] revert_to` re-images a node to the site default at job end (through the
real TORQUE epilogue path), and `fg-moab -install` warns about xCAT's MSM leftovers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from moab_standin import MoabStandIn
from test_moab import _plain_site, _tools
from test_run_support import argv, cluster, node_row, wait_for

from msm_plugin.fg_moab import merge
from tests.conftest import Site

XCAT = """RMCFG[torque] TYPE=PBS
RMCFG[msm] TYPE=NATIVE:msm FLAGS=autosync,NOCREATERESOURCE RESOURCETYPE=PROV
RMCFG[msm] TIMEOUT=60
USERCFG[DEFAULT] QLIST=xcatqos
"""


@pytest.mark.unit
def test_install_warns_about_xcat_msm_and_an_overridden_qlist() -> None:
    new, warnings = merge(XCAT, ["RMCFG[prov] TYPE=NATIVE", "USERCFG[DEFAULT] QLIST=prov"])
    assert new.startswith(XCAT) and "RMCFG[prov] TYPE=NATIVE" in new  # still installed
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("USERCFG[DEFAULT] QLIST=xcatqos is overridden by the dynprov "
                                  "block's USERCFG[DEFAULT] QLIST=prov")
    assert "QLIST=xcatqos,prov" in warnings[0]
    assert warnings[1].startswith("xCAT's MSM is configured (2 RMCFG[msm] line(s))")
    assert merge("USERCFG[DEFAULT] QLIST=prov\n", ["X"])[1] == []


@pytest.mark.integration
def test_install_prints_the_warnings(site: Site, tmp_path: Path) -> None:
    _plain_site(site, tmp_path)
    _tools(tmp_path)
    moab_cfg = tmp_path / "moab.cfg"
    moab_cfg.write_text(XCAT)
    proc = site.run("-install", str(moab_cfg), cmd="fg-moab", check=True)
    assert f"fg-moab: warning: {moab_cfg}: xCAT's MSM is configured" in proc.stderr
    assert "QLIST=xcatqos is overridden" in proc.stderr
    assert "dynprov block written" in proc.stdout


@pytest.mark.integration
def test_bad_revert_to_is_refused(site: Site, tmp_path: Path) -> None:
    _plain_site(site, tmp_path)
    site.config_path.write_text(site.config_path.read_text().replace(
        "[moab]\n", '[moab]\nrevert_to = "../etc"\n'))
    proc = site.run("-used", "n001", cmd="fg-moab")
    assert proc.returncode == 2 and "moab.revert_to" in proc.stderr


@pytest.mark.integration
def test_perjob_revert_to_site_default_at_job_end(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 1, moab={"revert_to": "sles11"}) as c:
        site.run("-mode", "perjob", cmd="fg-moab", check=True)
        # Moab and TORQUE give their children a minimal environment; keep this checkout's code.
        code = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        conf = c.torque.epilogue_env
        c.torque.epilogue_env = lambda node: {**conf(node), **code}
        moab = MoabStandIn({n: argv(n) for n in ("os-switch", "cluster-query", "node-power")},
                           {**c.env, **code}, c.torque, cwd=c.site.root)
        moab.query()
        moab.submit("1.head", "centos5")
        moab.run_until(lambda: moab.jobs["1.head"].state == "running")
        assert c.node("n001").boots == ["image:centos5"]
        moab.end_job("1.head")  # TORQUE runs our epilogue -> fg-moab -used -> revert
        assert [p.returncode for p in c.torque.epilogue_runs] == [0]
        wait_for(lambda: c.node("n001").boots[-1:] == ["image:sles11"]
                 and node_row(c.cfg, "n001")["state"] == "ready")
        row = node_row(c.cfg, "n001")
        assert (row["current_os"], row["used"]) == ("sles11", 0)
        assert moab.query()["n001"]["OS"] == "sles11"  # what a job without an OS request gets
