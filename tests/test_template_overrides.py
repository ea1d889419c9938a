"""Site template overrides: a file under [paths] templates_dir replaces the packaged template of the
same name; anything broken there is an error naming it, never a silent fall-back to ours."""

from __future__ import annotations

import os
import shutil
import tomllib

import pytest

from pxe import assets, config
from pxe.errors import DynprovError, InputError
from pxe.inventory import Inventory, build
from pxe.render import Renderer, find_template, template_env
from pxe.setboot import render_all

needs_dnsmasq = pytest.mark.skipif(not shutil.which("dnsmasq", path="/usr/sbin"),
                                   reason="dnsmasq is installed by tools/install-deps")


def add_nodes(cfg) -> None:
    Inventory(cfg).add([build(cfg, {"name": "n001", "macs": ["52:54:00:aa:00:01"], "ip": "198.18.0.11"}),
                        build(cfg, {"name": "n002", "macs": ["52:54:00:aa:00:02"], "ip": "198.18.0.12",
                                    "firmware": "uefi"})])


def override(cfg, name: str, text: str | None = None, transform=None):
    """Write a site override of template ``name`` (default: the packaged text, transformed)."""
    path = cfg.paths.templates_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        text = (assets.templates() / name).read_text()
        text = transform(text) if transform else text
    path.write_text(text)
    return path


@pytest.mark.unit
def test_an_override_replaces_only_the_template_of_its_name(site):
    cfg = site.cfg
    add_nodes(cfg)
    path = override(cfg, "boot/pxelinux.cfg.j2",
                    transform=lambda t: "# site: serial console everywhere\n" + t)
    assert find_template(cfg, "boot/pxelinux.cfg.j2").path == path
    assert find_template(cfg, "boot/pxelinux.cfg.j2").override
    grub = find_template(cfg, "boot/grub.cfg.j2")
    assert not grub.override and grub.path == assets.templates() / "boot" / "grub.cfg.j2"
    renderer = Renderer(cfg)
    files = renderer.all_boot_files(Inventory(cfg).all(), {})
    assert files["pxelinux.cfg/01-52-54-00-aa-00-01"].startswith("# site: serial console everywhere\n")
    assert not files["grub/grub.cfg-52:54:00:aa:00:02"].startswith("# site")
    assert renderer.sources["boot/pxelinux.cfg.j2"].override
    assert not renderer.sources["boot/ipxe.j2"].override


@pytest.mark.unit
def test_the_status_page_takes_overrides_too(site):
    path = override(site.cfg, "web/status.html.j2", text="<p>{{ site }} our page</p>\n")
    template = template_env(site.cfg, autoescape=True).get_template("web/status.html.j2")
    assert template.filename == str(path)
    assert template.render(site="x<y") == "<p>x&lt;y our page</p>"


@pytest.mark.unit
@pytest.mark.parametrize("make_broken,complaint", [
    (lambda p: p.mkdir(), "is not a regular file"),
    (lambda p: os.symlink(p.parent / "missing.j2", p), "is a dangling link"),
    (lambda p: p.write_bytes(b"\xff\xfe{{ not utf-8 }}\n"), "is not UTF-8 text"),
    (lambda p: p.write_text("{% if %}\n"), r"from .* \(site override\), line 1: TemplateSyntaxError"),
    (lambda p: p.write_text("{{ no_such_variable }}\n"), "UndefinedError: 'no_such_variable' is undefined"),
], ids=["directory", "dangling-link", "not-utf8", "syntax", "undefined"])
def test_a_broken_override_is_an_error_not_a_fallback(site, make_broken, complaint):
    cfg = site.cfg
    add_nodes(cfg)
    path = cfg.paths.templates_dir / "boot" / "pxelinux.cfg.j2"
    path.parent.mkdir(parents=True)
    make_broken(path)
    with pytest.raises(DynprovError, match=complaint) as info:
        Renderer(cfg).all_boot_files(Inventory(cfg).all(), {})
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.unit
def test_templates_dir_that_is_a_file_is_refused(site):
    cfg = site.cfg
    cfg.paths.templates_dir.write_text("oops")
    with pytest.raises(DynprovError, match="paths.templates_dir is not a directory"):
        find_template(cfg, "boot/ipxe.j2")


