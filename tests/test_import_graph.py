"""The toolkit knows no scheduler: nothing under pxe/ imports a face (msm_plugin, slurm_plugin),
the test or tool trees, and only the lab's own CLI imports the virtual hardware (lab)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

FORBIDDEN = ("msm_plugin", "slurm_plugin", "lab", "tools", "tests")
LAB_USERS = ("lab/", "lab/commands.py")  # the virtual cluster and its own command


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module a file imports: import/from statements at any depth, and
    importlib.import_module / __import__ calls with a constant name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                parts = path.relative_to(root).with_suffix("").parts[:-node.level]
                base = ".".join(parts)
                name = ".".join(p for p in (base, node.module or "") if p)
                out.append((node.lineno, name))
            elif node.module:
                out.append((node.lineno, node.module))
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            out.append((node.lineno, node.args[0].value))
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for path in sorted((root / "pxe").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for lineno, module in imports(path, root):
            top = module.split(".")[0]
            if top in FORBIDDEN:
                bad.append(f"{rel}:{lineno}: imports {module}")
            elif (module == "lab" or module.startswith("lab.")) \
                    and not rel.startswith(LAB_USERS):
                bad.append(f"{rel}:{lineno}: imports the virtual hardware {module}")
    return bad


def test_the_toolkit_imports_no_face() -> None:
    assert violations(ROOT) == []


def test_the_check_finds_every_kind_of_import(tmp_path: Path) -> None:
    """The checker itself: each way of importing a face is caught (so an empty list means it)."""
    pkg = tmp_path / "pxe" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("import msm_plugin.wiki\n")
    (pkg / "b.py").write_text("def f():\n    from slurm_plugin import helper\n")
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('msm_plugin.wiki')\n")
    (pkg / "d.py").write_text("from lab import qemu\n")
    (pkg / "e.py").write_text("from ...tools import bench\n")  # relative, out of pxe
    (pkg / "ok.py").write_text("from pxe import states\nimport os\n")
    found = violations(tmp_path)
    assert sorted({v.split(":")[0] for v in found}) == [
        "pxe/sub/a.py", "pxe/sub/b.py", "pxe/sub/c.py", "pxe/sub/d.py", "pxe/sub/e.py"]
