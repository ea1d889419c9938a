"""DHCP config install: render -> the daemon's own check -> atomic rename -> reload.

A config the daemon rejects is never installed; the old one stays and the daemon's own
complaint is shown.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pxe.config import Config
from pxe.dhcp.base import DhcpBackend
from pxe.errors import DynprovError

CHECK_TIMEOUT, RELOAD_TIMEOUT = 120, 60  # seconds


def backend(name: str) -> DhcpBackend:
    if name == "isc":
        from pxe.dhcp.isc import IscDhcpd

        return IscDhcpd()
    from pxe.dhcp.dnsmasq import Dnsmasq

    return Dnsmasq()


def _checker(cfg: Config) -> DhcpBackend:
    be = backend(cfg.dhcp.backend)
    missing = be.validate()
    if missing and not cfg.dhcp.check_command:
        raise DynprovError(f"cannot check the DHCP config: {missing}")
    return be


class PendingCheck:
    """A DHCP config written to a temp file beside the installed one, the daemon's check of it
    running as a child process. ``install()`` waits for the verdict and renames that very file
    into place only when the daemon accepted it; ``discard()`` drops it. Either way the temp
    file is gone afterwards. Started early, the check runs while the caller does other work
    (`set-boot --render`: the set-boot transaction; always: the temp file's fsync)."""

    def __init__(self, cfg: Config, text: str, suffix: str = ".new", durable: bool = True):
        from pxe.atomic import temp_beside
        from pxe.childproc import Child

        self.cfg = cfg
        self.be = _checker(cfg)
        target = cfg.dhcp.config_file
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, self.path = temp_beside(target, suffix)
        self.proc: Child | None = None
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fchmod(fh.fileno(), 0o644)
                cmd = cfg.dhcp.check_command
                self.argv = [*cmd, self.path] if cmd else self.be.check_argv(Path(self.path))
                try:
                    self.proc = Child(self.argv)
                except OSError as exc:
                    raise DynprovError(f"DHCP config check {self.argv[0]} could not run: "
                                       f"{exc}") from None
                if durable:  # to be installed: on disk before the rename
                    os.fsync(fh.fileno())  # while the daemon reads the same bytes (page cache)
        except BaseException:
            self.discard()
            raise

    def verdict(self) -> None:
        """Wait for the daemon's check; raise with its complaint when it rejected the file."""
        proc = self.proc
        if proc is None:
            raise DynprovError("DHCP config check already finished")
        self.proc = None
        try:
            status, output = proc.wait(CHECK_TIMEOUT)  # killed and reaped on any failure
        except TimeoutError:
            raise DynprovError(f"DHCP config check {self.argv[0]} could not run: timed out "
                               f"after {CHECK_TIMEOUT} s") from None
        if status != 0:
            complaint = output.strip().splitlines()
            useful = [line for line in complaint if line.strip()][-6:]
            raise DynprovError(f"{self.be.name} rejected the rendered config (old config kept):"
                               "\n  " + "\n  ".join(useful or [f"exit status {status}"]))

    def install(self, reload: bool = True) -> None:
        """Rename the checked file into place once the daemon accepted it (the caller holds the
        render lock), then reload."""
        try:
            self.verdict()
            os.replace(self.path, self.cfg.dhcp.config_file)
        finally:
            self.discard()
        if reload:
            run_reload(self.cfg)

    def discard(self) -> None:
        """Stop the check if it still runs and remove the temp file (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def unchanged(cfg: Config, text: str) -> bool:
    """Whether the installed DHCP config is already exactly ``text``."""
    try:
        return cfg.dhcp.config_file.read_text() == text
    except FileNotFoundError:
        return False


def check(cfg: Config, text: str) -> None:
    """Run the daemon's check on ``text`` in a temp file; raise with its output if rejected."""
    pending = PendingCheck(cfg, text, suffix=".check", durable=False)  # never installed
    try:
        pending.verdict()
    finally:
        pending.discard()


def install(cfg: Config, text: str, reload: bool = True) -> bool:
    """Check and install the DHCP config. Returns False when nothing changed.

    The caller holds the render lock. The checked temp file is the one renamed into place,
    so what was checked is exactly what is installed.
    """
    if unchanged(cfg, text):
        return False
    PendingCheck(cfg, text).install(reload)
    return True


def run_reload(cfg: Config) -> None:
    from pxe.childproc import Child

    argv = list(cfg.dhcp.reload_command)
    try:
        status, output = Child(argv).wait(RELOAD_TIMEOUT)
    except TimeoutError:  # an OSError too: first
        raise DynprovError(f"DHCP reload command {argv[0]} failed: timed out after "
                           f"{RELOAD_TIMEOUT} s") from None
    except OSError as exc:
        raise DynprovError(f"DHCP reload command {argv[0]} failed: {exc}") from None
    if status != 0:
        raise DynprovError(f"DHCP reload command {' '.join(argv)} exited {status}: "
                           f"{output.strip()[:300]}")
