"""DHCP config install: render -> the daemon's own check -> atomic rename -> reload.

A config the daemon rejects is never installed; the old one stays and the daemon's own
complaint is shown.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

from pxe.config import Config
from pxe.dhcp.base import DhcpBackend
from pxe.errors import DynprovError


def backend(name: str) -> DhcpBackend:
    if name == "isc":
        from pxe.dhcp.isc import IscDhcpd

        return IscDhcpd()
    from pxe.dhcp.dnsmasq import Dnsmasq

    return Dnsmasq()


def check(cfg: Config, text: str, name: str | None = None) -> None:
    """Run the daemon's check on ``text`` in a temp file; raise with its output if rejected."""
    be = backend(name or cfg.dhcp.backend)
    missing = be.validate()
    if missing and not cfg.dhcp.check_command:
        raise DynprovError(f"cannot check the DHCP config: {missing}")
    target = cfg.dhcp.config_file
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".check", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _run_check(cfg, be, Path(tmp))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _run_check(cfg: Config, be: DhcpBackend, path: Path, meanwhile=None) -> None:
    """The daemon's check of ``path``; ``meanwhile`` (if given) runs while the daemon reads."""
    argv = [*cfg.dhcp.check_command, str(path)] if cfg.dhcp.check_command else be.check_argv(path)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise DynprovError(f"DHCP config check {argv[0]} could not run: {exc}") from None
    with proc:
        try:
            if meanwhile is not None:
                meanwhile()
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise DynprovError(f"DHCP config check {argv[0]} could not run: timed out after "
                               "120 s") from None
        except BaseException:
            proc.kill()
            raise
    if proc.returncode != 0:
        complaint = (stderr + stdout).strip().splitlines()
        useful = [line for line in complaint if line.strip()][-6:]
        raise DynprovError(f"{be.name} rejected the rendered config (old config kept):\n  "
                           + "\n  ".join(useful or [f"exit status {proc.returncode}"]))


def install(cfg: Config, text: str, reload: bool = True) -> bool:
    """Check and install the DHCP config. Returns False when nothing changed.

    The caller holds the render lock. The checked temp file is the one renamed into place,
    so what was checked is exactly what is installed. Its fsync runs while the daemon checks
    it (the daemon reads the same bytes from the page cache); the rename waits for both.
    """
    target = cfg.dhcp.config_file
    try:
        if target.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    be = backend(cfg.dhcp.backend)
    missing = be.validate()
    if missing and not cfg.dhcp.check_command:
        raise DynprovError(f"cannot check the DHCP config: {missing}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)
            _run_check(cfg, be, Path(tmp), meanwhile=lambda: os.fsync(fh.fileno()))
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if reload:
        run_reload(cfg)
    return True


def run_reload(cfg: Config) -> None:
    argv = list(cfg.dhcp.reload_command)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DynprovError(f"DHCP reload command {argv[0]} failed: {exc}") from None
    if proc.returncode != 0:
        raise DynprovError(f"DHCP reload command {' '.join(argv)} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[:300]}")
