"""systemd units for `pxe-stage serve` and `pxe-stage api serve`: the packaged files, fitted to this
site and this installation, checked by systemd-analyze, then installed (`pxe-stage install-units`).

The packaged units (contrib/systemd/, pxe.assets) are valid as they stand for the documented
default layout. Installing rewrites exactly three lines of each from the site config:
``ExecStart=`` (the real path of this installation's pxe-stage), ``Environment=DYNPROV_CONFIG=``
and ``ReadWritePaths=`` (the only places the sandboxed service may write: state dir, TFTP and
HTTP roots; the REST service also the image repository and the DHCP config's folder, for
``POST /api/v1/images/init``). Everything else, the sandbox included, is the packaged text; a
site changes it with a drop-in (``systemctl edit``), which survives the next install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pxe import assets, atomic
from pxe.config import Config
from pxe.errors import DynprovError, InputError

UNITS = {"serve": "dynprov-serve.service", "api": "dynprov-api.service"}
SYSTEM_DIR = Path("/etc/systemd/system")
LINKED_SCRIPT = Path("/usr/local/bin/pxe-stage")  # where tools/install-deps links it
# What a path may contain to stand in a unit unquoted: no spaces, quotes, '%' specifiers, ';'.
_UNIT_PATH = re.compile(r"/[A-Za-z0-9._/+@:-]*")


@dataclass(frozen=True)
class Unit:
    name: str  # dynprov-serve.service
    text: str
    read_write: tuple[Path, ...]


def _unit_path(path: Path, what: str) -> str:
    text = str(path)
    if not _UNIT_PATH.fullmatch(text) or "//" in text or "/../" in f"{text}/":
        raise InputError(f"{what}: {text!r} cannot stand in a systemd unit (an absolute path of "
                         f"letters, digits and ._/+@:- only)")
    return text


def default_exec() -> Path:
    """This installation's pxe-stage: beside the running Python (a venv's or the system's bin),
    named by its /usr/local/bin link when tools/install-deps made one."""
    beside = Path(sys.executable).parent / "pxe-stage"
    if not (beside.is_file() and os.access(beside, os.X_OK)):
        found = shutil.which("pxe-stage")
        if not found or "/shims/" in found:  # a pyenv shim needs pyenv's environment
            raise DynprovError(f"cannot find the pxe-stage script beside {sys.executable}; "
                               f"give --exec PATH")
        beside = Path(found)
    if LINKED_SCRIPT.exists() and LINKED_SCRIPT.resolve() == beside.resolve():
        return LINKED_SCRIPT
    return beside


def read_write_paths(cfg: Config, which: str) -> tuple[Path, ...]:
    paths = [cfg.paths.state_dir, cfg.paths.tftp_root, cfg.paths.http_root]
    if which == "api":
        from pxe import repository

        paths += [repository.settings(cfg).repository_dir, cfg.dhcp.config_file.parent]
    kept: list[Path] = []
    for path in paths:  # a folder inside one already listed adds nothing
        if not any(path == k or k in path.parents for k in kept):
            kept = [k for k in kept if path not in k.parents] + [path]
    return tuple(kept)


def render(cfg: Config, which: str, exe: Path) -> Unit:
    """The packaged unit with this site's ExecStart, DYNPROV_CONFIG and ReadWritePaths."""
    name = UNITS[which]
    packaged = assets.systemd() / name
    try:
        lines = packaged.read_text().splitlines()
    except OSError as exc:
        raise DynprovError(f"{packaged}: {exc.strerror or exc}") from None
    rw = read_write_paths(cfg, which)
    rw_text = " ".join(_unit_path(p, "a path in [paths], [images] or dhcp.config_file") for p in rw)
    exe_text = _unit_path(exe, "--exec")
    conf_text = _unit_path(Path(os.path.abspath(cfg.path)), "the config file")
    replaced = {"ExecStart=": 0, "ReadWritePaths=": 0, "Environment=DYNPROV_CONFIG=": 0}
    out = []
    for line in lines:
        if line.startswith("ExecStart="):
            args = line.split("=", 1)[1].split()[1:]
            line = f"ExecStart={exe_text} {' '.join(args)}"
        elif line.startswith("ReadWritePaths="):
            line = f"ReadWritePaths={rw_text}"
        elif line.startswith("Environment=DYNPROV_CONFIG="):
            line = f"Environment=DYNPROV_CONFIG={conf_text}"
        else:
            out.append(line)
            continue
        replaced[next(k for k in replaced if line.startswith(k))] += 1
        out.append(line)
    if any(count != 1 for count in replaced.values()):
        raise DynprovError(f"{packaged}: expected one line each of {', '.join(replaced)}; "
                           f"the packaged unit is damaged (reinstall dynprov)")
    return Unit(name, "\n".join(out) + "\n", rw)


def verify(unit: Unit) -> None:
    """`systemd-analyze verify` on the unit under its own name; any complaint refuses it. Man
    pages named in Documentation= are not required to be installed (--man=no)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        raise DynprovError("cannot check the units: systemd-analyze not found (Debian package "
                           "systemd)")
    with tempfile.TemporaryDirectory(prefix="dynprov-units.") as tmp:
        path = Path(tmp) / unit.name
        path.write_text(unit.text)
        try:
            proc = subprocess.run([tool, "verify", "--man=no", str(path)], capture_output=True,
                                  text=True, timeout=120, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
        except subprocess.TimeoutExpired:
            raise DynprovError(f"systemd-analyze verify {unit.name}: no answer in 120 s") from None
    complaint = (proc.stderr + proc.stdout).strip().replace(str(path), unit.name)
    if proc.returncode != 0 or complaint:
        lines = [line for line in complaint.splitlines() if line.strip()][-6:]
        raise DynprovError(f"systemd-analyze rejected {unit.name} (nothing installed):\n  "
                           + "\n  ".join(lines or [f"exit status {proc.returncode}"]))


def install(cfg: Config, which: tuple[str, ...], root: Path | None = None,
            exe: Path | None = None) -> dict[Path, bool]:
    """Render and verify every unit first, then write them (atomically). Returns path -> changed."""
    exe = exe or default_exec()
    if not exe.is_absolute():
        raise InputError(f"--exec: {exe}: must be an absolute path")
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise InputError(f"--exec: {exe}: not an executable file")
    units = [render(cfg, w, exe) for w in which]
    for unit in units:
        verify(unit)
    target = (root / SYSTEM_DIR.relative_to("/")) if root else SYSTEM_DIR
    return {target / u.name: atomic.write_text(target / u.name, u.text) for u in units}
