"""The product never imports the lab, the tools or a scheduler face (issue 19).

pxe/ is what a site installs and runs; lab/ is test and demo hardware (`dynprov-lab`), tools/ is
the checkout's scripts, msm_plugin/ and slurm_plugin/ are faces that call pxe, never the reverse.
Checked statically (every import, every literal importlib name, module paths kept as strings,
paths into tools/) and at run time (every pxe module imported and pxe-stage's whole parser built
while those packages cannot be imported at all: the product works without them installed).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pxe

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PXE_DIR = Path(pxe.__file__).resolve().parent  # the checkout's, or an installed wheel's
FORBIDDEN = ("lab", "tools", "msm_plugin", "slurm_plugin")
DOTTED = re.compile(r"^(?:" + "|".join(FORBIDDEN) + r")(?:\.[A-Za-z_]\w*)+$")


def _names_a_module(text: str) -> bool:
    """'msm_plugin.fg_moab' (a module of this tree, as importlib takes it), not 'lab.json'."""
    if not DOTTED.match(text):
        return False
    try:
        return importlib.util.find_spec(text) is not None
    except (ImportError, ValueError):
        return False


def offences(path: Path) -> list[str]:
    """What in one source file ties it to a forbidden package: 'line: what'."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in FORBIDDEN]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] in FORBIDDEN:
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            name = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(name, str) \
                    and name.split(".")[0] in FORBIDDEN:
                found.append(f"{node.lineno}: {called}({name!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if _names_a_module(text) or text == "tools" or text.startswith(("tools/", "lab/")):
                found.append(f"{node.lineno}: string {text!r}")
    return found


def test_no_pxe_module_imports_lab_tools_or_a_face():
    sources = sorted(PXE_DIR.rglob("*.py"))
    assert len(sources) > 50, f"{PXE_DIR}: not the pxe package"
    bad = [f"pxe/{p.relative_to(PXE_DIR)}:{o}" for p in sources for o in offences(p)]
    assert not bad, "the product must not depend on lab/tools/faces:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", [
    "import lab.cluster\n",
    "from msm_plugin import os_switch\n",
    "from tools.manpage import write_all\n",
    "import importlib\nimportlib.import_module('slurm_plugin.node_power')\n",
    "COMMANDS = {'fg-moab': 'msm_plugin.fg_moab'}\n",
    "from pathlib import Path\nLAUNCHER = Path(__file__).parent / 'tools' / 'vbmc'\n",
    "RUN = ['python3', 'tools/fetch-kernel']\n",
])
def test_the_scan_sees_each_kind_of_dependency(tmp_path, source):
    path = tmp_path / "sample.py"
    path.write_text(source)
    assert offences(path), f"not caught: {source!r}"


def test_the_scan_leaves_the_products_own_words_alone(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text('from pxe import labels\nSECTION = "lab"\nHELP = "see tools/fetch-kernel"\n'
                    'import pxe.cli.main\nSTATE = ("lab.json", "lab.lock")\n')
    assert offences(path) == []


BLOCKED_RUN = r"""
import importlib, pkgutil, sys
FORBIDDEN = @FORBIDDEN@
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, Blocked())
import pxe
names = [m.name for m in pkgutil.walk_packages(pxe.__path__, "pxe.")]
for name in names:
    importlib.import_module(name)
from pxe.cli import main
parser = main.build_parser()
words = sorted(next(a for a in parser._actions if a.choices and "render" in a.choices).choices)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print(len(names), ",".join(words), ",".join(leaked) or "-")
""".replace("@FORBIDDEN@", repr(FORBIDDEN))


def test_every_pxe_module_loads_with_lab_tools_and_faces_uninstalled():
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, words, leaked = proc.stdout.split()
    assert int(count) > 50
    assert leaked == "-"
    assert "render" in words.split(",") and "lab" not in words.split(",")
