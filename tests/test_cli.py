"""`pxe-stage` as a real process: exit codes, messages, and nothing changed on bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from pxe.inventory import Inventory

pytestmark = pytest.mark.integration


def add(site, name, mac, ip=None, *extra):
    argv = ["nodes", "add", name, "--mac", mac, *(["--ip", ip] if ip else []), *extra]
    return site.run(*argv)


def test_help_and_usage_errors(site):
    assert site.run("--help").returncode == 0
    for verb in ("nodes", "images", "set-boot", "render"):
        proc = site.run(verb, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout
    assert site.run("frobnicate").returncode == 2
    assert site.run("set-boot", "n001").returncode == 2  # needs --os or --local


def test_add_list_show_json(site):
    assert add(site, "n001", "AA-BB-CC-DD-EE-01", "198.18.0.11").returncode == 0
    assert add(site, "n002", "aabb.ccdd.ee02", None, "--firmware", "uefi").returncode == 0
    listed = json.loads(site.run("nodes", "list", "--json", check=True).stdout)
    assert [(n["name"], n["macs"]) for n in listed] == [("n001", ["aa:bb:cc:dd:ee:01"]),
                                                       ("n002", ["aa:bb:cc:dd:ee:02"])]
    assert "boot_token" not in listed[0]
    shown = json.loads(site.run("nodes", "show", "n002", "--json", check=True).stdout)
    assert shown[0]["firmware"] == "uefi" and shown[0]["boot_set"] is None
    # set-boot logs one event per command; each node shows when its boot was set.
    site.run("set-boot", "n002", "--local", check=True)
    shown = json.loads(site.run("nodes", "show", "n002", "--json", check=True).stdout)
    assert shown[0]["boot_set"] > 0
    assert re.search(r"^boot_set +\d", site.run("nodes", "show", "n002", check=True).stdout, re.M)
    table = site.run("nodes", "list", check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["NODE", "MAC", "IP"]


@pytest.mark.parametrize("argv,code,message", [
    (["nodes", "add", "n/01", "--mac", "52:54:00:00:00:09"], 2, "invalid node name"),
    (["nodes", "add", "n..1", "--mac", "52:54:00:00:00:09"], 2, "invalid node name"),
    (["nodes", "add", "n 1", "--mac", "52:54:00:00:00:09"], 2, "invalid node name"),
    (["nodes", "add", "{{x}}", "--mac", "52:54:00:00:00:09"], 2, "invalid node name"),
    (["nodes", "add", "n'1", "--mac", "52:54:00:00:00:09"], 2, "invalid node name"),
    (["nodes", "add", "n1\n", "--mac", "52:54:00:00:00:09"], 2, "invalid node name"),
    (["nodes", "add", "n009", "--mac", "52:54:00:00:00"], 2, "invalid MAC"),
    (["nodes", "add", "n009", "--mac", "52:54:00:00:00:01"], 2, "already belongs to node n001"),
    (["nodes", "add", "n009", "--mac", "52:54:00:00:00:09", "--ip", "198.18.0.11"], 2,
     "already belongs to node n001"),
    (["nodes", "add", "n009", "--mac", "52:54:00:00:00:09", "--ip", "10.1.1.1"], 2,
     "outside the subnet"),
    (["nodes", "add", "n009", "--mac", "52:54:00:00:00:09", "--ip", "198.18.0.999"], 2,
     "invalid IP"),
    (["nodes", "add", "n001", "--mac", "52:54:00:00:00:09"], 2, "already exists"),
    (["nodes", "show", "n404"], 1, "unknown node"),
    (["nodes", "remove", "n[001-003]"], 1, r"unknown node\(s\): n\[002-003\]"),
    (["set-boot", "n001", "--os", "nope"], 1, "unknown image label"),
    (["set-boot", "n404", "--os", "centos5"], 1, "unknown node"),
    (["images", "add", "bad/label", "--kernel", "KERNEL"], 2, "invalid label"),
    (["images", "add", "centos5", "--kernel", "/etc/hostname"], 2, "not a Linux kernel"),
    (["images", "rollback", "centos5"], 2, "has no version older than its current version 1"),
    (["images", "rollback", "centos5", "--version", "7"], 2, "has no version 7"),
    (["images", "rollback", "centos5", "--version", "x"], 2, "is not a version number"),
    (["images", "rollback", "nope"], 1, "unknown image label 'nope'"),
    (["images", "history", "nope"], 1, "unknown image label 'nope'"),
    (["images", "remove", "centos5", "--version", "1"], 2, "is the current version"),
    (["images", "add", "other", "--kernel", "/etc/hostname"], 2, "not a Linux kernel"),
    (["images", "add", "other", "--kernel", "/nonexistent"], 2, "no such file"),
    (["images", "remove", "nope"], 1, "unknown image"),
])
def test_bad_input_is_refused_and_nothing_changes(site, kernel, argv, code, message):
    assert add(site, "n001", "52:54:00:00:00:01", "198.18.0.11").returncode == 0
    site.run("images", "add", "centos5", "--kernel", str(kernel), check=True)
    before = site.snapshot()
    argv = [str(kernel) if a == "KERNEL" else a for a in argv]
    proc = site.run(*argv)
    assert proc.returncode == code, proc.stderr
    import re

    assert re.search(message, proc.stderr), proc.stderr
    assert proc.stderr.startswith("pxe-stage: ") and "Traceback" not in proc.stderr
    assert site.snapshot() == before


def test_import_all_or_nothing(site, tmp_path):
    bad = tmp_path / "nodes.yaml"
    bad.write_text(textwrap.dedent("""\
        nodes:
          - {name: n001, mac: "52:54:00:00:00:01"}
          - {name: n002, mac: "52:54:00:00:00:01"}
        """))
    site.run("nodes", "list", check=True)
    before = site.snapshot()
    proc = site.run("nodes", "import", str(bad))
    assert proc.returncode == 2 and "MAC 52:54:00:00:00:01 is given to both" in proc.stderr
    assert site.snapshot() == before


def test_two_set_boots_at_once_on_overlapping_nodes(site, kernel):
    # Loader configs as files (tftpd-hpa sites): the files must agree with the database.
    site.config_path.write_text(site.config_path.read_text() + "\n[boot]\nwrite_files = true\n")
    cfg = site.cfg
    lines = ["name,mac"] + [f"n{i:03d},52:54:00:00:01:{i:02x}" for i in range(1, 81)]
    (site.root / "nodes.csv").write_text("\n".join(lines) + "\n")
    site.run("nodes", "import", str(site.root / "nodes.csv"), check=True)
    site.run("images", "add", "centos5", "--kernel", str(kernel), check=True)
    site.run("images", "add", "sles11", "--kernel", str(kernel), "--cmdline", "quiet", check=True)
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "pxe.cli.main", "set-boot", spec, "--os", label],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for spec, label in (("n[001-060]", "centos5"), ("n[021-080]", "sles11"))]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for node in Inventory(cfg).all():
        text = (cfg.paths.tftp_root / f"pxelinux.cfg/01-{node.macs[0].replace(':', '-')}").read_text()
        # the file is complete and agrees with the database (both written under one lock)
        assert text.rstrip().endswith(f"dynprov.token={node.boot_token}")
        assert f"dynprov.image={node.desired_os}" in text
    assert {n.desired_os for n in Inventory(cfg).select("n[001-020]")} == {"centos5"}
    assert {n.desired_os for n in Inventory(cfg).select("n[061-080]")} == {"sles11"}


def test_process_killed_while_installing_keeps_old_config(site):
    """Kill a render between writing its temp file and the rename: the old config must survive."""
    assert add(site, "n001", "52:54:00:00:00:01", "198.18.0.11").returncode == 0
    site.run("render", check=True)
    conf = site.cfg.dhcp.config_file
    old = conf.read_text()
    assert add(site, "n002", "52:54:00:00:00:02", "198.18.0.12").returncode == 0
    script = textwrap.dedent(f"""
        import os, sys, time
        real_replace = os.replace
        def stuck_replace(src, dst):
            if str(dst) == {str(conf)!r}:
                print("about-to-rename", flush=True)
                time.sleep(60)
            return real_replace(src, dst)
        os.replace = stuck_replace
        from pxe.cli.main import main
        sys.exit(main(["render"]))
    """)
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "about-to-rename"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert conf.read_text() == old
    # the lock died with the process: the next render goes through and installs the new node
    site.run("render", check=True)
    assert "n002" in conf.read_text()
