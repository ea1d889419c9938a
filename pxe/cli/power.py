"""`pxe-stage power ACTION NODES`, `pxe-stage bootdev NODES DEVICE`, `pxe-stage console NODE`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable

from pxe.cli.common import add_json_flag, load_config, print_json
from pxe.config import Config
from pxe.errors import DynprovError, InputError
from pxe.nodeset import fold
from pxe.power.base import PowerResult

POWER_VERBS = ("status", "on", "off", "soft-off", "cycle", "reset", "netboot")


def _fanout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker threads for Redfish/WoL nodes (default: power.workers, 64); "
                        "IPMI nodes share one event loop (power.ipmi_sessions at once)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds per attempt on one node (default: power.timeout)")
    p.add_argument("--retries", type=int, metavar="N",
                   help="more attempts after a timeout or unreachable BMC (default: power.retries)")
    add_json_flag(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "power", help="power control through the nodes' BMCs (IPMI, Redfish, Wake-on-LAN)",
        description="Act on every node of a node set in parallel; one line per outcome. "
                    "netboot = next boot from the network once, then cycle (or on if off). "
                    "validate = say per node what is missing, touching no BMC.",
        epilog="Exit status: 0 every node ok, 1 any node failed (each is named with the "
               "reason: timeout, auth, unreachable, unsupported, no-bmc, error), 2 bad input.")
    p.add_argument("action", choices=(*POWER_VERBS, "validate"), metavar="ACTION",
                   help=f"one of: {', '.join(POWER_VERBS)}, validate")
    p.add_argument("nodes", help="node set, e.g. n[001-512]")
    _fanout_flags(p)
    p.add_argument("--server", metavar="URL",
                   help="status only: ask the dynprov REST service at URL instead of the BMCs "
                        "(https://HOST:PORT); changing power needs a shell on the server")
    p.set_defaults(func=cmd_power)

    b = sub.add_parser("bootdev", help="set the nodes' next boot device through their BMCs",
                       description="Next boot only, unless --persistent. UEFI nodes get the "
                                   "UEFI boot flag.")
    b.add_argument("nodes", help="node set")
    b.add_argument("device", choices=("network", "disk"))
    b.add_argument("--persistent", action="store_true", help="every boot, not only the next")
    _fanout_flags(b)
    b.set_defaults(func=cmd_bootdev)

    c = sub.add_parser("console", help="serial console of one node (IPMI serial over LAN)",
                       description="Attach this terminal to the node's serial console; "
                                   "'~.' at the start of a line quits. With --log, keep the "
                                   "console's session open instead and write it to the node's "
                                   "console log (<state_dir>/console/NODE.log: a UTC time on "
                                   "every line, rotated at console.max_bytes, console.rotations "
                                   "kept, mode 0640), reconnecting after 1, 2, 4 ... s when the "
                                   "BMC drops the session; `serve --console-log` does this for "
                                   "every IPMI node.",
                       epilog="Exit status: 0 detached (or --log: stopped by --seconds or "
                              "SIGTERM after a session was open); 1 failed (--log: no session "
                              "could be opened, or --attempts used up; the log is held by "
                              "another process; an unknown node; a node without an IPMI BMC); "
                              "2 bad input.")
    c.add_argument("node")
    c.add_argument("--seconds", type=float, metavar="S",
                   help="detach after S seconds (to watch a boot from a script)")
    c.add_argument("--log", action="store_true",
                   help="write the console to the node's console log until --seconds, "
                        "--attempts or SIGTERM, instead of this terminal")
    c.add_argument("--attempts", type=int, metavar="N",
                   help="with --log: give up after N sessions ended or failed to open")
    c.set_defaults(func=cmd_console)


class Progress:
    """'power on: 120/512 done, 2 failed' on a terminal's stderr, at most 10 times a second."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.done = self.failed = 0
        self.last = 0.0
        self.enabled = total > 1 and sys.stderr.isatty()

    def __call__(self, result: PowerResult) -> None:
        self.done += 1
        self.failed += 0 if result.ok else 1
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} done, "
                             f"{self.failed} failed ")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _remote_status(server: str, spec: str) -> dict[str, PowerResult]:
    """`power status --server URL`: the same results, from the REST service's GET /power."""
    from pxe import remote

    client = remote.resolve(server)
    if client is None:
        raise DynprovError(f"--server {server!r}: no REST service")
    found = remote.records(PowerResult, client.get(f"{remote.V1}/power", nodes=spec),
                           "power result")
    return {r.node: r for r in found}


