"""Helpers for the fg-image-generate tests (no tests here): a fake kernel package, container
image tarballs made by hand, a tmpfs, and the one real Debian build the slow tests share."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pxe import initramfs
from pxe.imagegen import pack
from tests.conftest import ROOT, fake_bzimage

GENERATE = [sys.executable, "-m", "pxe.cli.fg_image_generate"]
# The real build the integration and e2e tests share (one per pytest session): a minimal Debian
# with one small package and a check command that only works if that package is there.
PACKAGE, CHECK, CHECK_OUTPUT = "hello", "hello", "Hello, world!"
_BUILT: dict[str, Path] = {}


def generate(*argv: str, env: dict[str, str] | None = None,
             timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("DYNPROV_CONFIG", "/nonexistent/dynprov.toml")
    return subprocess.run([*GENERATE, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


def fake_kernel_root(root: Path, version: str = "9.9.9-test") -> Path:
    """boot/vmlinuz-V (a bzImage header) and lib/modules/V with every module the builders ask
    for (dummy bytes) and a modules.dep: enough for the initramfs and image builders."""
    (root / "boot").mkdir(parents=True, exist_ok=True)
    fake_bzimage(root / "boot" / f"vmlinuz-{version}")
    moddir = root / "lib" / "modules" / version
    names = sorted(set(initramfs.DEFAULT_MODULES) | set(pack.IMAGE_NIC_MODULES))
    lines = []
    for name in names:
        rel = f"kernel/drivers/{name}.ko"
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(b"\x7fELF fake module " + name.encode())
        lines.append(f"{rel}:")
    (moddir / "modules.dep").write_text("\n".join(lines) + "\n")
    (moddir / "modules.builtin").write_text("")
    return root


def _tar_bytes(files: dict[str, bytes | str]) -> bytes:
    """A layer: path -> content (str values starting with '->' are symbolic links)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tf.addfile(info)
            value = files[path]
            info = tarfile.TarInfo(path)
            if isinstance(value, str) and value.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, value[2:]
                tf.addfile(info)
                continue
            data = value.encode() if isinstance(value, str) else value
            info.size, info.mode = len(data), 0o755 if path.startswith("bin/") else 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def docker_save(out: Path, files: dict[str, bytes | str], arch: str = "amd64") -> Path:
    """What `docker save` writes for a one-layer image."""
    layer = _tar_bytes(files)
    digest = hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": arch, "os": "linux", "config": {}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["test:latest"],
                            "Layers": [f"{digest}/layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tf:
        for name, data in (("manifest.json", manifest), ("config.json", config),
                           (f"{digest}/layer.tar", layer)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


OS_RELEASE = 'NAME="Tiny"\nID=tiny\nVERSION_ID="1.0"\nPRETTY_NAME="Tiny 1.0"\n'


def tiny_container(out: Path, extra: dict[str, bytes | str] | None = None) -> Path:
    """A small container image: os-release (through a usr/lib symlink, like Debian's) and a
    /bin/sh that is only a marker (the tests never run it)."""
    files: dict[str, bytes | str] = {"usr/lib/os-release": OS_RELEASE,
                                     "etc/os-release": "->../usr/lib/os-release",
                                     "bin/sh": b"#!fake shell\n"}
    files.update(extra or {})
    return docker_save(out, files)


@contextlib.contextmanager
def small_tmpfs(base: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted for the test and unmounted after (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a small tmpfs)")
    point = base / f"tmpfs-{uuid.uuid4().hex[:6]}"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                   check=True, timeout=30)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False, timeout=60)
        point.rmdir()


def debian_bundle(tmp_factory: pytest.TempPathFactory) -> Path:
    """The real minimal Debian image (one build per session; package cache warm after)."""
    if "debian" in _BUILT:
        return _BUILT["debian"]
    if os.geteuid() != 0:
        pytest.skip("Debian builds need root (mmdebstrap root mode)")
    out = tmp_factory.mktemp("generated") / "deb12-hello.bundle"
    proc = generate("-os", "debian", "-version", "bookworm", "-packages", PACKAGE,
                    "-check", CHECK, "-label", "deb12-hello", "-o", str(out), "-json")
    if proc.returncode != 0:
        raise AssertionError(f"fg-image-generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout)
    print(f"generated {out}: {info['bundle_bytes'] / 1e6:.1f} MB in {info['seconds']} s "
          f"{info['steps']}")
    _BUILT["debian"] = out
    return out
