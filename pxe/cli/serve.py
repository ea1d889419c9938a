"""`pxe-stage serve`: TFTP, HTTP boot files, node call-home and metrics in one daemon."""

from __future__ import annotations

import argparse

from pxe.cli.common import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the provisioning server (TFTP, HTTP boot files, call-home, metrics)",
        description="Serve the TFTP root (read-only TFTP with blksize/tsize/timeout/windowsize), "
                    "the HTTP root (boot files with Range and sendfile), POST /report for the "
                    "nodes' call-home, /healthz and /metrics (Prometheus). Settings come from "
                    "the [serve] section of the site config; these flags override it. Runs in "
                    "the foreground and logs to stderr; SIGTERM stops it.")
    p.add_argument("--tftp-address", metavar="IP", help="TFTP address (default: network.server)")
    p.add_argument("--tftp-port", type=int, metavar="N", help="TFTP port (default 69)")
    p.add_argument("--http-address", metavar="IP", help="HTTP address (default: network.server)")
    p.add_argument("--http-port", type=int, metavar="N", help="HTTP port (default boot.http_port)")
    p.add_argument("--tftp-workers", type=int, metavar="N", help="TFTP worker processes")
    p.add_argument("--http-workers", type=int, metavar="N", help="HTTP worker processes")
    p.add_argument("--no-tftp", action="store_true", help="do not serve TFTP")
    p.add_argument("--no-http", action="store_true",
                   help="do not serve HTTP (no boot files over HTTP, no call-home)")
    p.add_argument("--segment", metavar="NAME",
                   help="serve this segment's nodes only (service node; default: [segment] "
                        "name, else the primary's); blobs missing here are fetched from "
                        "[segment] primary_url and verified")
    p.add_argument("--console-log", action="store_true",
                   help="also keep an SOL console log of every IPMI node (as [console] log = "
                        "true): <state_dir>/console/NODE.log, see `pxe-stage console --log`")
    p.add_argument("--check", action="store_true",
                   help="check the configuration, print the effective settings and exit")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from pxe import console_settings, segments
    from pxe.serve import settings as serve_settings

    cfg = segments.pinned(load_config(args), args.segment)
    segment = segments.load(cfg)
    settings = serve_settings.load(
        cfg, tftp_address=args.tftp_address, tftp_port=args.tftp_port,
        http_address=args.http_address, http_port=args.http_port,
        tftp_workers=args.tftp_workers, http_workers=args.http_workers,
        tftp=False if args.no_tftp else None, http=False if args.no_http else None)
    consoles = console_settings.load(cfg, log=True if args.console_log else None)
    if args.check:
        for key, value in vars(settings).items():
            print(f"{key} = {value}")
        for key, value in vars(consoles).items():
            print(f"console.{key} = {value}")
        for key, value in vars(segment).items():
            print(f"segment.{key} = {value}")
        return 0
    from pxe.serve import daemon

    return daemon.run(cfg, settings, consoles, segment)
