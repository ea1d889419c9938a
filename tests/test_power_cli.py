"""`pxe-stage power|bootdev|console` as real processes against virtual BMCs on 127.0.0.1."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_power_support import PASSWORD, USER, power_config, vbmc

from pxe.cli.power import Progress, report
from pxe.power.base import PowerResult

pytestmark = pytest.mark.integration


def _add(site, name: str, mac: str, *extra: str) -> None:
    site.run("nodes", "add", name, "--mac", mac, *extra, check=True)


def _ipmi(site, name: str, mac: str, port: int, firmware: str = "bios") -> None:
    _add(site, name, mac, "--bmc-type", "ipmi", "--bmc-address", "127.0.0.1", "--bmc-port",
         str(port), "--bmc-user", USER, "--firmware", firmware)


def test_power_status_table_json_and_partial_failure(site, tmp_path: Path):
    power_config(site, timeout=1.0, retries=1)
    with vbmc(tmp_path, "c[1-3]", 3) as bmc:
        base = bmc.base_port
        for i in range(3):
            _ipmi(site, f"c00{i + 1}", f"52:54:00:40:00:0{i + 1}", base + i)
        _add(site, "c004", "52:54:00:40:00:04")  # no BMC
        ok = site.run("power", "status", "c[001-003]")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "c[001-003]: off"

        out = site.run("power", "on", "c[001-004]")
        assert out.returncode == 1
        assert "c[001-003]: on" in out.stdout
        assert "c004: FAILED (no-bmc)" in out.stdout
        assert "failed on 1 of 4 node(s): c004 (no-bmc)" in out.stderr

        js = site.run("power", "status", "c[001-004]", "--json")
        assert js.returncode == 1
        data = json.loads(js.stdout)
        assert [(d["node"], d["ok"], d["value"], d["kind"]) for d in data] == [
            ("c001", True, "on", None), ("c002", True, "on", None), ("c003", True, "on", None),
            ("c004", False, None, "no-bmc")]
        for proc in (ok, out, js):
            assert PASSWORD not in proc.stdout + proc.stderr
        audit = (site.root / "state" / "audit.log").read_text()
        assert '"action": "power-on"' in audit and PASSWORD not in audit


def test_bootdev_uefi_flag_and_persistent(site, tmp_path: Path):
    power_config(site, timeout=1.0)
    with vbmc(tmp_path, "b[1-2]", 2) as bmc:
        base = bmc.base_port
        _ipmi(site, "b001", "52:54:00:41:00:01", base, firmware="uefi")
        _ipmi(site, "b002", "52:54:00:41:00:02", base + 1)
        out = site.run("bootdev", "b[001-002]", "network")
        assert out.returncode == 0, out.stderr
        assert "b001: network (UEFI), next boot only" in out.stdout
        assert "b002: network, next boot only" in out.stdout
        out = site.run("bootdev", "b002", "disk", "--persistent")
        assert out.stdout.strip() == "b002: disk, persistent"
        sets = [e for e in bmc.events() if e["event"] == "set-boot"]
        assert sorted((e["bmc"], e["device"], e["efi"], e["persistent"]) for e in sets) == [
            ("b1", "network", True, False), ("b2", "disk", False, True),
            ("b2", "network", False, False)]


def test_unknown_node_bad_input_and_validate(site, tmp_path: Path):
    power_config(site)
    _add(site, "v001", "52:54:00:42:00:01", "--bmc-type", "wol")
    _add(site, "v002", "52:54:00:42:00:02")
    _add(site, "v003", "52:54:00:42:00:03", "--bmc-type", "ipmi", "--bmc-address",
         "127.0.0.1", "--bmc-user", USER, "--bmc-secret", "missing-key")
    out = site.run("power", "on", "v001,ghost")
    assert out.returncode == 1 and "unknown node(s): ghost" in out.stderr
    assert site.run("power", "bogus", "v001").returncode == 2
    assert site.run("power", "status", "v001", "--workers", "0").returncode == 2
    val = site.run("power", "validate", "v[001-003]")
    assert val.returncode == 1
    assert "v001: ready" in val.stdout
    assert "v002: no BMC: power is manual" in val.stdout
    assert "v003: no key 'missing-key'" in val.stdout
    (site.root / "bmc-secrets").chmod(0o640)
    loose = site.run("power", "on", "v003")
    assert loose.returncode == 1 and "chmod 600" in loose.stderr


def test_console_over_serial_over_lan(site, tmp_path: Path):
    power_config(site)
    with vbmc(tmp_path, "s1", 1, power_on=True) as bmc:
        _ipmi(site, "s001", "52:54:00:43:00:01", bmc.base_port)
        env_cmd = [sys.executable, "-m", "pxe.cli.main", "console", "s001", "--seconds", "3"]
        proc = subprocess.run(env_cmd, input=b"hello node\r", capture_output=True, timeout=120,
                              env={**__import__("os").environ,
                                   "DYNPROV_CONFIG": str(site.config_path)})
        assert proc.returncode == 0, proc.stderr
        assert b"[s1 serial console]" in proc.stdout
        typed = "".join(e["data"] for e in bmc.events() if e["event"] == "console-input")
        assert "hello node" in typed
    _add(site, "s002", "52:54:00:43:00:02", "--bmc-type", "wol")
    out = site.run("console", "s002")
    assert out.returncode == 1 and "needs an IPMI BMC" in out.stderr


@pytest.mark.unit
def test_report_folds_successes_and_names_failures():
    lines: list[str] = []
    report([PowerResult("n001", True, "on"), PowerResult("n002", True, "on"),
            PowerResult("n003", True, "off"),
            PowerResult("n004", False, error="no answer", kind="timeout")], lines.append)
    assert lines == ["n[001-002]: on", "n003: off", "n004: FAILED (timeout): no answer"]


@pytest.mark.unit
def test_progress_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    p = Progress("power on", 3)
    for r in (PowerResult("a", True), PowerResult("b", False, kind="auth"),
              PowerResult("c", True)):
        p(r)
    p.finish()
    assert "power on: 3/3 done, 1 failed" in err.getvalue()
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    quiet = Progress("power on", 3)
    quiet(PowerResult("a", True))
    assert plain.getvalue() == ""
