"""`pxe-stage api serve|make-cert|passwd|revoke-tokens|login`: the REST service and its keys."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from pxe.cli.common import load_config, print_json
from pxe.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "api", help="the REST service (HTTPS): images, nodes, pools, power, runs, status page",
        description="Run and administer the REST service that users, portals and the remote "
                    "commands (--server URL) talk to. Settings: the [api] section of the site "
                    "config (docs/api.md).")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = verbs.add_parser("serve", help="run the HTTPS service in the foreground",
                         description="Serve the REST API, /openapi.json and the status page "
                                     "(/status) over HTTPS; SIGTERM stops it.")
    s.add_argument("--address", metavar="IP", help="listen address (default: api.address)")
    s.add_argument("--port", type=int, metavar="N", help="port (default: api.port, 8443)")
    s.add_argument("--workers", type=int, metavar="N", help="worker processes")
    s.add_argument("--check", action="store_true",
                   help="check the configuration (and the certificate), print it and exit")
    s.set_defaults(func=cmd_serve)

    c = verbs.add_parser("make-cert", help="make a self-signed certificate and key (test site)")
    c.add_argument("--cert", type=Path, help="certificate file (default: api.cert)")
    c.add_argument("--key", type=Path, help="key file (default: api.key)")
    c.add_argument("--name", action="append", default=[], metavar="DNS",
                   help="DNS name it is valid for (repeatable; default: this host, localhost)")
    c.add_argument("--ip", action="append", default=[], metavar="IP",
                   help="IP address it is valid for (repeatable; default 127.0.0.1, ::1)")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--force", action="store_true", help="replace existing files")
    c.set_defaults(func=cmd_make_cert)

    pw = verbs.add_parser("passwd", help="add, change or remove a user of the password file",
                          description="The password is read from the terminal (twice), or "
                                      "one line of standard input with --stdin.")
    pw.add_argument("user")
    pw.add_argument("--groups", default="", help="comma-separated groups given to this user")
    pw.add_argument("--delete", action="store_true", help="remove the user")
    pw.add_argument("--stdin", action="store_true", help="read the password from stdin")
    pw.set_defaults(func=cmd_passwd)

    r = verbs.add_parser("revoke-tokens", help="replace the token secret: every token ends")
    r.set_defaults(func=cmd_revoke)

    lg = verbs.add_parser("login", help="log in to a server and cache a token (remote use)")
    lg.add_argument("--server", metavar="URL", help="https://HOST:PORT of the service")
    lg.add_argument("--json", action="store_true", help="print the token as JSON")
    lg.set_defaults(func=cmd_login)


def _settings(args: argparse.Namespace, **overrides: object):
    from pxe.api import settings

    cfg = load_config(args)
    return cfg, settings.load(cfg, **overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from pxe.api import server, settings

    cfg, api = _settings(args, address=args.address, port=args.port, workers=args.workers)
    if args.check:
        settings.require_tls_files(cfg, api)
        for key, value in vars(api).items():
            print(f"{key} = {value}")
        return 0
    return server.run(cfg, api)


def cmd_make_cert(args: argparse.Namespace) -> int:
    from pxe.api import tls

    cert, key = args.cert, args.key
    if cert is None or key is None:
        _, api = _settings(args)
        cert, key = cert or api.cert, key or api.key
    if cert is None or key is None:
        raise InputError("give --cert and --key (or set api.cert and api.key in the config)")
    sans = tls.make_cert(Path(cert), Path(key), args.name, args.ip, args.days, args.force)
    print(f"wrote {cert} and {key} (self-signed, valid for {', '.join(sans)}; "
          f"clients trust it with --ca-file {cert})")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from pxe.api import auth

    cfg, api = _settings(args)
    if api.password_file is None:
        raise InputError(f"{cfg.path}: api.password_file: missing key")
    groups = [g for g in args.groups.split(",") if g]
    if args.delete:
        auth.set_password(api.password_file, args.user, None)
        print(f"removed {args.user} from {api.password_file}")
        return 0
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            raise InputError("the passwords differ")
    if len(password) < 8:
        raise InputError("password shorter than 8 characters")
    auth.set_password(api.password_file, args.user, password, groups)
    print(f"set the password of {args.user} in {api.password_file}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from pxe import audit, authz
    from pxe.api import auth

    cfg, api = _settings(args)
    auth.Secret(api.api_dir / "secret").rotate()
    audit.append(cfg.paths.state_dir, authz.real_user(), "api-revoke-tokens")
    print("replaced the token secret: every issued token is now invalid")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from pxe import remote

    client = remote.resolve(args.server, getattr(args, "config", None))
    if client is None:
        raise InputError("no server: give --server URL or set $DYNPROV_SERVER")
    data = client.login()
    if args.json:
        print_json(data)
    else:
        print(f"logged in to {client.server} as {data['user']} (roles {', '.join(data['roles'])}; "
              f"token cached until {data['expires']})")
    return 0
