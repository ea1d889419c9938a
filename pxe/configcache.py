"""The checked site config, kept in the state directory so a short command does not check it again.

Checking dynprov.toml costs a command more than its work: the TOML parser (~7 ms to import),
netaddr (~12 ms) and the checks themselves. pxe.config.load checks the file once, then stores the
result here, in ``<state_dir>/config.cache`` (marshal, mode 0600: the file may name a database URL).
An entry is used only when all of these still hold, else the config is checked again:
  - the same text, compared byte for byte (an edit that keeps the size and the mtime tick is seen);
  - the same file: path, device, inode, size, mtime_ns (a file replaced by another is seen);
  - the same code: this Python, and the size/mtime/inode of pxe/config.py, pxe/validate.py and this
    module (an upgrade checks again);
  - written by this user or root, a regular file no one else may read or write (never a link);
  - the checked config names, as its state_dir, the folder the entry was found in.
The folder is found by a line scan of the text for ``[paths] state_dir`` (no TOML parser); the scan
only says where to look, and any doubt (no such line, two, an escaped string) means no cache.
Anything unreadable, stale or foreign is ignored, never an error; a failed write is a miss next time.
Only what dynprov.toml holds is stored (never the BMC secrets file's contents).
"""

from __future__ import annotations

import marshal
import os
import sys
from pathlib import Path, PurePath

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pxe.config import Config

CACHE_NAME = "config.cache"
FORMAT = 1  # bump when the stored tuple changes
MAX_BYTES = 4 << 20  # the config is at most 1 MiB (pxe.config.MAX_CONFIG_BYTES); its text twice
# Section fields of Config, in the order stored (each a pxe.config._Record).
SECTIONS = ("network", "dhcp", "paths", "boot", "groups", "limits", "state")
_CODE = ("config.py", "validate.py", "configcache.py")


def cache_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / CACHE_NAME


def state_dir_of(text: str) -> str | None:
    """The ``state_dir`` of the ``[paths]`` table as plainly written (one line, a quoted string
    without escapes), or None. Only where to look for the cache (see the module's docstring)."""
    found, table = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped.split("#", 1)[0].strip()
        elif stripped.startswith(("state_dir", "paths.state_dir")) and "=" in stripped:
            key, value = (part.strip() for part in stripped.split("=", 1))
            if (key, table) in (("paths.state_dir", None), ("state_dir", "[paths]")):
                found.append(_plain_string(value))
    return found[0] if len(found) == 1 else None


def _plain_string(value: str) -> str | None:
    """``"text"`` or ``'text'`` (then an optional comment) without backslashes, else None."""
    if len(value) < 2 or value[0] not in "\"'":
        return None
    end = value.find(value[0], 1)
    if end < 0 or "\\" in value[1:end] or value[end + 1:].strip()[:1] not in ("", "#"):
        return None
    return value[1:end]


def _code_identity() -> tuple:
    here = os.path.dirname(os.path.abspath(__file__))
    out: list = [FORMAT, sys.hexversion]
    for name in _CODE:
        try:
            st = os.stat(os.path.join(here, name))
            out += [st.st_ino, st.st_size, st.st_mtime_ns]
        except OSError:
            out.append(None)
    return tuple(out)


def _key(path: str | os.PathLike[str], st: os.stat_result) -> tuple:
    return (_code_identity(), str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _encode(value: object) -> object:
    return ("path", str(value)) if isinstance(value, PurePath) else ("value", value)


def _decode(pair: tuple) -> object:
    kind, value = pair
    return Path(value) if kind == "path" else value


def lookup(path: str | os.PathLike[str], text: str, st: os.stat_result) -> Config | None:
    """The checked config of ``text`` (read from ``path``, fstat ``st``) if a valid entry holds it."""
    state_dir = state_dir_of(text)
    if state_dir is None or not os.path.isabs(state_dir):
        return None
    try:
        fd = os.open(cache_path(state_dir),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        own = os.fstat(fd)
        import stat

        if (not stat.S_ISREG(own.st_mode) or own.st_uid not in (os.geteuid(), 0)
                or own.st_mode & 0o077 or own.st_size > MAX_BYTES):
            return None
        blob = os.read(fd, MAX_BYTES + 1)
        entry = marshal.loads(blob)
        key, cached_text, sections, raw = entry
    except (OSError, ValueError, EOFError, TypeError):
        return None
    finally:
        os.close(fd)
    if key != _key(path, st) or cached_text != text:
        return None
    from pxe import config

    try:
        values = {name: getattr(config, name.capitalize())(*map(_decode, fields))
                  for name, fields in zip(SECTIONS, sections, strict=True)}
    except (TypeError, ValueError):
        return None
    if values["paths"].state_dir != Path(state_dir):  # (as pathlib compares: "/x/" is "/x")
        return None
    return config.Config(path=Path(path), raw=raw, **values)


def store(cfg: Config, text: str, st: os.stat_result) -> None:
    """Keep ``cfg`` (checked from ``text``, fstat ``st``) for the next command, if its state
    folder exists and the scan will find it there; silently nothing when it cannot."""
    scanned, state_dir = state_dir_of(text), str(cfg.paths.state_dir)
    if scanned is None or Path(scanned) != cfg.paths.state_dir or not os.path.isdir(state_dir):
        return
    try:
        sections = tuple(tuple(_encode(v) for v in getattr(cfg, name)._values())
                         for name in SECTIONS)
        blob = marshal.dumps((_key(cfg.path, st), text, sections, cfg.raw))
    except (ValueError, TypeError):  # a TOML date or time in the raw sections: not cached
        return
    dest = cache_path(state_dir)
    tmp = dest.with_name(f".{CACHE_NAME}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError:  # not ours to write (another user's state folder, a read-only disk)
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        # No fsync: a cache lost or cut short in a crash fails the checks and is only a miss.
        os.replace(tmp, dest)
    except OSError:
        pass
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
