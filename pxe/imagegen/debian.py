"""A Debian root tree from the package archive, with mmdebstrap.

What runs: ``mmdebstrap --variant=minbase --include=PKGS SUITE DIR MIRRORS...`` into a fresh
directory, preceded by a ``--simulate`` pass (about 7 s: one ``apt-get update`` and a solver run,
nothing installed) so that a package that does not exist, or cannot be installed, is named before
the 40+ s of unpacking start.

Privileges: the tree is made in mmdebstrap's ``root`` mode, so this needs root. mmdebstrap's
``unshare`` mode would work without root where the kernel allows unprivileged user namespaces
and the user has subordinate ids (package ``uidmap``, ``/etc/subuid`` and ``/etc/subgid``
entries); the tree it makes is owned by those ids, which this builder cannot then change or pack
without entering the namespace again, so it is not used (see ``need_root``).

Package cache (``-cache DIR``, default ``/var/cache/dynprov/apt``): one directory per
suite and architecture holding the .deb files of earlier builds. mmdebstrap's own ``sync-in``
special hook copies it into the new tree's ``/var/cache/apt/archives`` before the download
(apt verifies each file against the archive's index and fetches only what is missing or
changed), and ``sync-out`` copies new downloads back after a successful build. The image never
keeps them: mmdebstrap's cleanup empties ``/var/cache/apt/archives``. A lock serialises builds
that share one cache directory. Delete the directory to reset it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pxe.errors import DynprovError, InputError
from pxe.imagegen.progress import Progress

# Codename -> version; the version number and 'stable'-style names are not accepted on purpose:
# an image should say which release it is, and 'stable' moves.
SUITES = {"bullseye": "11", "bookworm": "12", "trixie": "13", "sid": "unstable"}
VERSIONS = {"11": "bullseye", "12": "bookworm", "13": "trixie", "unstable": "sid"}
# Debian architecture -> the manifest's (and the kernel's) name. Only amd64: the cached kernel
# and the virtual cluster are amd64, and a foreign architecture would need qemu-user binfmt.
ARCHES = {"amd64": "x86_64"}
COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEFAULT_CACHE = Path("/var/cache/dynprov/apt")

# dpkg path filters of a "slim" image: no manuals, info pages, translations or docs (copyright
# files stay). Written by mmdebstrap into /etc/dpkg/dpkg.cfg.d/99mmdebstrap, so packages
# installed later in the image follow the same rule.
SLIM_DPKG_OPTS = (
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/lintian/*",
)

_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,99}(?:=[A-Za-z0-9.+~:-]{1,100})?$")
_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~/-]*)?$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")  # goes into mmdebstrap's hook strings
_NOT_FOUND = (
    re.compile(r"^E: Unable to locate package (\S+)"),
    re.compile(r"^E: Package '([^']+)' has no installation candidate"),
    re.compile(r"^E: Couldn't find any package by (?:glob|regex) '([^']+)'"),
    re.compile(r"^E: Version '[^']+' for '([^']+)' was not found"),
)
PACKAGES_MAX = 500


# -- checking the request ---------------------------------------------------------------------
def suite(version: str) -> str:
    """'bookworm' or '12' -> 'bookworm'; anything else is an InputError naming what exists."""
    value = (version or "").strip().lower()
    if value in SUITES:
        return value
    if value in VERSIONS:
        return VERSIONS[value]
    known = ", ".join(f"{c} ({v})" for c, v in SUITES.items())
    raise InputError(f"unknown Debian version {version!r} (known: {known})")


def arch(name: str) -> str:
    value = (name or "").strip().lower()
    if value in ("x86_64",):
        value = "amd64"
    if value not in ARCHES:
        raise InputError(f"architecture {name!r} is not supported for Debian images here "
                         f"(supported: {', '.join(ARCHES)})")
    return value


def packages(text: str | Sequence[str]) -> list[str]:
    """'openmpi-bin, python3' -> ['openmpi-bin', 'python3'] (Debian package names, optionally
    NAME=VERSION); duplicates dropped, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if not _PACKAGE.match(name):
            raise InputError(f"invalid package name {name!r}: Debian package names are lower-case "
                             "letters, digits, '+', '-' and '.' (optionally NAME=VERSION)")
        if name not in out:
            out.append(name)
    if len(out) > PACKAGES_MAX:
        raise InputError(f"too many packages ({len(out)}; at most {PACKAGES_MAX})")
    return out


