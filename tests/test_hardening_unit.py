"""Issue 15 in-process checks: node-set size counted before expanding, the one exit handler of
every console script, config/import files read safely, YAML anchors refused."""

from __future__ import annotations

import io
import os
import tracemalloc
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from conftest import make_site

from pxe import config, inventory, nodeset
from pxe.cli import guard
from pxe.errors import InputError, NotFound

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("spec, size", [
    ("n001", 1), ("n[001-128]", 128), ("n[1-10/3]", 4), ("n[1-3,7,10-11]", 6),
    ("n[1-4]-[1-8]", 32), ("n[1-3]!n2", 4), ("n[1-3]&n[2-5]", 7), ("a,b,c", 3),
    ("n[1-100000000]", 100_000_000), ("r[1-1000]n[1-1000]", 1_000_000),
])
def test_count_is_arithmetic_upper_bound(spec, size):
    assert nodeset.count(spec) == size
    if size <= 1000:
        assert len(nodeset.expand(spec)) <= size


def test_huge_set_refused_without_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="more than 100000 nodes"):
            nodeset.expand("n[1-100000000]")
        with pytest.raises(InputError, match="more than 5 nodes"):
            nodeset.expand(["n[1-3]", "m[1-3]"], limit=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # bytes: nothing near 10^8 names was built


@pytest.mark.parametrize("spec, problem", [
    ("@all", "node groups"), ("n1;id", "';' is not allowed"), ("n\x00", "is not allowed"),
    ("n[1-2", "unbalanced"), ("n[[1]]", "unbalanced"), ("n[5-1]", "bad range"),
    ("n[1-9/0]", "bad range"), ("n[a-b]", "bad range"), ("n[1-" + "9" * 31 + "]", "bad range"),
    ("x" * 64, "at most 63 characters"), ("n" + "1" * 5000, "at most 63 characters"),
    ("-n1", "invalid node name"), ("", "empty node list"), ("a" * 200_000, "too long"),
])
def test_malformed_sets_are_input_errors(spec, problem):
    with pytest.raises(InputError, match=problem.replace("[", r"\[")):
        nodeset.expand(spec)


def test_cap_comes_from_the_config(tmp_path):
    site = make_site(tmp_path / "site")
    with open(site.config_path, "a") as fh:
        fh.write("\n[limits]\nmax_nodes = 10\n")
    cfg = site.cfg
    assert nodeset.max_nodes(cfg) == 10 and nodeset.max_nodes(None) == 100_000
    with pytest.raises(InputError, match="more than 10 nodes"):
        inventory.Inventory(cfg).select("n[1-11]")
    with pytest.raises(NotFound):  # within the cap: looked up (and unknown)
        inventory.Inventory(cfg).select("n[1-10]")


# -- the exit handler --------------------------------------------------------------------------
def _run(body, argv=(), **kw):
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        code = guard.run("prog", body, list(argv), **kw)
    return code, out.getvalue(), err.getvalue()


def _raise(exc):
    def body(argv):
        raise exc
    return body


@pytest.mark.parametrize("exc, code, text", [
    (InputError("bad\nthing"), 2, "prog: bad thing\n"),
    (NotFound("no such node"), 1, "prog: no such node\n"),
    (PermissionError(13, "Permission denied", "/var/lib/x.db"), 1,
     "prog: permission denied: /var/lib/x.db (run as root or through sudo)\n"),
    (IsADirectoryError(21, "Is a directory", "/etc"), 1, "prog: /etc: Is a directory\n"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2,
     "prog: input is not valid UTF-8 text"),
    (MemoryError(), 1, "prog: out of memory\n"),
    (ConnectionRefusedError(111, "Connection refused"), 1, "prog: Connection refused\n"),
    (KeyError("x"), 1, "prog: internal error: KeyError: 'x' (run again with --debug"),
    (KeyboardInterrupt(), 130, "prog: interrupted\n"),
])
def test_every_exception_ends_in_one_line(exc, code, text):
    got, out, err = _run(_raise(exc))
    assert got == code and out == "" and err.startswith(text) and err.count("\n") == 1


def test_sqlite_read_only_is_named():
    import sqlite3

    code, _, err = _run(_raise(sqlite3.OperationalError("attempt to write a readonly database")))
    assert code == 1 and "state database cannot be written by this user" in err


def test_debug_flag_is_stripped_and_prints_the_traceback():
    seen = []

    def body(argv):
        seen.append(argv)
        raise KeyError("x")

    code, _, err = _run(body, ["a", "--debug", "b", "--", "--debug"])
    assert seen == [["a", "b", "--", "--debug"]]
    assert code == 1 and "Traceback" in err and err.splitlines()[-1].startswith("prog: internal")


def test_usage_exit_codes_remap_prefix_and_stream():
    assert _run(_raise(SystemExit(2)))[0] == 2
    assert _run(_raise(SystemExit(None)))[0] == 0
    assert _run(lambda argv: 4, remap=lambda c: 1 if c == 4 else c)[0] == 1
    out = io.StringIO()
    with redirect_stderr(io.StringIO()):
        code = guard.run("node-power", _raise(InputError("nope")), [], prefix="ERROR: ",
                         stream=out)
    assert code == 2 and out.getvalue() == "ERROR: node-power: nope\n"


def test_messages_are_capped_and_escaped():
    line = guard.one_line("x" * 10_000 + "\x00\x1b[31m")
    assert len(line) <= guard.MAX_MESSAGE + 3 and "\x00" not in guard.one_line("a\x00b\x1b")


# -- files: config and node lists ------------------------------------------------------------
def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, problem in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                          (tmp_path, "is a directory")):
        with pytest.raises(InputError, match=problem):
            config.load(path)


