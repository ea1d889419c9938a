"""Console logging: `pxe-stage console NODE --log` against a virtual BMC on 127.0.0.1 whose SOL
carries a serial file the test writes to (the QEMU lab follows a VM's serial log the same way);
the log file itself (rotation, timestamps, cleaning, one writer) with real files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_power_support import PASSWORD, USER, power_config, vbmc

from lab.vbmc import Faults
from pxe import console_log
from pxe.console_log import ConsoleLog, LogBusy


def _ipmi_node(site, name: str, mac: str, port: int) -> None:
    site.run("nodes", "add", name, "--mac", mac, "--bmc-type", "ipmi", "--bmc-address",
             "127.0.0.1", "--bmc-port", str(port), "--bmc-user", USER, check=True)


def _console_config(site, **keys: int | float) -> None:
    with open(site.config_path, "a") as fh:
        fh.write("\n[console]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))


def _start_logging(site, node: str, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pxe.cli.main", "console", node, "--log", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DYNPROV_CONFIG": str(site.config_path)})


def _wait_for(path: Path, text: str, timeout: float = 60.0, count: int = 1) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = "".join(p.read_text(errors="replace")
                          for p in [*path.parent.glob(f"{path.name}.*"), path]
                          if p.exists() and not p.name.endswith(".lock"))
        if content.count(text) >= count:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} x{count} not in {path} within {timeout} s:\n{content[-2000:]}")


@pytest.mark.integration
def test_console_log_follows_sol_rotates_and_keeps_no_secret(site, tmp_path: Path):
    power_config(site)
    _console_config(site, max_bytes=4096, rotations=2)
    serial = tmp_path / "serial"
    serial.mkdir()
    with vbmc(tmp_path, "r1", 1, serial_dir=serial) as bmc:
        _ipmi_node(site, "r1", "52:54:00:51:00:01", bmc.base_port)
        log = console_log.log_path(site.cfg.paths.state_dir, "r1")
        proc = _start_logging(site, "r1", "--seconds", "25")
        try:
            _wait_for(log, "SOL session open")
            with open(serial / "r1.log", "ab") as fh:  # the node's serial port writes
                for i in range(400):
                    fh.write(f"\x1b[1;32mboot line {i:03d}\x1b[0m of the node\r\n".encode())
                    if i % 100 == 99:
                        fh.flush()
                        time.sleep(0.3)
                fh.write(b"login: ")  # a prompt without a newline is written after 1 s
            content = _wait_for(log, "login:", timeout=60)
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "1 SOL session(s)" in err
    files = console_log.files_of(site.cfg.paths.state_dir, "r1")
    assert [p.name for p in files] == ["r1.log.2", "r1.log.1", "r1.log"]
    for p in files:
        assert p.stat().st_size <= 4096, p
        assert p.stat().st_mode & 0o777 == 0o640, oct(p.stat().st_mode)
    assert "boot line 399 of the node" in content
    assert "boot line 000" not in content  # rotated away: the log is bounded
    assert "\x1b" not in content and "\r" not in content
    for line in (ln for p in files for ln in p.read_text().splitlines()):
        assert console_log._STAMP.match(line), line
    assert PASSWORD not in content and PASSWORD not in out + err


@pytest.mark.integration
def test_console_log_reconnects_after_the_bmc_closes_the_session(site, tmp_path: Path):
    power_config(site)
    serial = tmp_path / "serial"
    serial.mkdir()
    with vbmc(tmp_path, "k1", 1, serial_dir=serial, faults=Faults(sol_close_after=3.0)) as bmc:
        _ipmi_node(site, "k1", "52:54:00:51:00:02", bmc.base_port)
        log = console_log.log_path(site.cfg.paths.state_dir, "k1")
        proc = _start_logging(site, "k1", "--seconds", "40")
        try:
            _wait_for(log, "SOL session open")
            _wait_for(log, "the BMC closed the SOL session", timeout=30)
            _wait_for(log, "SOL session open", timeout=30, count=2)
            with open(serial / "k1.log", "ab") as fh:
                fh.write(b"written after the reconnect\n")
            content = _wait_for(log, "written after the reconnect", timeout=30)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        closed = [e for e in bmc.events() if e["event"] == "console-closed"]
    assert proc.returncode == 0, err
    assert closed, "the vBMC never closed a session"
    assert "reconnecting in 1 s" in content


@pytest.mark.integration
def test_console_log_refuses_unknown_and_non_ipmi_nodes_and_gives_up_when_told(site, tmp_path):
    power_config(site)
    site.run("nodes", "add", "w1", "--mac", "52:54:00:51:00:03", "--bmc-type", "wol",
             check=True)
    state = site.cfg.paths.state_dir
    wol = site.run("console", "w1", "--log", "--seconds", "5")
    assert wol.returncode == 1 and "needs an IPMI BMC (serial over LAN)" in wol.stderr
    unknown = site.run("console", "nosuch", "--log", "--seconds", "5")
    assert unknown.returncode == 1 and "nosuch" in unknown.stderr
    bad = site.run("console", "w1", "--attempts", "2")
    assert bad.returncode == 2 and "only with --log" in bad.stderr
    assert not (state / "console").exists() or not list((state / "console").glob("*.log"))
    # A BMC that never answers: one attempt (pyghmi gives a login ~20 s), then exit 1 with the
    # reason, in the log too.
    from test_power_support import dead_udp_ports

    _ipmi_node(site, "d1", "52:54:00:51:00:04", dead_udp_ports(1)[0])
    gone = site.run("console", "d1", "--log", "--attempts", "1", "--seconds", "120")
    assert gone.returncode == 1, gone.stderr
    assert "0 SOL session(s) in 1 attempt(s)" in gone.stderr
    text = console_log.log_path(state, "d1").read_text()
    assert "giving up after 1 attempt(s)" in text


# -- the log file itself ---------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.unit
def test_a_line_of_the_millisecond_a_window_starts_is_in_it(tmp_path: Path):
    """Lines are stamped to the millisecond (floored): one written 0.2 ms after a run's start
    reads as 0.7 ms before it, and still belongs to the run (a CI run lost both lines of
    test_run_show_prints_the_console_lines_of_the_run this way)."""
    start = 1_800_000_000.5127
    with ConsoleLog(console_log.log_path(tmp_path, "n1"), clock=Clock(start + 0.0002)) as log:
        log.feed(b"same millisecond\n")
    with ConsoleLog(console_log.log_path(tmp_path, "n1"), clock=Clock(start - 0.0008)) as log:
        log.feed(b"the millisecond before\n")
    texts = [ln.text for ln in console_log.between(tmp_path, "n1", start, start + 1)]
    assert texts == ["same millisecond"]  # the one of the millisecond before is not
    texts = [ln.text for ln in console_log.between(tmp_path, "n1", start - 1, start - 0.001)]
    assert texts == ["the millisecond before"]


@pytest.mark.unit
def test_log_lines_are_stamped_cleaned_and_found_by_time(tmp_path: Path):
    clock = Clock()
    path = console_log.log_path(tmp_path, "n1")
    with ConsoleLog(path, clock=clock) as log:
        log.feed(b"\x1b[2J\x1b[01;01HSeaBIOS (version 1.16)\r\n")
        clock.t += 10
        log.feed(b"Linux version 6.1\r\nhalf a li")
        clock.t += 0.5
        log.flush_partial()  # not idle long enough yet
        clock.t += 1
        log.flush_partial()
        clock.t += 10
        log.note("SOL session ended: x")
    lines = path.read_text().splitlines()
    assert lines[0].endswith("Z SeaBIOS (version 1.16)")
    assert [ln.split(" ", 1)[1] for ln in lines] == [
        "SeaBIOS (version 1.16)", "Linux version 6.1", "half a li",
        "-- dynprov: SOL session ended: x"]
    found = console_log.between(tmp_path, "n1", 1_800_000_005.0, 1_800_000_012.0)
    assert [(ln.text, ln.line) for ln in found] == [("Linux version 6.1", 2), ("half a li", 3)]
    assert found[0].ts == 1_800_000_010.0 and found[0].file == str(path)


@pytest.mark.unit
def test_log_rotation_keeps_n_files_and_one_writer(tmp_path: Path):
    path = console_log.log_path(tmp_path, "n2")
    with ConsoleLog(path, max_bytes=4096, rotations=2, clock=Clock()) as log:
        with pytest.raises(LogBusy, match="another process already logs"):
            ConsoleLog(path)
        for i in range(600):
            log.feed(f"line {i:04d}\n".encode())
    files = console_log.files_of(tmp_path, "n2")
    assert [p.name for p in files] == ["n2.log.2", "n2.log.1", "n2.log"]
    assert all(p.stat().st_size <= 4096 for p in files)
    texts = [ln.text for ln in console_log.between(tmp_path, "n2", 0, 2e9)]
    assert texts[-1] == "line 0599" and "line 0000" not in texts
    assert texts == sorted(texts)  # oldest file first, in order
    with pytest.raises(Exception, match="invalid node name"):
        console_log.log_path(tmp_path, "../etc")


@pytest.mark.integration
def test_run_show_prints_the_console_lines_of_the_run(site, tmp_path: Path):
    import json

    from test_power_support import add_nodes
    from test_run_support import add_images, configure, driver_held

    from pxe import db, run

    cfg = configure(site)
    add_images(cfg, tmp_path, centos5={})
    add_nodes(cfg, [{"name": "c1", "mac": "52:54:00:51:00:05"}])
    state = cfg.paths.state_dir
    before = Clock(time.time() - 600)
    with ConsoleLog(console_log.log_path(state, "c1"), clock=before) as log:
        log.feed(b"an older boot, not this run\n")
    conn = db.connect(cfg.database)
    # The driver held throughout: the node stays 'requested', so its window runs to now (a
    # driver started in between would end the node's steps, and its window 5 s after them).
    with driver_held(cfg):
        req = run.request(cfg, conn, ["c1"], "centos5")
        conn.close()
        with ConsoleLog(console_log.log_path(state, "c1")) as log:
            log.feed(b"Linux version 6.1.0 (this run)\n[dynprov] fetching rootfs\n")
        out = site.run("run", "show", str(req.run_id), check=True).stdout
        pointer = site.run("run", "show", str(req.run_id), "--console-lines", "0",
                           check=True).stdout
        data = json.loads(site.run("run", "show", str(req.run_id), "--json", check=True).stdout)
    assert "console: 2 lines in this run (" in out and "c1.log lines 2-3" in out, out
    assert "| Linux version 6.1.0 (this run)" in out and "| [dynprov] fetching rootfs" in out
    assert "an older boot" not in out
    assert "c1.log lines 2-3" in pointer and "Linux version" not in pointer
    console = data["nodes"][0]["console"]
    assert console["count"] == 2 and console["files"][0]["first_line"] == 2
    assert [ln["text"] for ln in console["lines"]] == ["Linux version 6.1.0 (this run)",
                                                       "[dynprov] fetching rootfs"]
    bad = site.run("run", "show", str(req.run_id), "--console-lines", "-1")
    assert bad.returncode == 2 and "--console-lines" in bad.stderr


@pytest.mark.integration
def test_serve_keeps_one_logger_per_ipmi_node_and_stops_them(site, tmp_path: Path):
    from test_serve_support import children_of, serve_process, wait_for

    from pxe.serve import settings as serve_settings

    power_config(site)
    _console_config(site, max_sessions=2, rescan_seconds=1)
    serial = tmp_path / "serial"
    serial.mkdir()
    state = site.cfg.paths.state_dir
    with vbmc(tmp_path, "f[1-3]", 3, serial_dir=serial) as bmc:
        for i in range(3):
            _ipmi_node(site, f"f{i + 1}", f"52:54:00:51:01:0{i + 1}", bmc.base_port + i)
        site.run("nodes", "add", "fw", "--mac", "52:54:00:51:01:09", "--bmc-type", "wol",
                 check=True)
        with serve_process(site, "--console-log") as server:
            logs = {n: console_log.log_path(state, n) for n in ("f1", "f2")}
            for path in logs.values():
                _wait_for(path, "SOL session open", timeout=90)
            with open(serial / "f2.log", "ab") as fh:
                fh.write(b"[dynprov] f2 calls home\n")
            _wait_for(logs["f2"], "[dynprov] f2 calls home", timeout=30)
            loggers = [pid for pid in children_of(server.proc.pid)
                       if b"--log" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            argv = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in loggers]
            assert sorted(a[a.index(b"console") + 1] for a in argv) == [b"f1", b"f2"]
            assert all(PASSWORD.encode() not in b"".join(a) for a in argv)
            # The inventory changes while serve runs: f1 removed -> its logger stops, and the
            # place it leaves under max_sessions goes to f3.
            f1_pid = next(pid for pid, a in zip(loggers, argv, strict=True) if b"f1" in a)
            site.run("nodes", "remove", "f1", check=True)
            _wait_for(console_log.log_path(state, "f3"), "SOL session open", timeout=60)
            wait_for(lambda: not Path(f"/proc/{f1_pid}").exists(), "f1's logger stopped",
                     timeout=30)
            loggers = [pid for pid in children_of(server.proc.pid)
                       if b"--log" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        # stopped with serve (SIGTERM to each logger, by PID)
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in loggers),
                 "loggers stopped", timeout=15)
        text = server.log.read_text()
    assert "console.max_sessions is 2: f3 not logged" in text
    assert "no IPMI BMC (or no valid address): fw" in text
    assert "console logging: f1 stopped" in text and "console logging: f3 started" in text
    assert PASSWORD not in text
    assert serve_settings.load(site.cfg).http  # the [serve] section is untouched by [console]
    check = site.run("serve", "--check", "--console-log", check=True).stdout
    assert "console.log = True" in check and "console.max_sessions = 2" in check
    with open(site.config_path, "a") as fh:
        fh.write("bogus = 1\n")  # lands in [serve]: serve still checks its own keys
    assert site.run("serve", "--check").returncode == 2


@pytest.mark.unit
@pytest.mark.parametrize("key,value", [("log", '"yes"'), ("max_sessions", 0),
                                       ("max_bytes", 100), ("rotations", -1),
                                       ("backoff_max", 0), ("rescan_seconds", 0.5),
                                       ("bogus", 1)])
def test_console_settings_name_the_bad_key(site, key, value):
    _console_config(site, **{key: value})
    proc = site.run("serve", "--check")
    assert proc.returncode == 2 and f"console.{key}" in proc.stderr
