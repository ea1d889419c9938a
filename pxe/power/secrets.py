"""BMC passwords: from a file only root (or the owner running us) can read, never from argv.

The secrets file (``[paths] secrets_file``, default ``/etc/dynprov/bmc-secrets``) is TOML, one
key per secret; a node's ``bmc_secret`` names the key, and nodes without one use ``default``:

```toml
# mode 0600, owner root
default = "the-usual-password"
rack7 = "another one"
```
A node may instead say ``bmc_secret = "file:/etc/dynprov/bmc/n001"``: that file's first line is the
password. Either file is refused, with the command to fix it, when group or others have any
permission on it or when it belongs to another user. A secret is never logged or printed; errors
name the key or the file, never the value.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path

from pxe.errors import DynprovError


class SecretError(DynprovError):
    """A secret that cannot be used; ``fatal`` ones (unsafe or unreadable files) stop the call."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


def read_private(path: Path) -> str:
    """The text of a file that only its owner (root or us) may read; refuse anything looser."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretError(f"{path}: BMC secrets file not found", fatal=True) from None
    except OSError as exc:
        raise SecretError(f"{path}: cannot open the BMC secrets file: {exc.strerror}",
                          fatal=True) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{path}: not a regular file", fatal=True)
        if st.st_mode & 0o077:
            raise SecretError(
                f"{path}: refusing a BMC secrets file with mode {stat.S_IMODE(st.st_mode):04o} "
                f"(group or others may read it); run: chmod 600 {path}", fatal=True)
        if st.st_uid not in (0, os.geteuid()):
            raise SecretError(f"{path}: refusing a BMC secrets file owned by uid {st.st_uid} "
                              "(must be root or the user running dynprov)", fatal=True)
        with os.fdopen(fd, "r", encoding="utf-8", closefd=True) as fh:
            fd = -1
            return fh.read()
    finally:
        if fd >= 0:
            os.close(fd)


class SecretStore:
    """Looks secrets up by reference; each file is checked and read once."""

    def __init__(self, secrets_file: Path):
        self.path = Path(secrets_file)
        self._table: dict[str, str] | None = None
        self._files: dict[str, str] = {}

    def _load_table(self) -> dict[str, str]:
        if self._table is None:
            text = read_private(self.path)
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                # The parser's message may quote a line, i.e. a password: give the position only.
                pos = re.search(r"line \d+, column \d+", str(exc))
                where = pos.group(0) if pos else "position unknown"
                raise SecretError(f"{self.path}: not valid TOML ({where})", fatal=True) from None
            bad = sorted(k for k, v in data.items() if not isinstance(v, str) or not v)
            if bad:
                raise SecretError(f"{self.path}: key {bad[0]!r} must be a non-empty string",
                                  fatal=True)
            self._table = data
        return self._table

    def lookup(self, ref: str | None) -> str:
        """The password for a node's ``bmc_secret`` (None = the ``default`` key)."""
        if ref and ref.startswith("file:"):
            path = ref[len("file:"):]
            if path not in self._files:
                lines = read_private(Path(path)).splitlines()
                if not lines or not lines[0]:
                    raise SecretError(f"{path}: the first line (the password) is empty")
                self._files[path] = lines[0]
            return self._files[path]
        key = ref or "default"
        table = self._load_table()
        if key not in table:
            hint = "" if ref else " (the node has no bmc_secret, so the 'default' key is used)"
            raise SecretError(f"no key {key!r} in {self.path}{hint}")
        return table[key]
