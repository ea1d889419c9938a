"""Configs for the standard servers a large site runs instead of serve's TFTP or HTTP.

`pxe-stage render --servers` writes, into `[serve] standard_configs_dir` (default
<state_dir>/servers/): `dnsmasq-tftp.conf` (dnsmasq's own TFTP), `tftpd-hpa` (for
/etc/default/tftpd-hpa) and `nginx-dynprov.conf` (an nginx site for the HTTP root, passing
/report, /healthz and /metrics on to serve). Templates are files under templates/servers/.
Each rendering is checked by its daemon when that daemon is installed (nginx -t, dnsmasq
--test), then written atomically; the admin installs them (we do not touch /etc).
When to switch: see templates/servers/README.md.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from pxe import atomic
from pxe.config import Config
from pxe.errors import DynprovError
from pxe.render import Renderer
from pxe.serve import settings as serve_settings

log = logging.getLogger("dynprov.serve.standard_configs")

TEMPLATES = {
    "dnsmasq-tftp.conf": "servers/dnsmasq-tftp.conf.j2",
    "tftpd-hpa": "servers/tftpd-hpa.j2",
    "nginx-dynprov.conf": "servers/nginx-dynprov.conf.j2",
}
CHECK_TIMEOUT = 30


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render(cfg: Config, renderer: Renderer | None = None) -> dict[str, str]:
    """File name -> text, for every standard server."""
    s = serve_settings.load(cfg)
    if ipaddress.ip_address(s.http_address).is_loopback:
        upstream = (s.http_address, s.http_port)
    else:  # serve still holds the public port: propose a loopback one for it
        upstream = ("127.0.0.1", cfg.boot.http_port + 1)
    out_dir = s.standard_configs_dir
    renderer = renderer or Renderer(cfg)
    context = {
        "settings": s,
        "tftp_root": cfg.paths.tftp_root,
        "http_root": cfg.paths.http_root,
        "tftp_listen": _hostport(s.tftp_address, s.tftp_port),
        "retransmit_us": int(s.timeout * 1_000_000),
        "public_listen": _hostport(cfg.network.server, cfg.boot.http_port),
        "public_url": renderer.base_url,
        "upstream": _hostport(*upstream),
        "upstream_address": upstream[0],
        "upstream_port": upstream[1],
    }
    return {name: renderer.template(tpl).render(context, path=out_dir / name)
            for name, tpl in TEMPLATES.items()}


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(files: dict[str, str]) -> None:
    """Let nginx and dnsmasq check their file, when installed; DynprovError if one objects."""
    with tempfile.TemporaryDirectory(prefix="dynprov-servers-") as tmp:
        tmpdir = Path(tmp)
        for name, text in files.items():
            (tmpdir / name).write_text(text)
        # nginx -t binds its listen addresses, and the provisioning address may not exist on
        # this host yet: check the site with a loopback listen instead (the rest unchanged).
        (tmpdir / "nginx-dynprov.conf").write_text(re.sub(
            r"(?m)^(\s*)listen [^;]+;", rf"\1listen 127.0.0.1:{_free_tcp_port()};",
            files["nginx-dynprov.conf"]))
        checks: list[tuple[str, list[str]]] = []
        if shutil.which("nginx"):
            main = tmpdir / "nginx.conf"
            main.write_text(f"pid {tmpdir}/nginx.pid;\nerror_log {tmpdir}/error.log;\n"
                            f"events {{}}\nhttp {{ include {tmpdir}/nginx-dynprov.conf; }}\n")
            checks.append(("nginx-dynprov.conf", ["nginx", "-t", "-q", "-p", str(tmpdir),
                                                  "-c", str(main)]))
        if shutil.which("dnsmasq"):
            checks.append(("dnsmasq-tftp.conf", ["dnsmasq", "--test",
                                                 f"--conf-file={tmpdir / 'dnsmasq-tftp.conf'}"]))
        for name, argv in checks:
            try:
                proc = subprocess.run(argv, capture_output=True, text=True,
                                      timeout=CHECK_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise DynprovError(f"{name}: cannot run {argv[0]} to check it: {exc}") from None
            if proc.returncode != 0:
                detail = (proc.stderr or proc.stdout).strip().replace(str(tmpdir) + "/", "")
                raise DynprovError(f"{name}: rejected by {argv[0]}: {detail}")


def write(cfg: Config) -> dict[Path, bool]:
    """Render, check, write atomically. Returns path -> changed. Call under the render lock."""
    files = render(cfg)
    check(files)
    out_dir = serve_settings.load(cfg).standard_configs_dir
    return {out_dir / name: atomic.write_text(out_dir / name, text)
            for name, text in files.items()}
