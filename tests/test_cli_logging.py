"""pxe-stage configures logging only when something imports it (most commands never log), and a
command that logs still prints `pxe-stage: LEVEL: message` as when main configured it up front."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

# A command that imports logging only once it runs (as pxe.db does on an error), then logs.
SCRIPT = textwrap.dedent("""\
    import argparse, sys
    before = "logging" in sys.modules  # (a site's .pth file may have imported it)
    {preload}
    from pxe.cli import main as m

    def command(args):
        import logging
        logging.getLogger("dynprov.test").info("info %s", 1)
        logging.getLogger("dynprov.test").debug("debug %s", 2)
        return 0

    def quiet(args):
        return 0

    def build(argv):
        p = argparse.ArgumentParser(prog="pxe-stage")
        p.add_argument("-v", "--verbose", action="store_true")
        p.add_argument("which")
        p.set_defaults(func=lambda a: command(a) if a.which == "logs" else quiet(a))
        return p

    m.build_parser = build
    code = m.main(sys.argv[1:])
    print(before, "logging" in sys.modules, m._LoggingSetup in map(type, sys.meta_path))
    sys.exit(code)
    """)


def run(*argv: str, preload: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(preload=preload), *argv],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("preload", ["", "import logging"])
def test_a_command_that_logs_prints_as_configured(preload):
    proc = run("logs", preload=preload)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["pxe-stage: INFO: info 1"]
    verbose = run("-v", "logs", preload=preload)
    assert verbose.stderr.splitlines() == ["pxe-stage: INFO: info 1", "pxe-stage: DEBUG: debug 2"]
    assert verbose.stdout.split()[1:] == ["True", "False"]  # imported; the finder is gone


def test_a_command_that_does_not_log_never_imports_logging():
    proc = run("quiet")
    assert proc.returncode == 0, proc.stderr
    before, after, finder = proc.stdout.split()
    if before == "True":
        pytest.skip("this Python's start-up (a .pth file) imports logging itself")
    assert (after, finder) == ("False", "False")  # never imported; the finder removed after