def test_config_text_checks(tmp_path):
    site = make_site(tmp_path / "site")
    text = site.config_path.read_bytes()
    for data, problem in ((text + b"\n#\xe9\n", "not UTF-8 text .bad byte at line"),
                          (text + b"\x00", "binary"),
                          (text + b"#" * (config.MAX_CONFIG_BYTES + 1), "too large")):
        site.config_path.write_bytes(data)
        with pytest.raises(InputError, match=problem):
            config.load(site.config_path)


def test_node_list_symlink_and_size_cap(tmp_path):
    site = make_site(tmp_path / "site")
    with open(site.config_path, "a") as fh:
        fh.write("\n[limits]\nimport_max_bytes = 1024\n")
    cfg = site.cfg
    real = tmp_path / "real.csv"
    real.write_text("name,mac\nn1,52:54:00:00:00:01\n")
    (tmp_path / "link.csv").symlink_to(real)
    assert [n.name for n in inventory.load_file(cfg, str(real))] == ["n1"]
    with pytest.raises(InputError, match="symbolic link"):
        inventory.load_file(cfg, str(tmp_path / "link.csv"))
    real.write_text("name,mac\n" + "#" * 2000)
    with pytest.raises(InputError, match="too large"):
        inventory.load_file(cfg, str(real))


@pytest.mark.parametrize("text, problem", [
    ("a: &a [1]\nnodes: *a\n", "anchors"),
    ("nodes:\n- &n {name: n1, mac: '52:54:00:00:00:01'}\n", "anchors"),
    ("nodes: [*undefined]\n", "aliases"),
    ("n1: 5\n", "must be a mapping of fields"),
])
def test_yaml_anchors_aliases_and_scalars_refused(text, problem):
    with pytest.raises(InputError, match=problem):
        inventory.parse_yaml(text)


def test_plain_yaml_still_reads():
    rows = inventory.parse_yaml("n1: {mac: '52:54:00:00:00:01'}\nn2:\n")
    assert [r["name"] for r in rows] == ["n1", "n2"]