def _execute(args: argparse.Namespace, action: str, label: str) -> int:
    from pxe import power
    from pxe.inventory import Inventory

    server = getattr(args, "server", None)
    if server and action != "status":
        raise InputError("--server is only for `power status`; change power on the server itself")
    cfg = None
    if server:
        results = _remote_status(server, args.nodes)
    else:
        cfg = load_config(args)
        nodes = Inventory(cfg).select(args.nodes)
        progress = Progress(label, len(nodes))
        try:
            results = power.run(cfg, nodes, action, workers=args.workers, timeout=args.timeout,
                                retries=args.retries, progress=progress)
        finally:
            progress.finish()
    failed = [r for r in results.values() if not r.ok]
    if action != "status" and cfg is not None:
        _audit(cfg, action, list(results), [r.node for r in failed])
    if args.json:
        print_json([r.as_dict() for r in results.values()])
    else:
        report(results.values(), print)
    if failed:
        kinds = sorted({r.kind or "error" for r in failed})
        print(f"pxe-stage: {label} failed on {len(failed)} of {len(results)} node(s): "
              f"{fold(r.node for r in failed)} ({', '.join(kinds)})", file=sys.stderr)
        return 1
    return 0


def report(results: Iterable[PowerResult], emit: Callable[[str], None]) -> None:
    """Successes folded by value ('n[001-510]: on'), then every failure with its reason."""
    groups: dict[str, list[str]] = {}
    failures: list[PowerResult] = []
    for r in results:
        if r.ok:
            groups.setdefault(r.value or "ok", []).append(r.node)
        else:
            failures.append(r)
    for value, names in groups.items():
        emit(f"{fold(names)}: {value}")
    for r in failures:
        emit(f"{r.node}: FAILED ({r.kind}): {r.error}")


def _audit(cfg: Config, action: str, names: list[str], failed: list[str]) -> None:
    from pxe import audit
    from pxe.authz import real_user

    try:
        audit.append(cfg.paths.state_dir, real_user(), f"power-{action}",
                     nodes=fold(names), failed=fold(failed) if failed else "")
    except OSError as exc:
        print(f"pxe-stage: warning: audit log not written: {exc.strerror}", file=sys.stderr)


def cmd_power(args: argparse.Namespace) -> int:
    if args.action == "validate":
        return _validate(args)
    return _execute(args, args.action, f"power {args.action}")


def cmd_bootdev(args: argparse.Namespace) -> int:
    action = f"boot-{args.device}" + ("-persistent" if args.persistent else "")
    return _execute(args, action, f"bootdev {args.device}")


def _validate(args: argparse.Namespace) -> int:
    from pxe.power.fanout import check

    problems = check(load_config(args), args.nodes)
    if args.json:
        print_json([{"node": n, "ok": not p, "problems": p} for n, p in problems.items()])
    else:
        ready = [n for n, p in problems.items() if not p]
        if ready:
            print(f"{fold(ready)}: ready")
        for name, p in problems.items():
            if p:
                print(f"{name}: {'; '.join(p)}")
    return 1 if any(problems.values()) else 0


def cmd_console(args: argparse.Namespace) -> int:
    from pxe.inventory import Inventory
    from pxe.power import settings as power_settings
    from pxe.power.base import Job, PowerError
    from pxe.power.fanout import drivers
    from pxe.power.secrets import SecretStore

    if args.seconds is not None and not 0 < args.seconds <= 10 ** 7:
        raise InputError(f"--seconds {args.seconds:g}: expected a number of seconds > 0")
    if args.attempts is not None and (not args.log or not 1 <= args.attempts <= 10 ** 6):
        raise InputError("--attempts N: only with --log, N from 1 to 1000000")
    from pxe import validate

    validate.hostname(args.node)  # bad input (2), not an unknown node (1)
    cfg = load_config(args)
    node = Inventory(cfg).get(args.node)
    if node.bmc_type != "ipmi":
        raise DynprovError(f"{node.name}: the console needs an IPMI BMC (serial over LAN); "
                           f"bmc_type is {node.bmc_type}"
                           + (" - use the BMC's own web console" if node.bmc_type == "redfish"
                              else ""))
    s = power_settings.load(cfg)
    driver = drivers()["ipmi"]
    problems = driver.validate(node, s)
    if problems:
        raise DynprovError(f"{node.name}: {'; '.join(problems)}")
    secret = SecretStore(cfg.paths.secrets_file).lookup(node.bmc_secret)
    if args.log:
        from pxe.power.ipmi import keep_console_log

        try:
            return keep_console_log(cfg, Job(node, secret), seconds=args.seconds,
                                    attempts=args.attempts)
        except PowerError as exc:
            raise DynprovError(str(exc)) from None
    try:
        return int(driver.attach(Job(node, secret), s, seconds=args.seconds))
    except PowerError as exc:
        raise DynprovError(str(exc)) from None
