"""Debian's current amd64 kernel package, fetched once and unpacked into a cache.

The image generator needs a kernel when neither the image nor ``-kernel-root`` brings one; tests,
the demo and ``pxe-stage initramfs build`` need the same tree. Part of the image generator (not a
script under ``tools/`` found by path), so an installed dynprov can fetch it too.

``python3 -m pxe.imagegen.kernel`` prints the unpacked root: ``ROOT/boot/vmlinuz-*`` and
``ROOT/lib/modules/VERSION/`` with ``modules.dep``. Cache: ``$DYNPROV_CACHE/kernel`` (default
``/var/cache/dynprov/kernel``). A second run downloads nothing. ``tools/fetch-kernel`` runs this.
Exit status: 0 ok, 1 failed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pxe.errors import DynprovError

META_PACKAGE = "linux-image-amd64"
DONE_MARK = ".done"
# what apt-cache prints for the meta package: "  Depends: linux-image-6.1.0-41-amd64"
_VERSIONED = re.compile(r"^\s*Depends:\s*(linux-image-[0-9][A-Za-z0-9.+~-]*)\s*$", re.M)
_SBIN = "/usr/sbin:/sbin"


def cache_dir() -> Path:
    return Path(os.environ.get("DYNPROV_CACHE") or "/var/cache/dynprov") / "kernel"


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{_SBIN}"}
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DynprovError(f"fetch-kernel: {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise DynprovError(f"fetch-kernel: {' '.join(argv[:2])} failed: "
                           f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout


def package_name() -> str:
    """The versioned package behind linux-image-amd64 (apt's current candidate)."""
    out = _run(["apt-cache", "depends", META_PACKAGE], timeout=120)
    found = _VERSIONED.search(out)
    if not found:
        raise DynprovError(f"fetch-kernel: cannot find the kernel package behind {META_PACKAGE} "
                           "(apt-get update?)")
    return found.group(1)


def fetch(timeout: float = 900) -> Path:
    """The unpacked kernel package's root; downloaded and unpacked only the first time."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    pkg = package_name()
    root = cache / pkg
    if (root / DONE_MARK).is_file():
        return root
    tmp = Path(tempfile.mkdtemp(prefix=".fetch.", dir=cache))
    try:
        _run(["apt-get", "download", "-qq", pkg], cwd=tmp, timeout=timeout)
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise DynprovError(f"fetch-kernel: apt-get download {pkg} left {len(debs)} packages")
        unpacked = tmp / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
        versions = sorted(p.name for p in (unpacked / "lib" / "modules").iterdir())
        if len(versions) != 1:
            raise DynprovError(f"fetch-kernel: {pkg} has {len(versions)} module trees")
        # Debian ships modules.dep only after depmod runs at install: make it here.
        _run(["depmod", "-b", str(unpacked), versions[0]])
        shutil.rmtree(root, ignore_errors=True)
        unpacked.rename(root)
        (root / DONE_MARK).touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python3 -m pxe.imagegen.kernel  (prints the unpacked kernel's root)",
              file=sys.stderr)
        return 0 if args[0] in ("-h", "--help") else 2
    try:
        print(fetch())
    except DynprovError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
