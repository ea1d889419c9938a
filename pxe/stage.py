"""Put rendered boot files and boot loaders into the TFTP root (and the HTTP root for iPXE).

Loader configs are files only where tftpd-hpa/nginx serve them (`[boot] write_files`);
`pxe-stage serve` renders them per request.

Every file goes in by temp file + rename, so a node that is booting right now reads either
the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from pxe import atomic
from pxe.config import Config
from pxe.render import GRUB_DIR, IPXE_DIR, PXELINUX_DIR

# Debian package paths of the loaders (see shared facts): name in the TFTP root -> candidates.
LOADER_SOURCES: dict[str, tuple[str, ...]] = {
    "pxelinux.0": ("/usr/lib/PXELINUX/pxelinux.0",),
    "ldlinux.c32": ("/usr/lib/syslinux/modules/bios/ldlinux.c32",),
    "grubx64.efi": ("/usr/lib/grub/x86_64-efi/monolithic/grubnetx64.efi",),
    "ipxe.efi": ("/usr/lib/ipxe/ipxe.efi", "/boot/ipxe.efi"),
    "snponly.efi": ("/usr/lib/ipxe/snponly.efi",),
    "undionly.kpxe": ("/usr/lib/ipxe/undionly.kpxe",),
}


def write_files(cfg: Config, files: Mapping[str, str]) -> int:
    """Write boot files into the root their loader reads from. Returns how many changed."""
    batch = {root_for(cfg, rel) / rel: text.encode() for rel, text in files.items()}
    return len(atomic.write_many(batch))


def root_for(cfg: Config, rel: str) -> Path:
    """iPXE scripts are fetched over HTTP; everything else by TFTP."""
    return cfg.paths.http_root if rel.startswith(IPXE_DIR + "/") or rel == "boot.ipxe" \
        else cfg.paths.tftp_root


def prune(cfg: Config, keep: Iterable[str]) -> list[str]:
    """Remove per-node boot files of MACs no longer in the inventory (full render only)."""
    keep_set = set(keep)
    removed = []
    patterns = ((PXELINUX_DIR, "01-*"), (GRUB_DIR, "grub.cfg-*"), (IPXE_DIR, "*.ipxe"))
    for root in (cfg.paths.tftp_root, cfg.paths.http_root):
        for folder, pattern in patterns:
            base = root / folder
            if not base.is_dir():
                continue
            for path in base.glob(pattern):
                rel = f"{folder}/{path.name}"
                if rel not in keep_set:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    removed.append(rel)
    return removed


def remove_shared(cfg: Config) -> list[str]:
    """Remove the shared loader configs (default, dispatchers) of an earlier file tree."""
    from pxe.render import SHARED_TEMPLATES

    removed = []
    for rel in SHARED_TEMPLATES:
        with contextlib.suppress(FileNotFoundError):
            (root_for(cfg, rel) / rel).unlink()
            removed.append(rel)
    return removed


def install_loaders(cfg: Config) -> dict[str, str]:
    """Copy the boot loaders this machine has into the TFTP root. Returns name -> status.
    A copy carries its source's size and mtime: when both still match, it is up to date
    without reading the ~4 MB of loaders twice on every render (rsync's quick check)."""
    status: dict[str, str] = {}
    for name, candidates in LOADER_SOURCES.items():
        source = next((Path(c) for c in candidates if Path(c).is_file()), None)
        dest = cfg.paths.tftp_root / name
        if source is None:
            status[name] = "not available on this machine"
            continue
        src = source.stat()
        try:
            have = dest.stat()
            if (have.st_size, have.st_mtime_ns) == (src.st_size, src.st_mtime_ns):
                status[name] = "up to date"
                continue
        except OSError:
            pass
        data = source.read_bytes()
        status[name] = "installed" if atomic.write_bytes(dest, data) else "up to date"
        os.utime(dest, ns=(src.st_atime_ns, src.st_mtime_ns))
    return status


def copy_tree_file(src: Path, dest: Path) -> None:
    import shutil  # (with bz2, lzma: ~2 ms) only when a file is copied

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
