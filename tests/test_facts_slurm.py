"""The Slurm node lines `dynprov-slurm config` writes from hardware facts, checked by real Slurm:
this machine's facts (dp_facts under busybox sh, the real /proc and /sys) become CPUs= and
RealMemory=, a real slurmctld takes a slurmd -N on this machine with those values as idle, and
the same slurmctld drains a node configured with more memory than the facts say it has (the
failure the headroom avoids)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from initramfs_support import bbsh, busybox_path
from test_slurm_support import FakeNode, SlurmLab, cli, slurm_tools, wait_until

from pxe import db, hwfacts
from tests.conftest import Site

pytestmark = pytest.mark.integration


class FactsLab(SlurmLab):
    """SlurmLab whose NodeName lines carry the given resource words instead of its defaults."""

    def __init__(self, base: Path, nodes: dict[str, FakeNode], words: dict[str, str]):
        super().__init__(base, nodes)
        self.words = words
        self.labels = ["centos5"]  # node_features/helpers will not start without a feature

    def conf_text(self, reboot_program: str | None) -> str:
        lines = super().conf_text(reboot_program).splitlines()
        for i, text in enumerate(lines):
            name = text.partition(" ")[0].removeprefix("NodeName=")
            if text.startswith("NodeName=") and name in self.words:
                lines[i] = text.replace("CPUs=1 RealMemory=100", self.words[name])
        return "\n".join(lines) + "\n"


def _node(lab: SlurmLab, name: str) -> dict[str, str]:
    out = lab.run("scontrol", "-o", "show", "node", name).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out))
    reason = re.search(r"Reason=(.*?)(?: \[|$)", out)
    fields["Reason"] = reason.group(1) if reason else ""
    return fields


def test_real_slurm_takes_the_node_lines_made_from_real_facts(site: Site, tmp_path: Path) -> None:
    (tmp_path / "bb").mkdir()
    bb = busybox_path(tmp_path / "bb")
    measured = bbsh(bb, "dp_facts")  # this machine: the one the slurmd below runs on
    assert measured.returncode == 0, measured.stderr
    facts = hwfacts.parse(measured.stdout)
    assert facts["cpus"] >= 1 and facts["memory_mib"] > 100
    for i, name in enumerate(("n001", "n002"), start=1):
        site.run("nodes", "add", name, "--mac", f"52:54:00:ab:03:{i:02x}", check=True)
    with open(site.config_path, "a") as fh:
        fh.write(f'\n[slurm]\ntools_dir = "{slurm_tools(tmp_path)}"\n')
    conn = db.connect(site.cfg.database)
    hwfacts.store(conn, "n001", facts)
    conn.close()
    proc = cli("config", env={"DYNPROV_CONFIG": str(site.config_path)})
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("# NodeName=n001 "))
    words = dict(w.split("=", 1) for w in line.split()[2:])
    cpus, memory = int(words["CPUs"]), int(words["RealMemory"])
    assert cpus == facts["cpus"] and memory < facts["memory_mib"]

    # slurmd's own view of this machine agrees: same CPUs, at least that much memory
    probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60)
    own = dict(re.findall(r"(\w+)=(\S+)", probe.stdout.splitlines()[0]))
    assert int(own["CPUs"]) == cpus and int(own["RealMemory"]) >= memory, probe.stdout

    nodes = {name: FakeNode(tmp_path, name) for name in ("n001", "n002")}
    for node in nodes.values():  # what the helper reads as the active feature
        node.boot("http://127.0.0.1:9", "centos5", "unused")
    over = f"CPUs={cpus} RealMemory={facts['memory_mib'] + 1024}"  # more than it has
    with FactsLab(tmp_path / "slurm", nodes,
                  {"n001": f"CPUs={cpus} RealMemory={memory}", "n002": over}) as lab:
        wait_until(lambda: _node(lab, "n001").get("State") == "IDLE"
                   and "DRAIN" in _node(lab, "n002").get("State", ""), "slurmd registered", 90)
        taken, drained = _node(lab, "n001"), _node(lab, "n002")
    assert (taken["CPUTot"], taken["RealMemory"]) == (str(cpus), str(memory))
    assert taken["Reason"] == ""
    assert "Low RealMemory" in drained["Reason"], drained
