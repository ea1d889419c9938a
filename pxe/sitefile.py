"""Editing a file the site owns (moab.cfg, slurm.conf, helpers.conf): back up, then replace.

The scheduler faces keep their own marked block in such a file; how the block is merged is theirs,
the careful write is shared: UTF-8 only, unchanged text is not rewritten, a timestamped backup
beside the file, an atomic replace that keeps the file's mode and owner.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pxe import atomic
from pxe.errors import DynprovError

Merge = Callable[[str], tuple[str, list[str]]]  # old text -> (new text, warnings)


def rewrite(path: Path, merge: Merge, *, create: bool = False
            ) -> tuple[bool, Path | None, list[str]]:
    """Apply ``merge`` to ``path``; returns (changed, backup path or None, warnings)."""
    try:
        data = path.read_bytes()
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        if not create:
            raise DynprovError(f"{path}: no such file") from None
        data, st = b"", None
    except OSError as exc:
        raise DynprovError(f"{path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DynprovError(f"{path}: not UTF-8 text; refusing to edit it") from None
    new, warnings = merge(text)
    if new == text:
        return False, None, warnings
    mode = st.st_mode & 0o7777 if st is not None else 0o644
    backup = None
    if data:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.name}.dynprov-{stamp}.bak")
        n = 0
        while backup.exists():
            n += 1
            backup = path.with_name(f"{path.name}.dynprov-{stamp}-{n}.bak")
        atomic.write_bytes(backup, data, mode=mode)
    atomic.write_bytes(path, new.encode("utf-8"), mode=mode)
    if st is not None:
        try:
            os.chown(path, st.st_uid, st.st_gid)
        except PermissionError:
            pass
    return True, backup, warnings


def splice(text: str, begin: str, end: str, block: Sequence[str]) -> tuple[str, list[str]]:
    """``text`` with the block between the ``begin``/``end`` marker lines replaced (or appended
    when there is none), and the lines outside it (for the face's own warnings). Damaged markers
    raise, so nothing is written."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, ln in enumerate(lines) if ln.rstrip("\r\n") == begin]
    ends = [i for i, ln in enumerate(lines) if ln.rstrip("\r\n") == end]
    new_block = [begin + "\n", *(ln + "\n" for ln in block), end + "\n"]
    if not begins and not ends:
        head = lines
        if head and not head[-1].endswith("\n"):
            head = [*head[:-1], head[-1] + "\n"]
        return "".join([*head, *new_block]), head
    if len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        b, e = begins[0], ends[0]
        return "".join([*lines[:b], *new_block, *lines[e + 1:]]), [*lines[:b], *lines[e + 1:]]
    raise DynprovError(f"the dynprov block markers are damaged (expected one {begin!r} line, "
                       f"then one {end!r} line): fix them by hand")
