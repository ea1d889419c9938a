"""Helpers for the segment tests (no tests here): a service node's config sharing the primary's
state database, `pxe-stage serve` started again and again on one site."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from test_serve_support import ServeProcess, serve_process

from tests.conftest import Site


def service_site(primary: Site, root: Path, primary_url: str | None, *,
                 name: str | None = None, **extra: object) -> Site:
    """A second config for the same state database: its own roots and DHCP config file, a
    [segment] section (primary_url, name if given, the ``extra`` keys)."""
    root.mkdir(parents=True)
    text = primary.config_path.read_text()
    for own in ("\n[serve]\n", "\n[segment]\n"):  # appended last (serve_process, the tests)
        text = text.split(own)[0]
    cfg = primary.cfg
    text = text.replace(f'tftp_root = "{cfg.paths.tftp_root}"', f'tftp_root = "{root / "tftp"}"')
    text = text.replace(f'http_root = "{cfg.paths.http_root}"', f'http_root = "{root / "http"}"')
    text = text.replace(f'config_file = "{cfg.dhcp.config_file}"',
                        f'config_file = "{root / "dnsmasq.conf"}"')
    lines = ["", "[segment]"]
    lines += [f'primary_url = "{primary_url}"'] if primary_url else []
    lines += [f'name = "{name}"'] if name else []
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path = root / "dynprov.toml"
    path.write_text(text + "\n".join(lines) + "\n")
    return Site(root=root, config_path=path)


@contextlib.contextmanager
def serve_again(site: Site, *extra: str, **config: object) -> Iterator[ServeProcess]:
    """serve_process, again and again on one site (its [serve] section replaced each time)."""
    path = site.config_path
    path.write_text(path.read_text().split("\n[serve]\n")[0])
    with serve_process(site, "--no-tftp", *extra, **{"http_workers": 1, **config}) as server:
        yield server


