"""-from-oci: an exported container image (``docker save``, ``podman save``, an OCI image layout
tar) becomes the root tree of an image.

The unpacking is pxe.bundle's (``tree_from_container``): layers applied in order, whiteouts
honoured, every path resolved inside the tree, device files refused, layer digests checked. This
module only checks the file first and says what it expected when it is not a container image.
"""

from __future__ import annotations

import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pxe import bundle
from pxe.errors import InputError


@dataclass(frozen=True)
class Unpacked:
    tree: Path
    arch: str
    os_name: str
    layers: int
    owners: dict[str, tuple[int, int, str, str]]


def check(tarball: Path) -> int:
    """A readable regular file that is a tar archive; returns its size."""
    path = Path(tarball)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"-from-oci {path}: no such file") from None
    except PermissionError:
        raise InputError(f"-from-oci {path}: permission denied") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"-from-oci {path}: not a regular file")
    try:
        is_tar = tarfile.is_tarfile(path)
    except OSError as exc:
        raise InputError(f"-from-oci {path}: {exc.strerror or exc}") from None
    if not is_tar:
        raise InputError(f"-from-oci {path}: not a container image: not a tar archive (expected "
                         "the output of `docker save IMAGE -o FILE` or `podman save "
                         "--format oci-archive IMAGE -o FILE`)")
    return st.st_size


def unpack(tarball: Path, tree: Path) -> Unpacked:
    """Unpack the container image into the new directory ``tree``."""
    check(tarball)
    try:
        image = bundle.tree_from_container(Path(tarball), tree)
    except InputError as exc:
        raise InputError(f"-from-oci: {exc}") from None
    return Unpacked(tree=tree, arch=image.arch, os_name=image.os_name, layers=image.layers,
                    owners=image.owners)
