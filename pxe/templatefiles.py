"""Where a template is read from: the site's override folder, else the packaged templates.

find_template(): a file of the same name under ``[paths] templates_dir`` (default
/etc/dynprov/templates) replaces the packaged one (pxe.assets); anything else there under that
name (a directory, a dangling link) is an error, never a silent fall-back to the packaged
template. Apart from pxe.render (which re-exports it) so that `render`'s check of the installed
DHCP config (pxe.dhcpinputs.key) finds its template files without importing the renderer.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from pxe import assets
from pxe.errors import DynprovError, NotFound

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pxe.config import Config

_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


class TemplateSource:
    """A template's name and the file it is read from. (A plain class: a dataclass is compiled
    on every start of `render`, for one record.)"""

    __slots__ = ("name", "path", "override")

    def __init__(self, name: str, path: Path, override: bool) -> None:
        object.__setattr__(self, "name", name)  # e.g. "dhcp/dnsmasq.conf.j2"
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "override", override)  # True: the site's [paths] templates_dir

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def _values(self) -> tuple:
        return (self.name, self.path, self.override)

    def __reduce__(self) -> tuple:  # pickle and copy build it again through __init__
        return (TemplateSource, self._values())

    def __eq__(self, other: object) -> bool:
        if type(other) is not TemplateSource:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return f"TemplateSource(name={self.name!r}, path={self.path!r}, override={self.override!r})"

    def describe(self) -> str:
        return f"{self.path} ({'site override' if self.override else 'packaged'})"


def find_template(cfg: Config, name: str) -> TemplateSource:
    """The file that template ``name`` is read from: the site's override if present, else ours."""
    if not _TEMPLATE_NAME.fullmatch(name) or ".." in name.split("/"):
        raise DynprovError(f"{name!r}: not a template name")
    override_dir = cfg.paths.templates_dir
    override = override_dir / name
    try:
        mode = os.stat(override).st_mode  # follows a link: a link to a file is a file
    except FileNotFoundError:
        if os.path.lexists(override):
            raise DynprovError(f"{override}: site template override is a dangling link; fix or "
                               f"remove it (the packaged {name} is not used in its place)") from None
        mode = None
    except NotADirectoryError:
        if not override_dir.is_dir():
            raise DynprovError(f"{override_dir}: paths.templates_dir is not a directory") from None
        raise DynprovError(f"{override}: a part of this path is not a directory (site template "
                           f"overrides)") from None
    except OSError as exc:
        raise DynprovError(f"{override}: cannot look at the site template override: "
                           f"{exc.strerror or exc}") from None
    if mode is not None:
        if not stat.S_ISREG(mode):
            raise DynprovError(f"{override}: site template override is not a regular file; fix or "
                               f"remove it (the packaged {name} is not used in its place)")
        return TemplateSource(name, override, True)
    packaged = assets.templates() / name
    if not packaged.is_file():
        raise NotFound(f"no template {name} (neither {override} nor the packaged {packaged})")
    return TemplateSource(name, packaged, False)
