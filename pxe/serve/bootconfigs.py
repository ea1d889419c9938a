"""Loader configs answered from the state database at request time (TFTP and HTTP).

A node's pxelinux (`pxelinux.cfg/01-<mac>`), GRUB (`grub/grub.cfg-<mac>`) and iPXE
(`ipxe/<mac>.ipxe`) configs, and the shared `pxelinux.cfg/default`, `grub/grub.cfg` and
`boot.ipxe`, are rendered from the database when a loader asks, as Warewulf's server does: so
`set-boot` of 10,000 nodes is one transaction and no files (files only for sites serving with
tftpd-hpa/nginx, `[boot] write_files`). Rendered text is cached per worker, keyed by the change
stamp writers bump after COMMIT (pxe.stamp; SQLite's own commit counter, data_version, only
while there is no stamp yet): a request costs one small read when nothing changed, and
heartbeats (bookkeeping, db.transaction) leave it warm. A service node (`serve --segment NAME`,
pxe.segments) answers only for the nodes of its segment: another segment's MAC is unknown here.
"""

from __future__ import annotations

import logging
import re
import sqlite3

from pxe import db, stamp
from pxe.config import Config
from pxe.serve import files

log = logging.getLogger("dynprov.serve.bootconfigs")

_HEX = "[0-9a-f]{2}"
# name pattern -> (loader kind, separator the name uses between MAC bytes)
_NODE_NAMES = (
    (re.compile(rf"^pxelinux\.cfg/01-({_HEX}(?:-{_HEX}){{5}})$"), "pxelinux", "-"),
    (re.compile(rf"^grub/grub\.cfg-({_HEX}(?::{_HEX}){{5}})$"), "grub", ":"),
    (re.compile(rf"^ipxe/({_HEX}(?:-{_HEX}){{5}})\.ipxe$"), "ipxe", "-"),
)
_PREFIXES = ("pxelinux.cfg/", "grub/grub.cfg", "ipxe/", "boot.ipxe")
MAX_CACHED = 65536  # rendered configs kept per worker (a few hundred bytes each)


class BootConfigs:
    """Render-on-request for one worker process (opens its own connection on first use)."""

    def __init__(self, cfg: Config):
        from pxe import segments
        from pxe.render import SHARED_TEMPLATES

        self.cfg = cfg
        self.segment = segments.load(cfg).name  # a service node answers for its segment only
        self.db_path = str(cfg.db_path)
        self.shared_names = frozenset(SHARED_TEMPLATES)
        self._conn: sqlite3.Connection | None = None
        self._renderer = None
        self._key: tuple[str, int] | None = None
        self._cache: dict[str, bytes | None] = {}
        self._images: dict[str, object] = {}

    @staticmethod
    def claims(name: str) -> bool:
        """Could ``name`` (a clean relative path) be a loader config? Cheap prefix test."""
        return name.startswith(_PREFIXES)

    def lookup(self, name: str) -> bytes | None:
        """The config for ``name`` (clean, relative); None if ``name`` is not a loader config.

        Raises files.Missing for a config name of a MAC the inventory does not know (the
        loader then tries its next name: pxelinux its `default`, GRUB's dispatcher `exit`s).
        """
        if not name.startswith(_PREFIXES):
            return None
        what = self._parse(name)
        if what is None:
            return None  # another file under those folders: the file tree's
        key = self._current_key()
        if key is None:
            return None  # no database yet: whatever the file tree has
        if key != self._key:
            self._key, self._cache, self._images = key, {}, {}
        try:
            data = self._cache[name]
        except KeyError:
            data = self._render(*what)
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[name] = data
        if data is None:
            raise files.Missing(name)
        return data

    def _parse(self, name: str) -> tuple[str, str | None] | None:
        """(kind, colon MAC) of a loader config name; ("shared:<name>", None) for the shared."""
        if name in self.shared_names:
            return "shared:" + name, None
        lowered = name.lower()  # loaders ask in lower case; a hand-typed URL may not
        for pattern, kind, sep in _NODE_NAMES:
            m = pattern.match(lowered)
            if m:
                return kind, m.group(1).replace(sep, ":")
        return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- inside ----------------------------------------------------------------------------
    def _current_key(self) -> tuple[str, int] | None:
        mark = "" if db.is_url(self.cfg.database) else stamp.read(self.db_path)  # before the read
        conn = self._connection()
        if conn is None:
            return None
        if mark:  # SQLite: the stamp alone (data_version also moves with every heartbeat)
            return mark, 0
        return mark, db.change_counter(conn)  # PostgreSQL: the stamp row, read before the data

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None:
            try:
                self._conn = db.connect(self.cfg.database, create=False)
                self._conn.execute("SELECT 1 FROM nodes LIMIT 1")
            except sqlite3.Error as exc:
                log.debug("boot configs: no state database yet (%s)", exc)
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
        return self._conn

    def _render(self, kind: str, mac: str | None) -> bytes | None:
        from pxe.render import SHARED_TEMPLATES, Renderer

        if self._renderer is None:
            self._renderer = Renderer(self.cfg)
        renderer = self._renderer
        if mac is None:  # the unknown-MAC default may boot the discovery image
            from pxe.images import Catalog

            assert self._conn is not None
            images = {i.label: i for i in Catalog(self.cfg, self._conn).all()}
            ctx = renderer.shared_context(images)
            return renderer.template(SHARED_TEMPLATES[kind[7:]]).render(ctx).encode()
        node = self._node(mac)
        if node is None:
            return None
        image = self._image(node.desired_os) if node.boot_target == "os" else None
        if node.boot_target == "os" and image is None:
            log.error("node %s: image %r is not in the catalog; it boots its local disk",
                      node.name, node.desired_os)
        context = renderer.node_boot_context(node, image)
        return renderer.node_boot_file(kind, context, mac).encode()

    def _node(self, mac: str):
        from pxe.inventory import _node_from_row

        assert self._conn is not None
        row = self._conn.execute(
            "SELECT n.* FROM macs m JOIN nodes n ON n.name = m.node WHERE m.mac = ? AND "
            "COALESCE((SELECT s.segment FROM node_segments s WHERE s.node = n.name), '') = ?",
            (mac, self.segment)).fetchone()
        return _node_from_row(row, (mac,)) if row is not None else None

    def _image(self, label: str | None):
        from pxe.errors import NotFound
        from pxe.images import Catalog

        if not label:
            return None
        if label not in self._images:
            try:
                self._images[label] = Catalog(self.cfg, self._conn).get(label)
            except NotFound:
                self._images[label] = None
        return self._images[label]
