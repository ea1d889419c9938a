"""The project's bad-input suite (issue 15): hostile input through the REAL console scripts and the
REST service, as a new user, a careless admin and an attacker would type it.

Every case checks the refusal: the message (one line, never a traceback), the exit code (0 ok,
1 failed, 2 bad input; HTTP 4xx) and that nothing stored changed (Site.snapshot(): every file of
the site, the database by its SQL dump). Image uploads and `images add` are in
tests/test_bad_input_images.py.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import Site, fake_bzimage, make_site
from test_api_support import api_site, running_server
from unprivileged_support import readable_tempdir, run_as, staged_code, user_wrap

from pxe.inventory import Inventory, build

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"pxe-stage": "pxe.cli.main", "os-switch": "msm_plugin.os_switch",
           "cluster-query": "msm_plugin.cluster_query", "node-power": "msm_plugin.node_power",
           "fg-moab": "msm_plugin.fg_moab", "fg-pool": "pxe.cli.fg_pool",
           "fg-moab-image": "msm_plugin.fg_moab_image", "fg-moab-group": "msm_plugin.fg_moab_group",
           "fg-image-generate": "pxe.cli.fg_image_generate",
           # The Slurm face: one module, the dynprov-slurm-<verb> scripts are its verbs.
           "dynprov-slurm": "slurm_plugin.cli", "dynprov-slurm-helper": "slurm_plugin.cli",
           "dynprov-slurm-reboot": "slurm_plugin.cli", "dynprov-slurm-resume": "slurm_plugin.cli",
           "dynprov-slurm-suspend": "slurm_plugin.cli",
           "dynprov-lab": "lab.cli"}
HUGE_SET = "n[1-100000000]"
LONG = "a" * 130_000  # just under the kernel's limit for one argument (MAX_ARG_STRLEN)
CAP_MESSAGE = "node set names more than 100000 nodes"


@dataclass
class Bench:
    site: Site
    inputs: Path  # hostile files, outside the site (the snapshot covers the site)


def _node(cfg, name: str, mac: str, ip: str | None = None):
    return build(cfg, {"name": name, "macs": [mac], **({"ip": ip} if ip else {})})


def _populate(site: Site) -> None:
    cfg = site.cfg
    Inventory(cfg).add([_node(cfg, "n001", "52:54:00:00:00:01", "198.18.0.11"),
                        _node(cfg, "n002", "52:54:00:00:00:02", "198.18.0.12")])
    assert site.run("-create", "cloud", cmd="fg-pool").returncode == 0
    kernel = fake_bzimage(site.root.parent / "vmlinuz")
    assert site.run("images", "add", "base", "--kernel", str(kernel)).returncode == 0, \
        site.run("images", "list").stderr


def _hostile_files(inputs: Path, site: Site) -> None:
    inputs.mkdir(parents=True, exist_ok=True)
    os.mkfifo(inputs / "fifo")
    os.mkfifo(inputs / "fifo.yaml")
    (inputs / "dir.toml").mkdir()
    (inputs / "binary.toml").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    (inputs / "latin1.toml").write_bytes(site.config_path.read_bytes() + b"\n# caf\xe9\n")
    good = site.config_path.read_text()
    (inputs / "types.toml").write_text(good.replace('[paths]', '[boot]\nhttp_port = "80"\n[paths]'))
    (inputs / "port.toml").write_text(good.replace('[paths]', '[boot]\nhttp_port = 99999\n[paths]'))
    (inputs / "argv.toml").write_text(good.replace('reload_command = ["/bin/true"]',
                                                   'reload_command = "/bin/true; rm -rf /"'))
    (inputs / "unknown.toml").write_text(good + "\n[paths2]\nx = 1\n")
    (inputs / "open-section.toml").write_text("power = 3\n" + good)
    (inputs / "badcap.toml").write_text(good + "\n[limits]\nmax_nodes = -1\n")
    (inputs / "not-toml.toml").write_text("[network\ninterface = \n")
    (inputs / "dup-mac.csv").write_text("name,mac\nn010,52:54:00:00:00:10\nn011,52:54:00:00:00:10\n")
    (inputs / "taken-mac.csv").write_text("name,mac\nn010,52:54:00:00:00:01\n")
    (inputs / "latin1.csv").write_bytes(b"name,mac\nn\xe9,52:54:00:00:00:10\n")
    (inputs / "extra-field.csv").write_text("name,mac\nn010,52:54:00:00:00:10,oops\n")
    (inputs / "no-header.csv").write_text("n010,52:54:00:00:00:10\n")
    (inputs / "huge-field.csv").write_text("name,mac\nn010," + "a" * 200_000 + "\n")
    (inputs / "shell.csv").write_text("name,mac\n$(reboot),52:54:00:00:00:10\n")
    (inputs / "bomb.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
        "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
        "i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]\nnodes: [*i]\n")
    (inputs / "scalars.yaml").write_text("n010: 52:54:00:00:00:10\nn011: x\n")
    (inputs / "python.yaml").write_text('!!python/object/apply:os.system ["id > /tmp/pwned"]\n')
    (inputs / "int-keys.yaml").write_text("- name: n010\n  mac: 52:54:00:00:00:10\n  7: 8\n")
    (inputs / "bad.yaml").write_text("- name: n010\n  mac: [unclosed\n")
    (inputs / "real.yaml").write_text("- name: n010\n  mac: 52:54:00:00:00:10\n")
    (inputs / "link.yaml").symlink_to(inputs / "real.yaml")
    (inputs / "big.csv").write_bytes(b"name,mac\n" + b"#" * (65 << 20))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    base = tmp_path_factory.mktemp("badinput")
    site = make_site(base / "site")
    _populate(site)
    _hostile_files(base / "inputs", site)
    return Bench(site, base / "inputs")


# (id, command, argv, exit code, expected text; {in} = the hostile-inputs dir, {cfg} = the config)
CASES: list[tuple[str, str, tuple[str, ...], int, str]] = [
    # -- node sets: too many, malformed, hostile characters --------------------------------
    ("set-huge-nodes-list", "pxe-stage", ("nodes", "list", HUGE_SET), 2, CAP_MESSAGE),
    ("set-huge-nodes-remove", "pxe-stage", ("nodes", "remove", HUGE_SET), 2, CAP_MESSAGE),
    ("set-huge-set-boot", "pxe-stage", ("set-boot", HUGE_SET, "--local"), 2, CAP_MESSAGE),
    ("set-huge-power", "pxe-stage", ("power", "status", HUGE_SET), 2, CAP_MESSAGE),
    ("set-huge-os-switch", "os-switch", (HUGE_SET, "--set", "OS=base"), 2, CAP_MESSAGE),
    ("set-huge-os-switch-clear", "os-switch", (HUGE_SET, "--clear", "OS"), 2, CAP_MESSAGE),
    ("set-huge-node-power", "node-power", (HUGE_SET, "ON"), 2, CAP_MESSAGE),
    ("set-huge-fg-pool", "fg-pool", ("-to", "cloud", "-resource", HUGE_SET), 2, CAP_MESSAGE),
    ("set-huge-fg-moab-used", "fg-moab", ("-used", HUGE_SET), 2, CAP_MESSAGE),
    ("set-huge-2d", "pxe-stage", ("nodes", "list", "n[1-1000]-[1-1000]"), 2, CAP_MESSAGE),
    ("set-huge-bound", "pxe-stage", ("nodes", "list", "n[1-" + "9" * 40 + "]"), 2, "bad range"),
    ("set-group-ref", "pxe-stage", ("nodes", "list", "n001,@all"), 2, "node groups (@name)"),
    ("set-shell-meta", "os-switch", ("n001;reboot", "--set", "OS=base"), 2,
     "character ';' is not allowed"),
    ("set-unicode-digit", "pxe-stage", ("nodes", "list", "n\u0663"), 2, "is not allowed"),
    ("set-reversed-range", "fg-pool", ("-to", "cloud", "-resource", "n[9-1]"), 2, "bad range"),
    ("set-unbalanced", "node-power", ("n[1-2", "OFF"), 2, "unbalanced brackets"),
    ("set-empty", "os-switch", ("", "--set", "OS=base"), 2, "empty node list"),
    ("set-long-name", "pxe-stage", ("nodes", "remove", LONG), 2, "at most 63 characters"),
    ("set-long-digits", "pxe-stage", ("nodes", "list", "n" + "1" * 130_000), 2,
     "at most 63 characters"),
    # -- node records ------------------------------------------------------------------------
    ("add-shell-name", "pxe-stage", ("nodes", "add", "n1;rm -rf /", "--mac", "52:54:00:00:00:10"),
     2, "invalid node name"),
    ("add-long-name", "pxe-stage", ("nodes", "add", LONG, "--mac", "52:54:00:00:00:10"), 2,
     "invalid node name"),
    ("add-broadcast-mac", "pxe-stage", ("nodes", "add", "n010", "--mac", "ff:ff:ff:ff:ff:ff"), 2,
     "multicast/broadcast"),
    ("add-short-mac", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:10"), 2,
     "invalid MAC address"),
    ("add-mac-newline", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10\nx"), 2,
     "invalid MAC address"),
    ("add-taken-mac", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:01"), 2,
     "already belongs to node n001"),
    ("add-ip-outside", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10", "--ip",
                                     "10.0.0.1"), 2, "outside the subnet"),
    ("add-ip-server", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10", "--ip",
                                    "198.18.0.1"), 2, "network, broadcast or server address"),
    ("add-ip-octal", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10", "--ip",
                                   "198.18.0.011"), 2, "invalid IP address"),
    ("add-ip-dynamic", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10", "--ip",
                                     "198.18.0.150"), 2, "inside the dynamic range"),
    ("add-bmc-address-shell", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10",
                                            "--bmc-type", "ipmi", "--bmc-address", "1.2.3.4;id"),
     2, "invalid BMC address"),
    ("add-bmc-port", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10",
                                   "--bmc-port", "99999"), 2, "invalid BMC port"),
    ("add-secret-path", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10",
                                      "--bmc-secret", "../../etc/shadow"), 2,
     "invalid BMC secret reference"),
    # -- nodes import --------------------------------------------------------------------------
    ("import-fifo", "pxe-stage", ("nodes", "import", "{in}/fifo", "--format", "csv"), 2,
     "is not a regular file"),
    ("import-fifo-yaml", "pxe-stage", ("nodes", "import", "{in}/fifo.yaml"), 2,
     "is not a regular file"),
    ("import-device", "pxe-stage", ("nodes", "import", "/dev/zero", "--format", "csv"), 2,
     "is not a regular file"),
    ("import-directory", "pxe-stage", ("nodes", "import", "{in}"), 2, "is a directory"),
    ("import-symlink", "pxe-stage", ("nodes", "import", "{in}/link.yaml"), 2, "symbolic link"),
    ("import-missing", "pxe-stage", ("nodes", "import", "{in}/nothing.csv"), 2, "not found"),
    ("import-too-big", "pxe-stage", ("nodes", "import", "{in}/big.csv"), 2, "too large"),
    ("import-yaml-bomb", "pxe-stage", ("nodes", "import", "{in}/bomb.yaml"), 2,
     "anchors (&name) are not allowed"),
    ("import-yaml-scalars", "pxe-stage", ("nodes", "import", "{in}/scalars.yaml"), 2,
     "must be a mapping of fields"),
    ("import-yaml-python-tag", "pxe-stage", ("nodes", "import", "{in}/python.yaml"), 2,
     "could not determine a constructor"),
    ("import-yaml-int-keys", "pxe-stage", ("nodes", "import", "{in}/int-keys.yaml"), 2,
     "unknown node field(s): 7"),
    ("import-yaml-syntax", "pxe-stage", ("nodes", "import", "{in}/bad.yaml"), 2, "YAML node list"),
    ("import-csv-dup-mac", "pxe-stage", ("nodes", "import", "{in}/dup-mac.csv"), 2,
     "is given to both n010 and n011"),
    ("import-csv-taken-mac", "pxe-stage", ("nodes", "import", "{in}/taken-mac.csv"), 2,
     "already belongs to node n001"),
    ("import-csv-latin1", "pxe-stage", ("nodes", "import", "{in}/latin1.csv"), 2,
     "is not UTF-8 text"),
    ("import-csv-extra-field", "pxe-stage", ("nodes", "import", "{in}/extra-field.csv"), 2,
     "more fields than the header"),
    ("import-csv-no-header", "pxe-stage", ("nodes", "import", "{in}/no-header.csv"), 2,
     "needs a header row"),
    ("import-csv-huge-field", "pxe-stage", ("nodes", "import", "{in}/huge-field.csv"), 2,
     "field larger than field limit"),
    ("import-csv-shell-name", "pxe-stage", ("nodes", "import", "{in}/shell.csv"), 2,
     "invalid node name"),
    # -- the configuration file ----------------------------------------------------------------
    ("config-directory", "pxe-stage", ("--config", "{in}/dir.toml", "nodes", "list"), 2,
     "configuration file is a directory"),
    ("config-fifo", "os-switch", ("n001", "--set", "OS=base", "--config", "{in}/fifo"), 2,
     "configuration file is not a regular file"),
    ("config-device", "node-power", ("n001", "ON", "--config", "/dev/zero"), 2,
     "configuration file is not a regular file"),
    ("config-binary", "fg-pool", ("--config", "{in}/binary.toml", "-list"), 2,
     "contains NUL bytes"),
    ("config-latin1", "fg-moab", ("--site-config", "{in}/latin1.toml", "-used", "n001"), 2,
     "is not UTF-8 text"),
    ("config-missing", "pxe-stage", ("--config", "{in}/nothing.toml", "nodes", "list"), 2,
     "configuration file not found"),
    ("config-not-toml", "pxe-stage", ("--config", "{in}/not-toml.toml", "render", "--check"), 2,
     "not valid TOML"),
    ("config-string-port", "pxe-stage", ("--config", "{in}/types.toml", "nodes", "list"), 2,
     "boot.http_port: must be an integer, got '80'"),
    ("config-port-range", "pxe-stage", ("--config", "{in}/port.toml", "nodes", "list"), 2,
     "boot.http_port: must be between 1 and 65535"),
    ("config-shell-string", "pxe-stage", ("--config", "{in}/argv.toml", "render", "--check"), 2,
     "dhcp.reload_command: must be a list"),
    ("config-unknown-section", "pxe-stage", ("--config", "{in}/unknown.toml", "nodes", "list"), 2,
     "paths2: unknown section"),
    ("config-open-section-scalar", "fg-pool", ("--config", "{in}/open-section.toml", "-list"), 2,
     "[power]: must be a table"),
    ("config-negative-cap", "pxe-stage", ("--config", "{in}/badcap.toml", "nodes", "list"), 2,
     "limits.max_nodes: must be between 1"),
    ("cluster-query-fifo", "cluster-query", ("--config", "{in}/fifo"), 0,
     "# cluster-query: cannot read the configuration:"),
    # -- the Moab face and pools -------------------------------------------------------------
    ("os-switch-two-actions", "os-switch", ("n001", "--set", "OS=base", "--set", "POWER=on"), 2,
     "give exactly one"),
    ("os-switch-label-shell", "os-switch", ("n001", "--set", "OS=$(reboot)"), 2,
     "invalid OS label"),
    ("os-switch-label-nul", "os-switch", ("n001", "--set", "OS=ba\x01se"), 2, "invalid OS label"),
    ("os-switch-unknown-label", "os-switch", ("n001", "--set", "OS=nosuch"), 1,
     "n001: unknown OS label 'nosuch'"),
    ("os-switch-unknown-node", "os-switch", ("n999", "--set", "OS=base"), 1, "n999"),
    ("node-power-verb", "node-power", ("n001", "EXPLODE"), 2, "ERROR: node-power: unknown power verb"),
    ("fg-moab-job-shell", "fg-moab", ("-used", "n001", "-job", "1;reboot"), 2, "invalid job id"),
    ("fg-moab-mode", "fg-moab", ("-mode", "sometimes"), 2, "invalid mode"),
    ("fg-pool-traversal", "fg-pool", ("-create", "../etc"), 2, "invalid pool name"),
    ("fg-pool-long", "fg-pool", ("-create", LONG), 2, "invalid pool name"),
    ("fg-pool-scheduler", "fg-pool", ("-delete", "hpc"), 1, "is the scheduler's pool"),
    ("fg-pool-unknown-node", "fg-pool", ("-to", "cloud", "-resource", "n999"), 1,
     "unknown node(s): n999"),
    ("set-boot-label-traversal", "pxe-stage", ("set-boot", "n001", "--os", "../../etc"), 2,
     "invalid"),
    ("power-bad-timeout", "pxe-stage", ("power", "status", "n001", "--timeout", "-1"), 2,
     "power.timeout"),
    ("power-many-workers", "pxe-stage", ("power", "status", "n001", "--workers", "100000000"), 2,
     "power.workers"),
    # -- a path where a name belongs: bad input (2), said as such, not "unknown" (1) ----------
    ("images-show-traversal", "pxe-stage", ("images", "show", "../x"), 2,
     "invalid image label '../x'"),
    ("images-history-traversal", "pxe-stage", ("images", "history", "../x"), 2,
     "invalid image label '../x'"),
    ("console-traversal", "pxe-stage", ("console", "../x"), 2, "invalid node name '../x'"),
    ("adopt-name-traversal", "pxe-stage", ("nodes", "adopt", "52:54:00:00:00:0b", "--name", "../x"),
     2, "invalid node name '../x'"),
    ("probe-interface-traversal", "pxe-stage", ("dhcp", "probe", "--interface", "../x"), 2,
     "invalid --interface '../x': an interface name"),
]


def _expand(argv: tuple[str, ...], bench: Bench) -> list[str]:
    return [a.replace("{in}", str(bench.inputs)) for a in argv]


def _run(bench: Bench, cmd: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNPROV_CONFIG": str(bench.site.config_path)}
    env.pop("DYNPROV_DEBUG", None)
    return subprocess.run([sys.executable, "-m", MODULES[cmd], *argv], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def _refused(proc: subprocess.CompletedProcess, code: int, text: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    assert text in out, out[-2000:]
    line = next(ln for ln in out.splitlines() if text in ln)
    assert len(line) < 600  # a 130,000-character argument is not echoed back whole


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_and_nothing_changes(bench, case):
    _, cmd, argv, code, text = case
    before = bench.site.snapshot()
    proc = _run(bench, cmd, _expand(argv, bench))
    _refused(proc, code, text)
    if code == 2 and cmd != "node-power":  # bad input: exactly one line, on stderr
        assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc.stderr
    assert bench.site.snapshot() == before


def test_debug_flag_shows_the_traceback(bench):
    proc = _run(bench, "pxe-stage", ["--debug", "nodes", "import", str(bench.inputs / "fifo"),
                                     "--format", "csv"])
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and proc.stderr.splitlines()[-1].startswith("pxe-stage: ")


def test_unexpected_error_is_one_line_with_exit_1(tmp_path):
    """A state database that is not SQLite: no traceback, exit 1, --debug named."""
    site = make_site(tmp_path / "site")
    db = site.cfg.db_path
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 100)
    proc = subprocess.run([sys.executable, "-m", "pxe.cli.main", "--config", str(site.config_path),
                           "nodes", "list"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("pxe-stage: ") and len(proc.stderr.splitlines()) == 1
    assert db.read_bytes() == b"this is not a database" * 100


# -- as an unprivileged user, without sudo -----------------------------------------------------
@dataclass
class Unprivileged:
    site: Site
    user: str
    wrap: list[str]
    code: Path


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[Unprivileged]:
    if os.geteuid() != 0:
        pytest.skip("creating a throw-away user needs root")
    wrap = user_wrap()
    if isinstance(wrap, str):
        pytest.skip(wrap)
    import secrets

    user = f"dpb{secrets.token_hex(3)}"
    base = readable_tempdir("dynprov-badinput-")
    try:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", user], check=True,
                       capture_output=True, timeout=60)
        site = make_site(base / "site")
        _populate(site)
        for path in [site.root, *site.root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
            elif path.is_file():
                path.chmod(0o644)
        with staged_code() as code:
            yield Unprivileged(site, user, wrap, code)
    finally:
        subprocess.run(["userdel", user], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


DB_READ_ONLY = "permission denied: {site}/state/dynprov.db (run as root or through sudo)"
AS_USER = [
    ("nodes-add", "pxe-stage", ("nodes", "add", "n010", "--mac", "52:54:00:00:00:10"),
     DB_READ_ONLY),
    ("nodes-remove", "pxe-stage", ("nodes", "remove", "n001"), DB_READ_ONLY),
    ("images-remove", "pxe-stage", ("images", "remove", "base", "--force"),
     DB_READ_ONLY),
    ("set-boot", "pxe-stage", ("set-boot", "n001", "--local"),
     DB_READ_ONLY),
    ("fg-moab-mode", "fg-moab", ("-mode", "perjob"), DB_READ_ONLY),
    ("fg-moab-image-upload", "fg-moab-image", ("-upload", "-image", "/etc/hostname"),
     "permission denied: uploading an image needs membership of group"),
]


@pytest.mark.parametrize("case", AS_USER, ids=[c[0] for c in AS_USER])
def test_unprivileged_user_gets_a_message_not_a_traceback(unprivileged, case):
    _, cmd, argv, text = case
    site = unprivileged.site
    before = site.snapshot()
    config = ["--site-config" if cmd == "fg-moab" else "--config", str(site.config_path)]
    proc = run_as(unprivileged.wrap, unprivileged.user, unprivileged.code,
                  [sys.executable, "-m", MODULES[cmd], *config, *argv])
    out = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), out
    assert "Traceback" not in out, out
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"{cmd}: "), out
    if site.cfg.state.url and text == DB_READ_ONLY:  # PostgreSQL refuses the user at connect
        text = "permission denied: the state database (postgresql:"
    assert text.replace("{site}", str(site.root)) in proc.stderr, out
    assert site.snapshot() == before


# -- the REST service --------------------------------------------------------------------------
API_USERS = {"boss": "fgadmin", "pooler": "fgpool", "nobody": ""}
API_PASSWORD = "bad-input-password"


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[tuple[Site, httpx.Client, dict[str, str]]]:
    from pxe.api import auth, settings

    site = api_site(tmp_path_factory.mktemp("badapi") / "site", None, auth=["file"],
                    max_upload_bytes=64 << 10, workers=1)
    _populate(site)
    password_file = settings.load(site.cfg).password_file
    assert password_file is not None
    for user, group in API_USERS.items():
        auth.set_password(password_file, user, API_PASSWORD, [group] if group else [], rounds=4)
    with running_server(site) as srv:
        ctx = ssl.create_default_context(cafile=str(srv.cert))
        with httpx.Client(base_url=srv.url, verify=ctx, timeout=60) as client:
            r = client.post("/api/v1/token", auth=("boss", API_PASSWORD))
            assert r.status_code == 201, r.text
            yield site, client, {"Authorization": f"Bearer {r.json()['token']}"}


API_CASES: list[tuple[str, str, str, object, int, str]] = [
    # (id, method, path, JSON body or query dict, status, text in the answer)
    ("api-huge-set-nodes", "GET", "/api/v1/nodes", {"nodes": HUGE_SET}, 400, CAP_MESSAGE),
    ("api-huge-set-power", "GET", "/api/v1/power", {"nodes": HUGE_SET}, 400, CAP_MESSAGE),
    ("api-huge-set-move", "POST", "/api/v1/pools/cloud/move", {"nodes": HUGE_SET}, 400,
     CAP_MESSAGE),
    ("api-huge-set-run", "POST", "/api/v1/runs", {"nodes": HUGE_SET, "label": "base"}, 400,
     CAP_MESSAGE),
    ("api-set-shell", "GET", "/api/v1/nodes", {"nodes": "n001;reboot"}, 400, "not allowed"),
    ("api-set-group", "GET", "/api/v1/nodes", {"nodes": "@all"}, 400, "node groups"),
    ("api-set-nul", "GET", "/api/v1/nodes", {"nodes": "n001\x00"}, 400, "not allowed"),
    ("api-pool-traversal", "POST", "/api/v1/pools", {"name": "../etc"}, 400, "invalid pool name"),
    ("api-pool-type", "POST", "/api/v1/pools", {"name": ["x"]}, 400, "name"),
    ("api-run-label-shell", "POST", "/api/v1/runs", {"nodes": "n001", "label": "$(reboot)"}, 400,
     "invalid"),
    ("api-run-nodes-type", "POST", "/api/v1/runs", {"nodes": 5, "label": "base"}, 400, "nodes"),
    ("api-node-traversal", "GET", "/api/v1/nodes/..%2F..%2Fetc%2Fpasswd", None, 404, ""),
    ("api-node-shell", "GET", "/api/v1/nodes/n001%3Breboot", None, 400, "invalid node name"),
]


def _stored(site: Site, *, logins: bool = False) -> dict[str, bytes]:
    """The site's files minus the server's own log (and, with ``logins``, its failed-login
    records, which a wrong password is meant to change)."""
    return {k: v for k, v in site.snapshot().items()
            if k != "api-server.log" and not (logins and k.startswith("state/api/"))}


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_and_nothing_changes(api, case):
    site, client, headers = api
    _, method, path, data, status, text = case
    before = _stored(site)
    started = time.monotonic()
    if method == "GET":
        r = client.get(path, params=data, headers=headers)  # type: ignore[arg-type]
    else:
        r = client.request(method, path, content=json.dumps(data), headers={
            **headers, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert text in r.text
    assert time.monotonic() - started < 30  # never the 40 s of expanding 10^8 names
    assert _stored(site) == before


def test_api_body_not_json_and_too_large(api):
    site, client, headers = api
    before = _stored(site)
    r = client.post("/api/v1/pools", content=b"\xff\xfe{", headers={
        **headers, "Content-Type": "application/json"})
    assert r.status_code == 400
    r = client.post("/api/v1/pools", content=b"{" + b" " * (2 << 20) + b"}", headers={
        **headers, "Content-Type": "application/json"})
    assert r.status_code in (400, 413)
    assert _stored(site) == before


def test_api_wrong_password_and_forged_token(api):
    site, client, _ = api
    before = _stored(site, logins=True)
    assert client.post("/api/v1/token", auth=("boss", "wrong")).status_code == 401
    forged = {"Authorization": "Bearer " + "A" * 40}
    assert client.post("/api/v1/pools", json={"name": "x"}, headers=forged).status_code == 401
    assert _stored(site, logins=True) == before


# -- every console script ends in the one handler ----------------------------------------------
FIFO_CONFIG_ARGV = {
    "pxe-stage": ("--config", "{fifo}", "nodes", "list"),
    "os-switch": ("n001", "--set", "OS=base", "--config", "{fifo}"),
    "cluster-query": ("--config", "{fifo}"),
    "node-power": ("n001", "ON", "--config", "{fifo}"),
    "fg-moab": ("--site-config", "{fifo}", "-used", "n001"),
    "fg-moab-image": ("--config", "{fifo}", "-list"),
    "fg-moab-group": ("--config", "{fifo}", "-list"),
    "fg-pool": ("--config", "{fifo}", "-list"),
    "fg-image-generate": ("--config", "{fifo}", "-label", "x", "-o", "{out}"),
    "dynprov-lab": ("--config", "{fifo}", "status"),
    "dynprov-slurm": ("config", "--site-config", "{fifo}"),
    "dynprov-slurm-resume": ("resume", "n001", "--site-config", "{fifo}"),
    "dynprov-slurm-suspend": ("suspend", "n001", "--site-config", "{fifo}"),
}
# Run by slurmd on the node: they read no site config, but the node's own files (below
# $DYNPROV_NODE_ROOT); a FIFO there must not hang slurmd's call either.
NODE_SIDE_ARGV = {"dynprov-slurm-helper": ("helper",), "dynprov-slurm-reboot": ("reboot",)}


def test_every_console_script_is_covered():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(FIFO_CONFIG_ARGV) | set(NODE_SIDE_ARGV) == set(MODULES)
    assert {case[0] for case in NODE_FIFOS} == set(NODE_SIDE_ARGV)
    for name, target in scripts.items():
        assert MODULES[name] == target.split(":")[0]


@pytest.mark.parametrize("cmd", sorted(FIFO_CONFIG_ARGV))
def test_fifo_config_is_one_line_in_every_console_script(bench, cmd, tmp_path):
    """A FIFO as the config: refused at once (no blocking read), one line, no traceback."""
    argv = [a.replace("{fifo}", str(bench.inputs / "fifo")).replace("{out}", str(tmp_path / "o"))
            for a in FIFO_CONFIG_ARGV[cmd]]
    before = bench.site.snapshot()
    proc = _run(bench, cmd, argv, timeout=30)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and str(bench.inputs / "fifo") in out, out
    if cmd == "cluster-query":  # Moab's poll: always 0, the problem as a comment line
        assert proc.returncode == 0 and proc.stdout.startswith("# cluster-query: ")
    elif cmd == "node-power":  # Moab reads stdout
        assert proc.returncode == 2 and proc.stdout.startswith("ERROR: node-power: ")
    else:
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, out
        prog = "dynprov-slurm" if cmd.startswith("dynprov-slurm") else cmd  # run as its module
        assert proc.stderr.startswith(f"{prog}: ")
    assert bench.site.snapshot() == before
    assert not (tmp_path / "o").exists()


NODE_FIFOS = [("dynprov-slurm-helper", "etc/os-release", ()),
              ("dynprov-slurm-helper", "proc/cmdline", ("alpha",)),
              ("dynprov-slurm-reboot", "proc/cmdline", ()),
              ("dynprov-slurm-reboot", "etc/dynprov/node-key", ())]


@pytest.mark.parametrize(("cmd", "fifo", "extra"), NODE_FIFOS)
def test_fifo_in_the_node_root_is_one_line_not_a_hang(bench, cmd, fifo, extra, tmp_path):
    """slurmd runs the helper at every registration: a FIFO where the node's os-release or
    command line belongs is refused at once, named, one line, exit 1."""
    node_root = tmp_path / "node"
    for rel in ("etc/os-release", "proc/cmdline", "etc/dynprov/node-key"):
        (node_root / rel).parent.mkdir(parents=True, exist_ok=True)
    (node_root / "etc/os-release").write_text("ID=debian\nIMAGE_ID=alpha\n")
    (node_root / "proc/cmdline").write_text("dynprov.server=http://127.0.0.1:9 dynprov.node=n001\n")
    (node_root / "etc/dynprov/node-key").write_text("k" * 64 + "\n")
    (node_root / fifo).unlink()
    os.mkfifo(node_root / fifo)
    argv = [*NODE_SIDE_ARGV[cmd], *extra]  # the no-argument helper reads only os-release
    env = {**os.environ, "DYNPROV_NODE_ROOT": str(node_root)}
    env.pop("DYNPROV_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", MODULES[cmd], *argv], capture_output=True,
                          text=True, env=env, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and len(proc.stderr.splitlines()) == 1, out
    assert proc.stderr.startswith("dynprov-slurm: ") and "not a regular file" in out, out
    assert str(node_root / fifo) in out, out
