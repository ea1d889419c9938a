"""`pxe-stage render`: DHCP config (checked by the daemon) + every boot file + boot loaders."""

from __future__ import annotations

import argparse

from pxe.cli.common import load_config
from pxe.config import Config
from pxe.setboot import RenderReport, render_all


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render and install DHCP and boot configs",
                       description="Render the DHCP config from the inventory, check it with the "
                                   "daemon itself, install it atomically and reload (only when "
                                   "what it is made of changed since it was installed: nodes' "
                                   "DHCP facts, the config, the templates, the daemon); install "
                                   "the boot loaders into the TFTP root, and every node's boot "
                                   "files where [boot] write_files is on.")
    p.add_argument("--check", action="store_true",
                   help="render everything in memory, check the DHCP config with the daemon and "
                        "list which template file (site override or packaged) each output came "
                        "from; install nothing")
    p.add_argument("--no-reload", action="store_true", help="do not run the reload command")
    p.add_argument("--servers", action="store_true",
                   help="also write configs for dnsmasq's TFTP, tftpd-hpa and nginx (large "
                        "sites running those instead of serve's) into [serve] "
                        "standard_configs_dir")
    p.add_argument("--segment", metavar="NAME",
                   help="render for this segment's boot server: only its nodes (default: "
                        "[segment] name, else the primary's nodes)")
    p.set_defaults(func=cmd_render)


def cmd_render(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    report = render_all(cfg, reload=not args.no_reload, check_only=args.check,
                        servers=args.servers, segment=args.segment)
    if args.check:
        print(f"{cfg.dhcp.backend}: rendered config passes the daemon's check")
        print(f"boot files: {report.boot_files} rendered")
        print(f"templates (site overrides in {cfg.paths.templates_dir}):")
        for name, source in sorted(report.sources.items()):
            print(f"  {name}: {source.describe()}")
        return 0
    print_report(cfg, report)
    if args.servers:
        from pxe.serve import settings

        print(f"standard server configs: {settings.load(cfg).standard_configs_dir}")
    return 0


def print_report(cfg: Config, report: RenderReport) -> None:
    """What an install did (render, and set-boot --render)."""
    print(f"dhcp ({cfg.dhcp.backend}) {cfg.dhcp.config_file}: "
          f"{'installed' if report.dhcp_changed else 'unchanged'}")
    print(f"boot files: {report.boot_files} ({report.boot_changed} changed, "
          f"{len(report.pruned)} stale removed)")
    for name, status in report.loaders.items():
        print(f"loader {name}: {status}")
