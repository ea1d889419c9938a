"""tools/demo (the README's main job) without QEMU: `--help` and `--check`, which walks every step
of the demo - site, images, the lab's site checks and inventory, render, the scheduler's queries,
the on-demand mode, a progress snapshot - and boots nothing. A broken import or a renamed step
(once: the lab step shadowed by a helper of the same name) fails here, not only in a full run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from initramfs_support import kernel_root  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tools" / "demo"


def demo(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DYNPROV_CONFIG", None)
    return subprocess.run([sys.executable, str(DEMO), *argv], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.integration
def test_demo_help_names_its_options() -> None:
    proc = demo("--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--check", "--school", "--no-install", "--timeout"):
        assert option in proc.stdout


@pytest.mark.integration
@pytest.mark.parametrize("story,nodes,labels", [
    ((), ("node1", "node2", "node3"), ("centos5", "sles11")),
    (("--school",), ("ws1", "ws2", "ws3"), ("desktop", "exam")),
], ids=("cluster", "school"))
def test_demo_check_walks_every_step_without_booting(story: tuple[str, ...],
                                                     nodes: tuple[str, ...],
                                                     labels: tuple[str, ...]) -> None:
    kernel_root()  # the images need Debian's kernel (skips, as the e2e tests do, without it)
    proc = demo("--check", *story)
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    for label in labels:  # built and added through pxe-stage images add
        assert re.search(rf"^added image {label} version 1 ", out, re.M), out
    assert f"registered: {', '.join(nodes)}" in out  # the lab's inventory step
    assert "dhcp (dnsmasq)" in out and ": installed" in out  # pxe-stage render, daemon-checked
    for node in nodes:  # the scheduler's query reads the inventory and the images
        assert re.search(rf"^{node} STATE=Idle;OS=_none;OSLIST={','.join(labels)};", out,
                         re.M), out
        assert re.search(rf"^   .*{node}: checked ", out, re.M), out  # progress snapshot read
    assert "`os-switch --help` loads: usage: os-switch" in out
    if not story:
        assert "(provisioning mode: ondemand)" in out
    site = re.search(r"^removed (/\S+)$", out, re.M)
    assert site, out
    assert not Path(site.group(1)).exists()  # torn down
