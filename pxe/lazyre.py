"""Regular expressions compiled on first use, not at import.

A module-level ``re.compile`` costs every command that imports the module (~0.1-0.5 ms each;
pxe.validate, pxe.nodeset and pxe.hwfacts held 14 on `set-boot`'s path) whether or not the
pattern is used. ``lazy(...)`` has the same methods and compiles once, when one is first called.
"""

from __future__ import annotations

import re


class lazy:  # noqa: N801 - stands where re.compile stood
    """``re.compile(pattern, flags)``, deferred to the first match."""

    __slots__ = ("_pattern", "_flags", "_compiled")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self._pattern, self._flags, self._compiled = pattern, flags, None

    @property
    def compiled(self) -> re.Pattern[str]:
        if self._compiled is None:
            self._compiled = re.compile(self._pattern, self._flags)
        return self._compiled

    @property
    def pattern(self) -> str:
        return self._pattern

    def match(self, *args):  # type: ignore[no-untyped-def]
        return self.compiled.match(*args)

    def fullmatch(self, *args):  # type: ignore[no-untyped-def]
        return self.compiled.fullmatch(*args)

    def search(self, *args):  # type: ignore[no-untyped-def]
        return self.compiled.search(*args)

    def sub(self, *args):  # type: ignore[no-untyped-def]
        return self.compiled.sub(*args)

    def findall(self, *args):  # type: ignore[no-untyped-def]
        return self.compiled.findall(*args)

    def finditer(self, *args):  # type: ignore[no-untyped-def]
        return self.compiled.finditer(*args)

    def split(self, *args):  # type: ignore[no-untyped-def]
        return self.compiled.split(*args)