@pytest.mark.unit
@pytest.mark.parametrize("name", ["../dynprov.toml", "/etc/passwd", "boot/../../x", "", "boot//x"])
def test_template_names_cannot_leave_the_folders(site, name):
    with pytest.raises(DynprovError, match="not a template name"):
        find_template(site.cfg, name)


@pytest.mark.unit
def test_config_templates_dir_and_its_older_name(site, tmp_path):
    text = site.config_path.read_text()
    assert site.cfg.paths.templates_dir == site.root / "templates"
    old = text.replace(f'templates_dir = "{site.root / "templates"}"', f'templates = "{tmp_path / "t"}"')
    assert config.from_dict(tomllib.loads(old), site.config_path).paths.templates_dir == tmp_path / "t"
    both = text.replace("[paths]\n", f'[paths]\ntemplates = "{tmp_path / "t"}"\n')
    with pytest.raises(InputError, match="paths.templates: older name of paths.templates_dir"):
        config.from_dict(tomllib.loads(both), site.config_path)
    relative = text.replace(f'templates_dir = "{site.root / "templates"}"', 'templates_dir = "t"')
    with pytest.raises(InputError, match="paths.templates_dir: must be an absolute path"):
        config.from_dict(tomllib.loads(relative), site.config_path)
    default = text.replace(f'templates_dir = "{site.root / "templates"}"\n', "")
    assert str(config.from_dict(tomllib.loads(default), site.config_path).paths.templates_dir) \
        == "/etc/dynprov/templates"


@pytest.mark.integration
@needs_dnsmasq
def test_render_check_names_the_file_behind_every_output(site):
    cfg = site.cfg
    add_nodes(cfg)
    path = override(cfg, "dhcp/dnsmasq.conf.j2", transform=lambda t: "# site override\n" + t)
    proc = site.run("render", "--check")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.strip().split(": ", 1) for line in proc.stdout.splitlines()
                 if line.startswith("  "))
    assert lines["dhcp/dnsmasq.conf.j2"] == f"{path} (site override)"
    for name in ("boot/pxelinux.cfg.j2", "boot/grub.cfg.j2", "boot/ipxe.j2", "boot/ipxe-main.j2",
                 "boot/pxelinux-default.cfg.j2", "boot/grub-main.cfg.j2"):
        assert lines[name] == f"{assets.templates() / name} (packaged)"
    assert "boot files: 7 rendered" in proc.stdout  # 3 shared + pxelinux/ipxe for n001, grub/ipxe n002
    assert not cfg.dhcp.config_file.exists()  # --check installs nothing
    assert not cfg.paths.tftp_root.exists() or not any(cfg.paths.tftp_root.rglob("*.cfg*"))


@pytest.mark.integration
@needs_dnsmasq
def test_an_override_the_daemon_rejects_is_refused_and_ours_not_used(site):
    cfg = site.cfg
    add_nodes(cfg)
    render_all(cfg)
    good = cfg.dhcp.config_file.read_text()
    before = site.snapshot()
    path = override(cfg, "dhcp/dnsmasq.conf.j2", transform=lambda t: t + "\nnot-a-dnsmasq-option=1\n")
    before[str(path.relative_to(site.root))] = path.read_bytes()
    for argv in (("render", "--check"), ("render", "--no-reload")):
        proc = site.run(*argv)
        assert proc.returncode == 1, proc.stdout
        assert "dnsmasq rejected the rendered config" in proc.stderr
        assert f"rendered from {path} (site override)" in proc.stderr
        assert site.snapshot() == before
    assert cfg.dhcp.config_file.read_text() == good
