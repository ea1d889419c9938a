"""The run/node state machine (pxe/states.py): the steps it allows, its one writer, and the one
rule for "timed out" that writers (SQL) and readers (Python) share."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from pxe import db, states

pytestmark = pytest.mark.unit


def test_vocabulary_is_closed_and_final_states_are_dead_ends() -> None:
    assert set(states.TRANSITIONS) == set(states.RUN_STATES)
    assert not set(states.ACTIVE) & set(states.FINAL)
    for final in states.FINAL:
        assert states.TRANSITIONS[final] == frozenset()
    for step in states.ACTIVE:  # every active step can end every way but "from the past"
        assert {states.FAILED, states.TIMED_OUT, states.CANCELLED} <= states.TRANSITIONS[step]
        assert states.TRANSITIONS[step] <= set(states.RUN_STATES)


def test_steps_go_forward_only() -> None:
    order = list(states.ACTIVE)
    for i, old in enumerate(order):
        for new in order[:i + 1]:  # itself or an earlier step
            assert not states.allowed(old, new), (old, new)
        for new in order[i + 1:]:  # a report may overtake the driver's record
            assert states.allowed(old, new), (old, new)
    assert not states.allowed(states.READY, states.BOOTING)
    assert not states.allowed(states.TIMED_OUT, states.READY)  # a late ready: node only
    assert not states.allowed("nonsense", states.READY)


@pytest.mark.parametrize(("state", "deadline", "now", "shown"), [
    ("booting", 100.0, 99.9, "booting"),
    ("booting", 100.0, 100.0, "timed out"),  # the deadline itself is past
    ("installed", 100.0, 150.0, "timed out"),
    ("requested", None, 1e12, "requested"),  # no deadline, never overdue
    ("ready", 100.0, 150.0, "ready"),  # final states are what they are
    ("cancelled", 100.0, 150.0, "cancelled"),
])
def test_effective_state(state: str, deadline: float | None, now: float, shown: str) -> None:
    assert states.effective(state, deadline, now) == shown
    assert states.is_overdue(state, deadline, now) == (shown == "timed out" != state)


def _db(target: Path | str) -> sqlite3.Connection:
    conn = db.connect(target)  # the state_target fixture: SQLite, or PostgreSQL on that run
    conn.execute("INSERT INTO nodes(name, pool) VALUES ('n001', 'hpc')")
    conn.execute("INSERT INTO runs(label, mode, created) VALUES ('x', 'ondemand', 0)")
    conn.execute("INSERT INTO run_nodes(run_id, node, state, deadline, updated) "
                 "VALUES (1, 'n001', 'requested', 100.0, 0)")
    return conn


def test_sql_rule_matches_the_python_rule(state_target: Path | str) -> None:
    """Writers select overdue rows with overdue_sql; readers use is_overdue: same answer at,
    before and after the deadline, for every state."""
    conn = _db(state_target)
    for state in states.RUN_STATES:
        conn.execute("UPDATE run_nodes SET state = ?", (state,))
        for now in (99.0, 100.0, 101.0):
            hit = conn.execute(f"SELECT COUNT(*) FROM run_nodes rn WHERE "
                               f"{states.overdue_sql('rn')}", (now,)).fetchone()[0]
            assert bool(hit) == states.is_overdue(state, 100.0, now), (state, now)


def test_the_writer_moves_run_node_mirror_and_log_together(state_target: Path | str) -> None:
    conn = _db(state_target)
    with db.transaction(conn):
        assert states.transition(conn, 1, "n001", states.BOOTING, "", 5.0,
                                 node_fields={"state_reason": "initramfs up"})
    assert conn.execute("SELECT state, updated FROM run_nodes").fetchone()[:] == ("booting", 5.0)
    assert conn.execute("SELECT state, state_reason FROM nodes").fetchone()[:] == \
        ("booting", "initramfs up")
    assert conn.execute("SELECT kind FROM events").fetchall()[-1][0] == "run-booting"
    # going back is refused and changes nothing (no row, no mirror, no event)
    events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    with db.transaction(conn):
        assert not states.transition(conn, 1, "n001", states.POWER_CYCLED, "", 6.0)
    assert conn.execute("SELECT state FROM run_nodes").fetchone()[0] == "booting"
    assert conn.execute("SELECT state FROM nodes").fetchone()[0] == "booting"
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == events
    # ended: nothing moves it any more
    with db.transaction(conn):
        assert states.transition(conn, 1, "n001", states.READY, "", 7.0)
        assert not states.transition(conn, 1, "n001", states.FAILED, "late", 8.0)
    assert conn.execute("SELECT state FROM run_nodes").fetchone()[0] == "ready"


def test_the_writer_refuses_words_outside_the_vocabulary(state_target: Path | str) -> None:
    conn = _db(state_target)
    with pytest.raises(states.BadTransition):
        states.transition(conn, 1, "n001", "rebooting")
    with pytest.raises(states.BadTransition):
        states.set_node(conn, "n001", time.time(), state="sleeping")
    with pytest.raises(states.BadTransition):
        states.set_node(conn, "n001", time.time(), pool="cloud")  # not a state column
    assert conn.execute("SELECT state, pool FROM nodes").fetchone()[:] == ("unknown", "hpc")


def test_no_other_module_decides_timed_out() -> None:
    """The three places that derived "timed out" (the run, the Moab report, the status page)
    now ask pxe.states: no other code reading run_nodes compares a deadline with the clock."""
    import re

    from tests.conftest import ROOT

    pattern = re.compile(r"deadline\s*(<=|<|>=|>)\s*now|now\s*(<=|<|>=|>)\s*\S*deadline")
    found = []
    for path in [*(ROOT / "pxe").rglob("*.py"), *(ROOT / "msm_plugin").rglob("*.py")]:
        if path.name == "states.py" or "run_nodes" not in path.read_text():
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert found == []