def components(text: str) -> list[str]:
    out = [c.strip() for c in text.split(",") if c.strip()]
    for comp in out:
        if comp not in COMPONENTS:
            raise InputError(f"unknown archive component {comp!r} (known: {', '.join(COMPONENTS)})")
    return out or ["main"]


def mirror(url: str, what: str = "mirror") -> str:
    if not _URL.match(url or ""):
        raise InputError(f"invalid {what} URL {url!r} (expected http://HOST[:PORT]/PATH)")
    return url.rstrip("/")


def need_root() -> None:
    """Say what is missing when the tree cannot be built here."""
    if os.geteuid() == 0:
        return
    raise InputError(
        "building a Debian image needs root here (sudo fg-image-generate ...): the tree is made "
        "with mmdebstrap's root mode. Without root, build the root with mmdebstrap's unshare mode "
        "yourself (needs unprivileged user namespaces, the uidmap package and /etc/subuid and "
        "/etc/subgid entries), export it as a container image and use -from-oci")


# -- the package cache ------------------------------------------------------------------------
@contextlib.contextmanager
def cache_dir(base: Path | None, suite_name: str, arch_name: str,
              progress: Progress | None = None) -> Iterator[Path | None]:
    """The locked per-suite cache directory (None: no cache)."""
    if base is None:
        yield None
        return
    base = Path(base).absolute()
    if not _SAFE_PATH.match(str(base)):
        raise InputError(f"package cache {base}: use a path of letters, digits, '.', '_', '-' "
                         "and '/' (it is handed to mmdebstrap's hooks)")
    directory = base / f"{suite_name}-{arch_name}"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        fh: IO[str] = open(directory / ".lock", "a")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DynprovError(f"package cache {directory}: {exc.strerror or exc}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress.phase("waiting for another build using the package cache")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield directory


def cache_stats(directory: Path | None) -> tuple[int, int]:
    """(number of .deb files, their bytes) in a cache directory."""
    if directory is None or not directory.is_dir():
        return 0, 0
    debs = [p for p in directory.glob("*.deb") if p.is_file()]
    return len(debs), sum(p.stat().st_size for p in debs)


# -- mmdebstrap ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    suite: str
    arch: str = "amd64"
    packages: tuple[str, ...] = ()
    components: tuple[str, ...] = ("main",)
    mirror: str = MIRROR
    security_mirror: str | None = SECURITY_MIRROR
    variant: str = "minbase"
    slim: bool = True

    def sources(self) -> list[str]:
        """sources.list lines: the release, its -updates and -security (not for sid)."""
        comps = " ".join(self.components)
        lines = [f"deb {self.mirror} {self.suite} {comps}"]
        if self.suite != "sid":
            lines.append(f"deb {self.mirror} {self.suite}-updates {comps}")
            if self.security_mirror:
                lines.append(f"deb {self.security_mirror} {self.suite}-security {comps}")
        return lines


def argv(req: Request, target: str, cache: Path | None = None,
         simulate: bool = False) -> list[str]:
    """The mmdebstrap command line (an argv list; hook strings carry only checked paths)."""
    out = ["mmdebstrap", "--mode=root", f"--variant={req.variant}",
           f"--architectures={req.arch}", f"--components={','.join(req.components)}",
           "--aptopt=Acquire::Languages \"none\""]
    if req.packages:
        out.append(f"--include={','.join(req.packages)}")
    if req.slim:
        out += [f"--dpkgopt={opt}" for opt in SLIM_DPKG_OPTS]
    if simulate:
        out.append("--simulate")
    else:
        out.append("--format=directory")
        if cache is not None:
            out += ["--skip=essential/unlink",  # keep the essential .debs for sync-out
                    "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
                    f"--setup-hook=sync-in {cache} /var/cache/apt/archives/",
                    f"--customize-hook=sync-out /var/cache/apt/archives {cache}"]
    return [*out, req.suite, target, *req.sources()]


def _drained(proc: subprocess.Popen[str]) -> bool:
    """After its output closed, give mmdebstrap a moment to exit by itself."""
    try:
        proc.wait(timeout=60)
        return True
    except subprocess.TimeoutExpired:
        return False


def _not_found(lines: Sequence[str]) -> list[str]:
    names: list[str] = []
    for line in lines:
        for pattern in _NOT_FOUND:
            match = pattern.match(line.strip())
            if match and match.group(1) not in names:
                names.append(match.group(1))
    return names


def _explain(req: Request, lines: Sequence[str], log: Path) -> DynprovError:
    where = f"Debian {req.suite} ({req.arch})"
    missing = _not_found(lines)
    if missing:
        return InputError(f"package(s) not found in {where}: {', '.join(missing)}")
    errors = [ln.strip() for ln in lines if ln.startswith(("E:", "W:")) or "unmet" in ln.lower()]
    text = "\n".join(lines)
    if "No space left on device" in text:
        return DynprovError("no space left on device while building the root tree "
                            f"(mmdebstrap log: {log})")
    if "unmet dependencies" in text.lower() or "held broken packages" in text:
        detail = "\n  ".join(ln for ln in errors if not ln.startswith("E: setup failed"))[-1500:]
        return InputError(f"the packages cannot be installed together in {where}:\n  {detail}")
    if "does not have a Release file" in text or "404" in text and "Release" in text:
        return InputError(f"{where}: the mirror has no such release ({req.mirror})")
    tail = "\n  ".join(errors[-6:] or [ln.rstrip() for ln in lines[-6:]])
    return DynprovError(f"mmdebstrap failed (log: {log}):\n  {tail}")


def run(req: Request, target: Path, log: Path, *, cache: Path | None = None,
        simulate: bool = False, progress: Progress | None = None,
        timeout: float = 3600) -> None:
    """Run mmdebstrap, showing its phases; raise a readable error (naming missing packages)."""
    command = argv(req, str(target), cache, simulate)
    env = {**os.environ, "TMPDIR": str(log.parent), "LC_ALL": "C.UTF-8",
           "DEBIAN_FRONTEND": "noninteractive"}
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        logfh = open(log, "a", buffering=1)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DynprovError(f"cannot write the build log {log}: {exc.strerror or exc}") from None
    with logfh:
        logfh.write(f"$ {' '.join(command)}\n")
        logfh.flush()
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, errors="replace",
                                    env=env, start_new_session=True)
        except FileNotFoundError:
            raise DynprovError("mmdebstrap not found (Debian package mmdebstrap; "
                               "tools/install-deps)") from None
        ended = False
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # ends when mmdebstrap exits
                with contextlib.suppress(OSError):  # a full disk must not hide the real error
                    logfh.write(line)
                if simulate and line.startswith(("Inst ", "Conf ")):
                    continue
                lines.append(line.rstrip("\n"))
                del lines[:-400]
                if line.startswith("I: ") and progress:
                    progress.phase(line[3:].split("...")[0])
                if time.monotonic() > deadline:
                    timed_out = True
                    break
            ended = not timed_out
        finally:  # on a time-out, an error or Ctrl-C, stop it at once (its hooks included)
            if not ended or not _drained(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # mmdebstrap's own process group
            status = proc.wait(timeout=120)
    if timed_out:
        raise DynprovError(f"mmdebstrap did not finish within {timeout:.0f} s (log: {log})")
    if status != 0:
        raise _explain(req, lines, log)
