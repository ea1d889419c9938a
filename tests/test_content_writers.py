"""Every SQL write of the product sits in a `with db.transaction(...)` block, or in a helper its
callers run inside one: a write outside would commit on its own (connections are autocommit)
and leave the change stamp alone, so Moab's report, the boot configs, the REST API's cached
answers and the run driver's announcements (all keyed on db.content_stamp) would miss it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pxe", "msm_plugin", "slurm_plugin", "lab")
WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.I)
# Helpers whose callers hold the transaction (each says so, or is private to a function that
# opens it). A new one belongs here only with that contract in its docstring.
INSIDE_CALLERS_TRANSACTION = {
    "pxe/db.py": {"migrate", "set_setting", "log_event", "log_events"},
    "pxe/images.py": {"_record"},
    "pxe/imageversions.py": {"record", "make_current", "prune"},
    "pxe/power/agent.py": {"adopt"},
    "pxe/run.py": {"_finish_runs"},
    "pxe/setboot.py": {"_record"},
    "pxe/states.py": {"enter", "transition", "set_node"},
    # `state copy`: the target's own psycopg transaction, which also sets its stamp row
    "pxe/statecopy.py": {"_clear_target", "_copy_tables"},
}


def _sql(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _sql(node.left)
    return None


class _Writes(ast.NodeVisitor):
    """(line, function, SQL) of each write not lexically inside a transaction block."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str, str]] = []
        self.functions: list[str] = []
        self.in_transaction: list[bool] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_With(self, node: ast.With) -> None:
        opens = any("transaction(" in ast.unparse(item.context_expr) for item in node.items)
        self.in_transaction.append(opens)
        self.generic_visit(node)
        self.in_transaction.pop()

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("execute", "executemany") \
                and node.args and not any(self.in_transaction):
            sql = _sql(node.args[0])
            if sql and WRITE.match(sql):
                self.found.append((node.lineno, self.functions[0] if self.functions else "-",
                                   " ".join(sql.split())[:60]))
        self.generic_visit(node)


def writes_outside_transactions() -> list[str]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "pxe/dbbackend_pg.py":  # the stamp row itself, inside its transaction
                continue
            visitor = _Writes()
            visitor.visit(ast.parse(path.read_text(), rel))
            allowed = INSIDE_CALLERS_TRANSACTION.get(rel, set())
            out += [f"{rel}:{line} {func}: {sql}" for line, func, sql in visitor.found
                    if func not in allowed]
    return out


@pytest.mark.unit
def test_every_write_is_inside_a_transaction() -> None:
    assert writes_outside_transactions() == []


@pytest.mark.unit
def test_the_scan_finds_a_write_outside_a_transaction() -> None:
    visitor = _Writes()
    visitor.visit(ast.parse(
        "def beat(conn):\n"
        "    with db.transaction(conn, bookkeeping=True):\n"
        "        conn.execute('UPDATE servers SET heartbeat = ?', (1,))\n"
        "def rename(conn):\n"
        "    conn.execute(f'UPDATE nodes SET name = ? WHERE {where}', ('n2',))\n"
        "    conn.execute('SELECT 1')\n"))
    assert visitor.found == [(5, "rename", "UPDATE nodes SET name = ? WHERE {}")]
