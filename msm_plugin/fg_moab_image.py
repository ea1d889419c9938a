"""`fg-moab-image`: users' images in the repository (translation only; logic in pxe.repository).

The original syntax, single-dash options, with --long forms too:

    fg-moab-image -upload -image FILE -label LABEL [-group G]... [-init]
    fg-moab-image -delete -label LABEL [-version N] [-force] [-init]
    fg-moab-image -list [-json]
    fg-moab-image -history -label LABEL [-json]
    fg-moab-image -rollback -label LABEL [-version N] [-init]
    fg-moab-image -get -label LABEL [-version N] -o FILE
    fg-moab-image -init
    fg-moab-image -sudoers [-command PATH] [-o /etc/sudoers.d/NAME]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "fg-moab-image"
ACTIONS = ("upload", "delete", "list", "history", "rollback", "get", "sudoers")

EPILOG = """\
Members of the image group ([groups] image, default fgimage) and root may change the
repository; members run it through sudo (`sudo fg-moab-image -upload ...`), allowed by the rule
that `fg-moab-image -sudoers` prints (root installs it with `-sudoers -o /etc/sudoers.d/NAME`).
Your own files (-image, -o) are read and written with your own permissions.

-upload checks the bundle (format: docs/images.md; build one with tools/make-bundle), applies
the site customization scripts (all/ and each -group's), and publishes it: the label is in the
scheduler's OSLIST at its next poll. -init re-publishes the OS list and re-renders every boot
config (once after several uploads or deletes). -delete refuses an image that a node runs or is
switching to, or that a provisioning run asked for, unless -force.

Uploading a label that exists adds a new version (1, 2, 3...) that becomes current; the earlier
ones are kept (up to [images] keep_versions; older ones no node runs are pruned). Only the
label's owner or an admin (root or [api] admin_group) may add a version, roll back or delete.
-history lists the kept versions (* = current; RUNNING: nodes running it now, BOOTED: nodes
that reached ready on it). -rollback makes the previous version (or -version N) current again
in one step: running nodes keep what they booted, the next boot of the label gets it.
-delete -version N deletes one kept version that is not the current one.

Exit status: 0 ok, 1 failed (including permission denied and an unknown label), 2 bad usage or
input (including a malformed -version or a version that is not kept)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, add_help=False, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Upload, list, retrieve and delete OS images the scheduler can boot.")
    p.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    acts = p.add_argument_group("actions (one; -init alone, or after -upload / -delete)")
    acts.add_argument("-upload", "--upload", action="store_true", help="upload -image as -label")
    acts.add_argument("-delete", "--delete", action="store_true", help="delete -label")
    acts.add_argument("-list", "--list", action="store_true", help="list the images")
    acts.add_argument("-history", "--history", action="store_true",
                      help="list the kept versions of -label")
    acts.add_argument("-rollback", "--rollback", action="store_true",
                      help="make the previous version of -label (or -version) current again")
    acts.add_argument("-get", "--get", action="store_true",
                      help="write -label's bundle, byte-identical to the upload, to -o")
    acts.add_argument("-init", "--init", action="store_true",
                      help="re-publish the OS list and re-render boot configs")
    acts.add_argument("-sudoers", "--sudoers", action="store_true",
                      help="print (or with -o, install) the sudoers rule for the image group")
    p.add_argument("-image", "--image", metavar="FILE", help="the bundle to upload")
    p.add_argument("-label", "--label", metavar="LABEL",
                   help="image label: [A-Za-z0-9._-], what users write in msub -l os=LABEL "
                        "(default for -upload: the bundle manifest's)")
    p.add_argument("-version", "--version", metavar="N",
                   help="a version number: for -rollback, -delete and -get")
    p.add_argument("-o", "-output", "--output", metavar="FILE", help="output file ('-' = stdout)")
    p.add_argument("-group", "--group", metavar="GROUP", action="append", default=[],
                   help="also apply the customization scripts of node group GROUP (repeatable)")
    p.add_argument("-force", "--force", action="store_true", help="delete even if in use")
    p.add_argument("-json", "--json", action="store_true", help="-list or -history as JSON")
    p.add_argument("-command", "--command", metavar="PATH",
                   help="-sudoers: the program the rule allows (default: this one)")
    p.add_argument("-config", "--config", metavar="FILE",
                   help="site configuration (through sudo: root-owned files only)")
    p.add_argument("-server", "--server", metavar="URL",
                   help="use the dynprov service at https://HOST:PORT instead of local files "
                        "(default: $DYNPROV_SERVER; no sudo needed)")
    from pxe.cli.guard import add_debug_flag

    add_debug_flag(p)
    return p


def _action(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    chosen = [a for a in ACTIONS if getattr(args, a)]
    if len(chosen) > 1:
        parser.error(f"choose one action, not {' and '.join('-' + a for a in chosen)}")
    if not chosen:
        if args.init:
            return "init"
        parser.error("no action: use -upload, -delete, -list, -history, -rollback, -get, -init "
                     "or -sudoers")
    action = chosen[0]
    if args.init and action not in ("upload", "delete", "rollback"):
        parser.error(f"-init goes alone or after -upload / -delete / -rollback, not with "
                     f"-{action}")
    needs = {"upload": ("image",), "delete": ("label",), "get": ("label", "output"),
             "history": ("label",), "rollback": ("label",)}
    for name in needs.get(action, ()):
        if not getattr(args, name):
            flag = "-o" if name == "output" else f"-{name}"
            parser.error(f"-{action} needs {flag}")
    if args.group and action != "upload":
        parser.error("-group goes with -upload")
    if args.force and action != "delete":
        parser.error("-force goes with -delete")
    if args.version is not None and action not in ("rollback", "delete", "get"):
        parser.error("-version goes with -rollback, -delete or -get")
    if args.json and action not in ("list", "history"):
        parser.error("-json goes with -list or -history")
    return action


def main(argv: Sequence[str] | None = None) -> int:
    from pxe.cli import guard

    def body(args: list[str]) -> int:
        parser = build_parser()
        parsed = parser.parse_args(args)
        return _run(_action(parser, parsed), parsed)

    return guard.run(PROG, body, argv)


def _run(action: str, args: argparse.Namespace) -> int:
    from pxe import remote, repository

    client = remote.resolve(args.server) if action != "sudoers" else None
    if client is not None:
        repo: Any = remote.RemoteRepository(client)
    else:
        cfg = repository.load_config(args.config)
    if action == "sudoers":
        from pxe import sudoers

        command = Path(args.command) if args.command else sudoers.default_command(PROG)
        text = sudoers.rule(cfg.groups.image, command)
        for problem in sudoers.unsafe_reasons(command):
            print(f"{PROG}: warning: {problem}: sudo would run a program others can change",
                  file=sys.stderr)
        if args.output:
            sudoers.install(text, Path(args.output))
            print(f"installed {args.output} (checked with visudo)")
        else:
            sys.stdout.write(text)
        return 0
    if client is None:
        repo = repository.Repository(cfg)
    if args.version is not None:
        from pxe.cli.images import version_number

        args.version = version_number(args.version, "-version")
    if action == "upload":
        done = repo.upload(Path(args.image), args.label, args.group)
        image = done.image
        version = f" version {image.version}" if getattr(image, "version", 1) > 1 else ""
        print(f"uploaded image {image.label}{version} ({image.os_name}, {image.arch}, {image.mode}; "
              f"bundle sha256 {done.bundle_sha256[:16]}, {done.bundle_bytes} bytes)")
        if done.customized:
            print(f"customized with {', '.join(done.customized)}")
    elif action == "delete":
        if args.version is not None:
            still = repo.delete(args.label, force=args.force, version=args.version)
            what = f"version {args.version} of image {args.label}"
        else:
            still = repo.delete(args.label, force=args.force)
            what = f"image {args.label}"
        print(f"deleted {what}" + (f" (forced; still used by {', '.join(still)})"
                                   if still else ""))
    elif action == "list":
        _list(repo, args.json)
    elif action == "history":
        _history(repo, args.label, args.json)
    elif action == "rollback":
        old, new = repo.rollback(args.label, args.version)
        print(f"image {args.label}: version {new} is current again (was {old}); running nodes "
              "keep theirs, the next boot gets it")
    elif action == "get":
        sha, size = (repo.get(args.label, args.output, version=args.version)
                     if args.version is not None else repo.get(args.label, args.output))
        if args.output != "-":
            print(f"wrote {args.output} ({size} bytes, sha256 {sha[:16]})")
    if args.init or action == "init":
        if client is not None:  # the service answers with where it published the list
            oslist, report = repo.init()
            where = f" ({oslist})" if oslist else ""
        else:
            from msm_plugin import wiki

            report = repo.init()
            report_file = wiki.report_path(repo.cfg.paths.state_dir)
            where = f" ({report_file})" if report_file.exists() else ""
        print(f"re-published the OS list{where}; boot configs: {report.boot_files} files, "
              f"{report.boot_changed} changed")
    return 0


def _list(repo, as_json: bool) -> None:
    entries = repo.list()
    if as_json:
        import json

        json.dump([e.public() for e in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from pxe.cli.common import print_table

    print_table(("LABEL", "VERSION", "OS", "ARCH", "MODE", "OWNER", "SIZE", "UPLOADED",
                 "IN USE BY"),
                [(e.label, _version(e), e.os_name, e.arch, e.mode, e.owner, e.bundle_bytes,
                  time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)),
                  ",".join(e.in_use)) for e in entries])


def _version(entry: Any) -> str:
    """``2/3``: the current version of the kept ones."""
    return f"{entry.version}/{entry.versions}"


def _history(repo, label: str, as_json: bool) -> None:
    from pxe.cli.common import print_json, print_table
    from pxe.cli.images import HISTORY_HEADERS, history_rows

    versions = repo.history(label)
    if as_json:
        print_json([v.public() for v in versions])
    else:
        print_table(HISTORY_HEADERS, history_rows(versions))


if __name__ == "__main__":
    sys.exit(main())
