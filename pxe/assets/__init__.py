"""Where the files dynprov ships beside its code are: templates, the initramfs sources, units.

In the source tree they stay at the top (``templates/``, ``initramfs/``, ``contrib/systemd/``) where
a reader looks for them; pyproject.toml maps them into this package (``pxe.assets.templates`` ...)
so that a wheel carries them. Read them through here, never through ``__file__`` arithmetic
elsewhere: a checkout (tests, ``pip install -e``) finds the top-level folders, an installed wheel
finds its own copies through importlib.resources.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pxe.errors import DynprovError

# Package-relative name -> folder in the source tree (the same mapping as pyproject.toml's).
SOURCE_DIRS = {
    "templates": "templates",
    "initramfs": "initramfs",
    "systemd": "contrib/systemd",
    "torque": "contrib/torque",
    "slurm": "contrib/slurm",
}
_CHECKOUT = Path(__file__).resolve().parent.parent.parent


@cache
def directory(name: str) -> Path:
    """The real directory holding asset folder ``name`` (one of SOURCE_DIRS)."""
    source = _CHECKOUT / SOURCE_DIRS[name]
    if (_CHECKOUT / "pyproject.toml").is_file() and source.is_dir():
        return source  # a checkout: the folder a reader edits, not a copy
    import importlib.resources  # only an installed wheel looks here (~1 ms to import)

    packaged = importlib.resources.files(__name__) / name
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    raise DynprovError(f"dynprov's {SOURCE_DIRS[name]}/ files are missing from this installation "
                       f"(looked in {packaged}); reinstall the package")


def templates() -> Path:
    return directory("templates")


def initramfs() -> Path:
    return directory("initramfs")


def systemd() -> Path:
    return directory("systemd")


def slurm() -> Path:
    return directory("slurm")
