"""`dynprov-slurm`: the Slurm face of dynprov.

    dynprov-slurm config [-install SLURM_CONF]   slurm.conf block + helpers.conf (marked blocks)
    dynprov-slurm helper [FEATURE]               node: print the image it runs / ask for FEATURE
    dynprov-slurm reboot                         node: RebootProgram (the server power-cycles)
    dynprov-slurm enroll                         node, at boot: trade the boot token for a key
    dynprov-slurm resume|suspend NODELIST        slurmctld host: ResumeProgram / SuspendProgram
    dynprov-slurm sync                           slurmctld host: failed re-images -> node DOWN

Slurm calls Helper=, RebootProgram=, ResumeProgram= and SuspendProgram= with no arguments of
ours, so dynprov-slurm-helper, -reboot, -resume and -suspend are the same subcommands as
commands of their own. Exit status: 0 ok, 1 failed or refused, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pxe.errors import DynprovError, InputError

PROG = "dynprov-slurm"


HELP = {
    "helper": "node_features helper: print the running image's label, or ask for FEATURE at "
              "the next boot",
    "reboot": "RebootProgram: ask the server to re-image and power-cycle this node",
    "enroll": "at boot, before the agent's ready report: get this node's key with the boot's "
              "one-time token",
    "resume": "ResumeProgram: power nodes on into the OS their jobs ask for ($SLURM_RESUME_FILE), "
              "else the one they had",
    "suspend": "SuspendProgram: power nodes off",
    "sync": "manual fallback (the run driver's hook does it at once): set nodes whose re-image "
            "failed DOWN in Slurm with dynprov's reason (each failed run once)",
}
ALIASES = ("helper", "reboot", "resume", "suspend")  # commands of their own: dynprov-slurm-<verb>


def _add_args(verb: str, p: argparse.ArgumentParser) -> None:
    if verb == "helper":
        p.add_argument("feature", nargs="?", help="image label to boot next")
    elif verb == "enroll":
        p.add_argument("--munge-key", action="store_true",
                       help="also fetch Slurm's munge key (the server's node secret munge.key) "
                            "into /etc/munge/munge.key, mode 0400, owner munge")
    elif verb == "sync":
        p.add_argument("--site-config", metavar="FILE", help="dynprov site configuration (TOML)")
    elif verb in ("resume", "suspend"):
        p.add_argument("nodes", metavar="NODELIST", help="Slurm host list, e.g. n[001-004]")
        p.add_argument("--site-config", metavar="FILE", help="dynprov site configuration (TOML)")


def alias_parser(verb: str) -> argparse.ArgumentParser:
    """The parser of dynprov-slurm-<verb> (what slurm.conf / helpers.conf name)."""
    p = argparse.ArgumentParser(
        prog=f"{PROG}-{verb}", description=f"{HELP[verb]}. The same as '{PROG} {verb}': Slurm "
                                           "runs this program without arguments of ours.",
        epilog="Exit status: 0 ok, 1 failed or refused, 2 bad input. See dynprov-slurm(1).")
    _add_args(verb, p)
    _debug_flag(p)
    p.set_defaults(command=verb)
    return p


def _debug_flag(p: argparse.ArgumentParser) -> None:
    from pxe.cli.guard import add_debug_flag

    add_debug_flag(p)


def build_helper_parser() -> argparse.ArgumentParser:
    return alias_parser("helper")


def build_reboot_parser() -> argparse.ArgumentParser:
    return alias_parser("reboot")


def build_resume_parser() -> argparse.ArgumentParser:
    return alias_parser("resume")


def build_suspend_parser() -> argparse.ArgumentParser:
    return alias_parser("suspend")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Slurm integration of dynprov: node features are OS images. slurmd asks "
                    "the helper which image a node runs and, when a job's --constraint names "
                    "another, asks it to switch and runs RebootProgram; the provisioning server "
                    "then re-images the node through PXE and power-cycles it over its BMC.",
        epilog="Node-side commands (helper, reboot, enroll) read the kernel command line "
               "(dynprov.server=, dynprov.node=, dynprov.token=), /etc/os-release (IMAGE_ID, else "
               "ID) and the node key /etc/dynprov/node-key, all below $DYNPROV_NODE_ROOT "
               "(default /). The slurm.conf side (config, resume, suspend) reads the site "
               "config: --site-config, else $DYNPROV_CONFIG, else /etc/dynprov/dynprov.toml. "
               "Exit status: 0 ok, 1 failed or refused, 2 bad input.")
    _debug_flag(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("config", help="print (or -install) the slurm.conf and helpers.conf "
                                      "lines for this site")
    c.add_argument("-install", "--install", metavar="SLURM_CONF", type=Path,
                   help="merge the lines into SLURM_CONF and helpers.conf beside it, inside "
                        "marked blocks (backups kept; a second run changes nothing); then run "
                        "'scontrol reconfigure'")
    c.add_argument("--helpers", metavar="FILE", type=Path,
                   help="helpers.conf to write with -install (default: beside SLURM_CONF)")
    c.add_argument("--site-config", metavar="FILE", help="dynprov site configuration (TOML)")
    for verb, text in HELP.items():
        _add_args(verb, sub.add_parser(verb, help=text))
    from pxe.cli.guard import exit_status_everywhere

    exit_status_everywhere(p)  # each verb's --help says what its exit codes mean
    return p


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
         ) -> int:
    from pxe.cli import guard

    p = parser or build_parser()
    return guard.run(p.prog, lambda args: _dispatch(p.parse_args(args)), argv)


def helper_main() -> int:
    return main(sys.argv[1:], alias_parser("helper"))


def reboot_main() -> int:
    return main(sys.argv[1:], alias_parser("reboot"))


def resume_main() -> int:
    return main(sys.argv[1:], alias_parser("resume"))


def suspend_main() -> int:
    return main(sys.argv[1:], alias_parser("suspend"))


def _dispatch(args: argparse.Namespace) -> int:
    from slurm_plugin import node

    if args.command == "helper":
        if args.feature is None:
            print(node.os_label())
            return 0
        print(node.request_image(args.feature))
        return 0
    if args.command == "reboot":
        print(node.request_reboot())
        return 0
    if args.command == "enroll":
        for path in node.enroll(munge_key=args.munge_key):
            print(f"written: {path}")
        return 0
    if args.command == "config":
        return _config(args)
    if args.command == "sync":
        return _sync(args)
    return _power(args)


def _sync(args: argparse.Namespace) -> int:
    from slurm_plugin import down, toolkit

    cfg, conn = toolkit.load(args.site_config)
    marked, errors = down.sync(conn, toolkit.failed_runs(cfg, conn))
    if marked:
        print(f"{toolkit.fold(marked)}: DOWN in Slurm (re-image failed)")
    for node, error in errors.items():
        print(f"{node}: {error}", file=sys.stderr)
    return 1 if errors else 0


def _config(args: argparse.Namespace) -> int:
    from slurm_plugin import conf, toolkit

    cfg, conn = toolkit.load(args.site_config)
    slurm, helpers = conf.slurm_lines(cfg, conn), conf.helpers_lines(cfg, conn)
    slow = conf.slow_helper_warning(conf.helper_program(conf.settings(cfg)))
    if slow:
        print(f"{PROG}: warning: {slow}", file=sys.stderr)
    if args.install is None:
        if args.helpers is not None:
            raise InputError("--helpers goes with -install")
        print("# --- slurm.conf ---")
        print("\n".join(slurm))
        print("# --- helpers.conf (beside slurm.conf) ---")
        print("\n".join(helpers))
        return 0
    helpers_path = args.helpers or args.install.with_name("helpers.conf")
    if not args.install.is_file():
        raise DynprovError(f"{args.install}: no such file")
    for path, block, create in ((args.install, slurm, False), (helpers_path, helpers, True)):
        changed, backup, warnings = conf.install(path, block, create=create)
        for w in warnings:
            print(f"{PROG}: warning: {path}: {w}", file=sys.stderr)
        if changed:
            print(f"{path}: dynprov block written" + (f" (backup: {backup})" if backup else ""))
        else:
            print(f"{path}: already up to date")
    print("now run: scontrol reconfigure")
    return 0


def _power(args: argparse.Namespace) -> int:
    from slurm_plugin import toolkit

    names = toolkit.expand(args.nodes)
    cfg, conn = toolkit.load(args.site_config)
    failed: dict[str, str] = {}
    if args.command == "suspend":
        for name, error in toolkit.power(cfg, conn, names, "off").items():
            if error:
                failed[name] = error
        done = [n for n in names if n not in failed]
        if done:
            print(f"{toolkit.fold(done)}: power off")
    else:
        wanted = _resume_labels(names, {lbl for lbls in toolkit.image_labels(conn).values()
                                        for lbl in lbls})
        known = toolkit.node_images(conn, names)
        by_label: dict[str, list[str]] = {}
        bare = []
        for name in names:
            label = wanted.get(name) or known.get(name)
            if label:
                by_label.setdefault(label, []).append(name)
            else:
                bare.append(name)
        for label, members in sorted(by_label.items()):
            started = toolkit.start(cfg, conn, members, label, force=True)
            failed.update(started.refused)
            if started.accepted:
                print(f"{toolkit.fold(started.accepted)}: provisioning {label} "
                      f"(run {started.run_id})")
        if bare:  # nothing known to boot: power on into the safe default
            for name, error in toolkit.power(cfg, conn, bare, "on").items():
                if error:
                    failed[name] = error
    for name, why in failed.items():
        print(f"{name}: {why}", file=sys.stderr)
    return 1 if failed else 0


def _resume_labels(names: Sequence[str], labels: set[str]) -> dict[str, str]:
    """node -> the image label its resuming job asks for, from $SLURM_RESUME_FILE (JSON).

    A job's features are a constraint expression (sles11&ib, [a|b]...); the label is taken only
    when exactly one image label appears in it."""
    import json
    import re

    path = os.environ.get("SLURM_RESUME_FILE")
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"{PROG}: warning: SLURM_RESUME_FILE {path}: {exc}", file=sys.stderr)
        return {}
    from slurm_plugin import toolkit

    out: dict[str, str] = {}
    for job in data.get("jobs", []) if isinstance(data, dict) else []:
        if not isinstance(job, dict):
            continue
        words = set(re.split(r"[^A-Za-z0-9._-]+", str(job.get("features") or ""))) & labels
        if len(words) != 1:
            continue
        try:
            nodes = toolkit.expand(str(job.get("nodes_resume") or job.get("nodes_alloc") or ""))
        except DynprovError:
            continue
        for name in nodes:
            if name in names:
                out.setdefault(name, next(iter(words)))
    return out


if __name__ == "__main__":
    sys.exit(main())
