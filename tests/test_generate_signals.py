"""fg-image-generate stopped by SIGTERM (a batch limit, `timeout`) cleans up as on Ctrl-C: the
running customization script is killed, the work directory is removed, no bundle is written."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.test_generate_support import GENERATE, fake_kernel_root, tiny_container

pytestmark = pytest.mark.integration


@pytest.mark.skipif(os.geteuid() != 0, reason="customization scripts must be root's when run as root")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_build_leaves_nothing_behind(tmp_path, signum):
    image = tiny_container(tmp_path / "img.tar")
    kroot = fake_kernel_root(tmp_path / "k")
    started = tmp_path / "script-started"
    scripts = tmp_path / "customize" / "all"
    scripts.mkdir(parents=True)
    script = scripts / "10-slow"
    # The script marks its start, then runs far longer than the test waits (bounded: 60 s).
    script.write_text(f"#!/bin/sh\necho $$ > {started}\nexec sleep 60\n")
    script.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "DYNPROV_CONFIG": "/nonexistent/dynprov.toml"}
    proc = subprocess.Popen([*GENERATE, "-label", "sig", "-from-oci", str(image),
                             "-kernel-root", str(kroot), "-customize", str(tmp_path / "customize"),
                             "-output", str(out / "sig.bundle"), "-quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() or not started.read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the customization script never started"
            time.sleep(0.1)
        script_pid = int(started.read_text())
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err
    assert "nothing was written" in err
    assert list(out.iterdir()) == []  # no bundle, no work directory left beside the output
    for _ in range(50):  # the script was killed with the build (its process is gone)
        if not os.path.exists(f"/proc/{script_pid}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{script_pid}"), "the customization script outlived the build"
