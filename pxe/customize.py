"""HPC customization: site scripts that fit a generic image to this cluster at deploy time.

The original design's "generic image, then site scripts that fit it to a machine". An image is
*deployed* here when it is uploaded into the repository (``fg-moab-image -upload``): the
uploaded bundle is kept as it is (``-get`` returns it byte-identical), and the root filesystem
the nodes boot is the customized one.

Where the scripts live: ``[images] customize_dir`` (default ``/etc/dynprov/customize``)::

    /etc/dynprov/customize/all/10-hosts          applied to every image deployed here, first
    /etc/dynprov/customize/all/20-torque-mom
    /etc/dynprov/customize/gpu/10-nvidia         applied too for `-upload ... -group gpu`
    /etc/dynprov/customize/ib/10-ofed            (node group names, as in the inventory)

Rules (those of ``run-parts``, but loud):

- ``all/`` first, then each requested group in the order given; inside a directory, in name
  order. Name scripts ``NN-what``.
- Only names of letters, digits, ``_`` and ``-`` are scripts, so ``README.md``,
  ``x.dpkg-old``, ``x~`` or ``x.disabled`` are skipped. A script name that is not executable
  is an error (not silently skipped).
- Each runs as ``SCRIPT ROOT`` with the unpacked image tree as ``ROOT`` and working directory,
  a clean environment (``PATH``, ``LANG``, ``DYNPROV_ROOT``, ``DYNPROV_IMAGE``, ``DYNPROV_ARCH``,
  ``DYNPROV_MODE``, ``DYNPROV_SET``), no standard input, and a time limit
  (``[images] customize_timeout``, default 1800 s).
- Everything a script prints goes to ``<state_dir>/customize/<label>.log`` (one file per
  deploy, with a header per script and its exit status) and the run is logged. The file goes
  with the image's last version (``remove_log``); the audit log keeps the removal's record.
- The first script that exits non-zero (or times out) stops the deploy: nothing is published,
  and the error names the script, its exit status, the log, and its last lines of output.
- When run as root, every script and its directory must be owned by root and not writable by
  group or others; otherwise nothing runs.

Scripts are site code run as root on the server against a tree that came from a user: they
must treat the tree as untrusted. In particular a path inside ``$DYNPROV_ROOT`` may be a
symbolic link pointing anywhere on the server; write new files, or resolve paths in the tree
first, and do not run the image's own programs (``chroot``) unless uploaders are trusted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pxe import validate
from pxe.errors import DynprovError, InputError

log = logging.getLogger("dynprov.customize")

COMMON = "all"
_SCRIPT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Script:
    set: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.set}/{self.path.name}"


def _check_safe(path: Path) -> None:
    """As root, run nothing that someone else could have changed."""
    if os.geteuid() != 0:
        return
    st = path.stat()
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DynprovError(f"customization: {path} must be owned by root and not writable by "
                           "group or others; nothing was run")


def select(customize_dir: Path, groups: Sequence[str] = ()) -> list[Script]:
    """The scripts to run for a deploy for ``groups``, in order (see the module docstring)."""
    sets = [COMMON]
    for group in groups:
        validate.label(group, "node group")
        if group not in sets:
            sets.append(group)
    scripts: list[Script] = []
    for name in sets:
        directory = Path(customize_dir) / name
        if not directory.is_dir():
            if name == COMMON:
                continue
            raise InputError(f"no customization scripts for node group {name!r}: "
                             f"{directory} is not a directory")
        _check_safe(directory)
        for entry in sorted(directory.iterdir(), key=lambda p: p.name):
            if not _SCRIPT_NAME.match(entry.name) or entry.is_dir():
                continue
            if not entry.is_file():
                raise DynprovError(f"customization: {entry} is not a regular file")
            if not os.access(entry, os.X_OK):
                raise DynprovError(f"customization: {entry} is not executable (chmod +x it, "
                                   "or rename it to end in .disabled to skip it)")
            _check_safe(entry)
            scripts.append(Script(name, entry))
    return scripts


def run(scripts: Sequence[Script], tree: Path, *, label: str, arch: str, mode: str,
        log_path: Path, timeout: int = 1800) -> list[str]:
    """Run ``scripts`` in order against ``tree``; raise on the first failure. Returns names."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    with open(log_path, "w") as out:
        os.chmod(log_path, 0o640)
        out.write(f"# customization of image {label} in {tree}\n")
        for script in scripts:
            out.write(f"== {script.name} started {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            out.flush()
            log.info("customization: running %s on image %s", script.name, label)
            env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": "/", "DYNPROV_ROOT": str(tree),
                   "DYNPROV_IMAGE": label, "DYNPROV_ARCH": arch, "DYNPROV_MODE": mode,
                   "DYNPROV_SET": script.set}
            try:
                proc = subprocess.Popen([str(script.path), str(tree)], cwd=tree, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise DynprovError(f"customization failed: {script.name} could not start "
                                   f"({exc.strerror or exc}); nothing was published") from None
            try:
                status = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the script's own process group
                proc.wait()
                out.write(f"== {script.name} killed after {timeout} s\n")
                out.flush()
                raise DynprovError(f"customization failed: {script.name} did not finish within "
                                   f"{timeout} s; nothing was published (log: {log_path})"
                                   + _tail(log_path)) from None
            except BaseException:  # Ctrl-C or SIGTERM of the build: the script stops with it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            out.write(f"== {script.name} exit status {status}\n")
            out.flush()
            if status != 0:
                log.error("customization: %s failed with status %s", script.name, status)
                raise DynprovError(f"customization failed: {script.name} exited with status "
                                   f"{status}; nothing was published (log: {log_path})"
                                   + _tail(log_path))
            done.append(script.name)
    return done


def log_path(state_dir: Path, label: str) -> Path:
    """Where a deploy of image ``label`` writes its scripts' output."""
    return state_dir / "customize" / f"{validate.label(label, 'image label')}.log"


def remove_log(state_dir: Path, label: str) -> None:
    """Delete ``label``'s customization log once no version of the image is left: it would
    otherwise describe an image that no longer exists (and outlive it forever)."""
    with contextlib.suppress(FileNotFoundError):
        log_path(state_dir, label).unlink()


def _tail(log_path: Path, lines: int = 5) -> str:
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    useful = [line for line in text if line.strip() and not line.startswith(("==", "#"))]
    return "".join(f"\n  {line}" for line in useful[-lines:])


def customize_rootfs(rootfs: Path, kind: str, work: Path, scripts: Sequence[Script], *,
                     label: str, arch: str, mode: str, log_path: Path,
                     timeout: int = 1800) -> tuple[Path, list[str]]:
    """Unpack ``rootfs`` (squashfs or tar) in ``work``, run ``scripts``, pack it again in the
    same format under the same file name. Returns (new root filesystem, scripts run)."""
    from pxe import bundle

    work.mkdir(parents=True, exist_ok=True)
    tree = work / "tree"
    owners = None
    if kind == "squashfs":
        argv = ["unsquashfs", "-no-progress", "-quiet", "-d", str(tree), str(rootfs)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise DynprovError(f"cannot unpack {rootfs.name} for customization: "
                               f"{(proc.stderr or proc.stdout).strip()}")
    else:
        tree.mkdir()
        writer = bundle.extract_rootfs(rootfs, tree)
        owners = None if os.geteuid() == 0 else writer.owners
    names = run(scripts, tree, label=label, arch=arch, mode=mode, log_path=log_path,
                timeout=timeout)
    out_dir = work / "customized"
    out_dir.mkdir()
    packed = bundle.rootfs_from_tree(tree, out_dir / rootfs.name, kind, owners)
    return packed, names
