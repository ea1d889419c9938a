"""pxe.childproc: the DHCP daemon's check and reload started with posix_spawn (no subprocess
import on `set-boot --render`'s path), against real programs: exit status, output, timeouts,
what the child inherits."""

from __future__ import annotations

import os

import pytest

from pxe.childproc import OUTPUT_KEEP, Child

pytestmark = pytest.mark.integration


def test_exit_status_and_both_streams_in_the_order_written():
    status, output = Child(["sh", "-c", "echo out; echo err >&2; echo out2; exit 3"]).wait(30)
    assert (status, output) == (3, "out\nerr\nout2\n")


def test_a_signal_is_a_negative_status():
    status, _ = Child(["sh", "-c", "kill -TERM $$"]).wait(30)
    assert status == -15


def test_stdin_is_dev_null():
    assert Child(["cat"]).wait(30) == (0, "")


def test_a_missing_program_raises_and_leaks_no_descriptor():
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        Child(["/nonexistent/dhcpd-check", "-t"])
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_timeout_kills_and_reaps_the_child():
    before = len(os.listdir("/proc/self/fd"))
    child = Child(["sleep", "60"])
    pid = child.pid
    with pytest.raises(TimeoutError):
        child.wait(0.3)
    with pytest.raises(ChildProcessError):  # reaped: no longer our child
        os.waitpid(pid, os.WNOHANG)
    assert child.pid is None and len(os.listdir("/proc/self/fd")) == before


def test_kill_stops_a_running_child_and_is_idempotent():
    child = Child(["sleep", "60"])
    pid = child.pid
    child.kill()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert child.returncode == -9
    child.kill()  # again: nothing left to do
    with pytest.raises(RuntimeError):
        child.wait(1)


def test_only_the_last_output_is_kept():
    status, output = Child(["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a; echo END"]).wait(60)
    assert status == 0 and output.endswith("aEND\n") and len(output) <= OUTPUT_KEEP


def test_the_child_gets_sigpipe_back():
    """Python ignores SIGPIPE; a daemon started by us must not (subprocess restores it too)."""
    status, output = Child(["grep", "SigIgn", "/proc/self/status"]).wait(30)
    assert status == 0 and int(output.split()[1], 16) >> 12 & 1 == 0, output  # signal 13


def test_the_child_gets_no_descriptor_but_its_three():
    """Python's own descriptors are close-on-exec; one inherited open (from whatever started
    this process) is closed in the child too, as subprocess's close_fds does."""
    inherited = os.open(__file__, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    held = open(__file__, "rb")  # noqa: SIM115 - Python's own, held across the spawn
    try:
        status, output = Child(["ls", "/proc/self/fd"]).wait(30)
    finally:
        held.close()
        os.close(inherited)
    assert status == 0 and output.split() == ["0", "1", "2", "3"], output  # 3: ls's listing
