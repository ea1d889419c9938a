"""Compiled templates in the state directory (pxe.templatecache): loaded by the next process only
when nobody else could have written them, compiled again when the template's source changed,
written only after a render succeeded.

A cache entry is planted through the cache's own interface with the true source's checksum but
code compiled from other text ("PLANTED"): a render showing that text proves the entry was
loaded; one not showing it proves it was refused.
"""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from pxe import templatecache
from pxe.inventory import Inventory, build
from pxe.render import Renderer, find_template, read_template
from pxe.setboot import render_all

NAME = "dhcp/dnsmasq.conf.j2"


def add_nodes(cfg):
    Inventory(cfg).add([build(cfg, {"name": "n1", "mac": "52:54:00:dd:00:01",
                                    "ip": "198.18.0.21"})])


def cache_files(cfg):
    folder = cfg.paths.state_dir / templatecache.FOLDER
    return sorted(folder.glob("*.jinja")) if folder.is_dir() else []


def plant(cfg, text: str = "PLANTED\n"):
    """A cache entry for NAME whose checksum is the real source's but whose code is ``text``."""
    renderer = Renderer(cfg)
    source = find_template(cfg, NAME)
    real = read_template(source)
    cache = templatecache.for_state_dir(cfg.paths.state_dir)
    bucket = cache.get_bucket(renderer.env, NAME, str(source.path), real)
    bucket.code = renderer.env.compile(text, NAME, str(source.path))
    cache.dump_bytecode(bucket)
    cache.keep()
    [path] = [p for p in cache_files(cfg) if p.name.startswith(bucket.key)]
    return path


def rendered(cfg) -> str:
    return Renderer(cfg).dhcp_config(Inventory(cfg).all())


@pytest.mark.unit
def test_a_render_keeps_its_templates_compiled_0600_in_a_0700_folder(site):
    cfg = site.cfg
    add_nodes(cfg)
    renderer = Renderer(cfg)
    text = renderer.dhcp_config(Inventory(cfg).all())
    assert cache_files(cfg) == []  # nothing written until the render succeeded
    renderer.keep_compiled()
    files = cache_files(cfg)
    assert files, "the compiled DHCP template was not kept"
    folder = cfg.paths.state_dir / templatecache.FOLDER
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert rendered(cfg) == text  # the next renderer loads it and writes the same


@pytest.mark.unit
def test_the_cache_is_loaded_when_ours_and_refused_when_others_could_write_it(site):
    cfg = site.cfg
    add_nodes(cfg)
    path = plant(cfg)
    assert rendered(cfg) == "PLANTED\n"  # proof that a trusted entry is what gets loaded
    path.chmod(0o620)  # group-writable file: refused
    assert "dhcp-host=52:54:00:dd:00:01" in rendered(cfg)
    path.chmod(0o600)
    assert rendered(cfg) == "PLANTED\n"
    if os.geteuid() == 0:  # (chown needs root)
        os.chown(path, 65534, -1)  # another user's file: refused
        assert "dhcp-host=52:54:00:dd:00:01" in rendered(cfg)
        os.chown(path, os.geteuid(), -1)
    folder = path.parent
    folder.chmod(0o770)  # a folder others could write into: refused
    assert "dhcp-host=52:54:00:dd:00:01" in rendered(cfg)
    folder.chmod(0o700)
    link = folder.parent / "elsewhere"
    folder.rename(link)
    folder.symlink_to(link)  # the folder as a link: refused
    assert "dhcp-host=52:54:00:dd:00:01" in rendered(cfg)


@pytest.mark.unit
def test_an_edited_override_is_compiled_again(site):
    cfg = site.cfg
    add_nodes(cfg)
    plant(cfg)
    override = cfg.paths.templates_dir / NAME
    override.parent.mkdir(parents=True)
    override.write_text("first {{ host_rows | length }}\n")
    renderer = Renderer(cfg)
    assert renderer.dhcp_config(Inventory(cfg).all()) == "first 1\n"
    renderer.keep_compiled()
    assert rendered(cfg) == "first 1\n"
    override.write_text("second {{ host_rows | length }}\n")  # same name, file and mtime second
    assert rendered(cfg) == "second 1\n"


@pytest.mark.unit
def test_a_corrupt_entry_is_compiled_again(site):
    cfg = site.cfg
    add_nodes(cfg)
    path = plant(cfg)
    path.write_bytes(path.read_bytes()[:40])  # torn: magic and checksum, no code
    assert "dhcp-host=52:54:00:dd:00:01" in rendered(cfg)
    path.write_bytes(b"\0" * 300)
    assert "dhcp-host=52:54:00:dd:00:01" in rendered(cfg)


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("dnsmasq", path="/usr/sbin"),
                    reason="dnsmasq is installed by tools/install-deps")
def test_a_render_the_daemon_rejects_writes_no_cache(site):
    cfg = site.cfg
    add_nodes(cfg)
    override = cfg.paths.templates_dir / NAME
    override.parent.mkdir(parents=True)
    override.write_text(read_template(find_template(cfg, NAME)).replace(
        "# One host entry", "not-a-dnsmasq-option=1\n# One host entry"))
    with pytest.raises(Exception, match="rejected"):
        render_all(cfg, reload=False)
    assert cache_files(cfg) == []
    override.unlink()
    render_all(cfg, reload=False)
    assert cache_files(cfg)
