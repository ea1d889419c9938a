"""Hardware facts feed the scheduler faces: Moab's node report gets CPROC/CMEMORY (read by the
strict WIKI reader of the Moab stand-in), `dynprov-slurm config`'s node lines get CPUs= and
RealMemory= never above what the node has; nodes without facts get neither."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from moab_standin import WikiError, parse_wiki
from test_slurm_support import cli
from test_wiki_common_sql import _mixed

from msm_plugin import wiki
from pxe import db, hwfacts
from slurm_plugin import conf
from tests.conftest import Site, fake_bzimage

pytestmark = pytest.mark.unit

FOUR_CPUS = "cpus 4\nmemory_kib 16314204\n"  # 15931 MiB, as /proc/meminfo's MemTotal says


@pytest.mark.parametrize("mode", ["once", "perjob"])
def test_wiki_lines_carry_cproc_and_cmemory_from_facts(tmp_path: Path, mode: str) -> None:
    conn = db.connect(tmp_path / "state.db")
    _mixed(conn)
    with db.transaction(conn):
        db.set_setting(conn, wiki.MODE_SETTING, mode)
    # a line SQLite formats, lines Python builds (failed, other pool, in a run), one fact only
    for name in ("a-ready", "d-failed", "f-spare", "j-in-run"):
        hwfacts.store(conn, name, hwfacts.parse(FOUR_CPUS))
    hwfacts.store(conn, "h-arm", hwfacts.parse("cpus 96\n"))
    hwfacts.store(conn, "b-off", hwfacts.parse("cpus 0\nserial X\n"))  # nothing Moab can use
    now = time.time()
    fast = wiki.build(conn, "hpc", now)
    assert fast.text == wiki.build(conn, "hpc", now, common_in_sql=False).text
    view = parse_wiki(fast.text)
    for name in ("a-ready", "d-failed", "f-spare", "j-in-run"):
        assert (view[name]["CPROC"], view[name]["CMEMORY"]) == ("4", "15931"), name
    assert view["h-arm"]["CPROC"] == "96" and "CMEMORY" not in view["h-arm"]
    for name in ("b-off", "c-unknown", "k-empty-os"):
        assert not {"CPROC", "CMEMORY"} & view[name].keys(), name
    assert view["d-failed"]["STATE"] == "Down" and view["f-spare"]["STATE"] == "Drained"
    conn.close()


def test_wiki_reader_refuses_a_count_that_is_not_a_number() -> None:
    """The stand-in reads CPROC/CMEMORY as Moab does: whole numbers or the test fails."""
    assert parse_wiki("n1 STATE=Idle;CPROC=4;CMEMORY=100\n")["n1"]["CPROC"] == "4"
    for bad in ("CPROC=4.5", "CMEMORY=16G", "CPROC=-1"):
        with pytest.raises(WikiError, match="whole number"):
            parse_wiki(f"n1 STATE=Idle;{bad}\n")


def test_report_without_the_facts_table_still_builds(tmp_path: Path) -> None:
    """A database no writer has upgraded yet: the report leaves the resources out."""
    conn = db.connect(tmp_path / "state.db")
    _mixed(conn)
    conn.execute("DROP TABLE node_facts")
    view = parse_wiki(wiki.build(conn, "hpc").text)
    assert len(view) == 11 and not any("CPROC" in attrs for attrs in view.values())
    conn.close()


@pytest.mark.parametrize(("reported", "expected"), [
    ({"procs": 4, "memory_mb": 15931}, ["CPUs=4", "RealMemory=15612"]),  # 2 % below MemTotal
    ({"procs": 2, "memory_mb": 24105}, ["CPUs=2", "RealMemory=23622"]),
    ({"procs": 1, "memory_mb": 1}, ["CPUs=1", "RealMemory=1"]),  # never 0 (Slurm's "unset")
    ({"procs": 8}, ["CPUs=8"]),
    ({}, []),
])
def test_slurm_resource_words_never_exceed_the_facts(reported, expected) -> None:
    words = conf.node_resource_words(reported)
    assert words == expected
    for word in words:
        key, _, value = word.partition("=")
        assert int(value) <= reported["procs" if key == "CPUs" else "memory_mb"]


def test_dynprov_slurm_config_node_lines_carry_the_facts(site: Site, tmp_path: Path) -> None:
    kernel = fake_bzimage(tmp_path / "vmlinuz", b"k" * 64)
    for i, name in enumerate(("n001", "n002", "n003"), start=1):
        site.run("nodes", "add", name, "--mac", f"52:54:00:ab:02:{i:02x}",
                 *(["--arch", "aarch64"] if name == "n003" else []), check=True)
    site.run("images", "add", "centos5", "--kernel", str(kernel), check=True)
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("helper", "reboot", "resume", "suspend"):
        (tools / f"dynprov-slurm-{name}").write_text("#!/bin/sh\n")
        (tools / f"dynprov-slurm-{name}").chmod(0o755)
    with open(site.config_path, "a") as fh:
        fh.write(f'\n[slurm]\ntools_dir = "{tools}"\n')
    conn = db.connect(site.cfg.database)
    hwfacts.store(conn, "n001", hwfacts.parse(FOUR_CPUS))
    hwfacts.store(conn, "n003", hwfacts.parse("cpus 64\nmemory_kib 268435456\n"))
    conn.close()
    proc = cli("config", env={"DYNPROV_CONFIG": str(site.config_path)})
    assert proc.returncode == 0, proc.stderr
    nodes = [ln for ln in proc.stdout.splitlines() if ln.startswith("# NodeName=")]
    assert nodes == ["# NodeName=n001 CPUs=4 RealMemory=15612 Feature=centos5",
                     "# NodeName=n002 Feature=centos5",  # no facts yet: nothing invented
                     "# NodeName=n003 CPUs=64 RealMemory=256901"]  # no aarch64 image


def test_resources_cannot_be_forged_through_text_facts(tmp_path: Path) -> None:
    """The resources are read from the stored JSON without decoding it: a CPU model or DMI
    string that spells a key must not count (quotes never survive pxe.hwfacts.parse)."""
    conn = db.connect(tmp_path / "state.db")
    _mixed(conn)
    text = 'cpus 2\ncpu_model x", "cpus": 999\nserial "memory_mib": 77\nproduct {"cpus": 5}\n'
    hwfacts.store(conn, "a-ready", hwfacts.parse(text))
    assert hwfacts.scheduler_resources(conn) == {"a-ready": {"procs": 2}}
    view = parse_wiki(wiki.build(conn, "hpc").text)
    assert view["a-ready"]["CPROC"] == "2" and "CMEMORY" not in view["a-ready"]
    conn.close()
