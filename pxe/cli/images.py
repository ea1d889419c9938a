"""`pxe-stage images add|list|show|remove|history|rollback`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pxe import imageversions, remote, validate
from pxe.cli.common import add_json_flag, load_config, print_json, print_table
from pxe.images import Catalog


def version_number(text: str | None, what: str = "--version") -> int | None:
    """A typed version number, checked by the command (a one-line message, exit 2)."""
    return None if text is None else imageversions.parse_version(text, what)


HISTORY_HEADERS = ("VERSION", "CURRENT", "CREATED", "OWNER", "KERNEL", "INITRD", "ROOTFS",
                   "RUNNING", "BOOTED")


def history_rows(versions: Sequence[imageversions.Version]) -> list[tuple[Any, ...]]:
    """One table row per version: short hashes with sizes in bytes, node counts."""
    def blob(v: imageversions.Version, role: str) -> str:
        sha = getattr(v, f"{role}_sha")
        if not sha:
            return "-"
        size = v.sizes.get(role)
        return f"{sha[:12]} ({size if size is not None else '?'} B)"

    return [(v.version, "*" if v.current else "",
             time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created)), v.owner,
             blob(v, "kernel"), blob(v, "initrd"), blob(v, "rootfs"), len(v.running), v.booted)
            for v in versions]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="OS image catalog (the scheduler's OSLIST)",
                       description="Manage OS images: kernel, initrd, root filesystem.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    add = verbs.add_parser(
        "add", help="add an image, or a new version of one (files are copied, content-addressed)",
        description="Add an image owned by root; adding a label that exists adds a new version "
                    "that becomes current (the old ones are kept, up to [images] "
                    "keep_versions). Inputs must be regular files (no symbolic "
                    "links, FIFOs or devices) that the invoking user (SUDO_USER under sudo) "
                    "can read; each is refused above its [images] size cap "
                    "(max_kernel_bytes, max_initrd_bytes, max_rootfs_bytes).")
    add.add_argument("label", help="the name users write in `msub -l os=LABEL`")
    add.add_argument("--kernel", required=True, type=Path, help="Linux kernel (bzImage)")
    add.add_argument("--initrd", type=Path)
    add.add_argument("--rootfs", type=Path,
                     help="root filesystem: squashfs or tar (stateless), raw disk image "
                          "(stateful); checked as a bundle's is")
    add.add_argument("--cmdline", default="", help="extra kernel command line")
    add.add_argument("--mode", default="stateless", choices=("stateless", "stateful"))
    add.add_argument("--arch", default="x86_64", choices=("x86_64", "aarch64"))
    add.add_argument("--os-name", default="", help="OS family/version, for humans")
    add.add_argument("--prov-seconds", type=int, default=600,
                     help="expected provisioning time, 30..86400 (default 600, Moab's "
                          "PROVDURATION)")
    add.set_defaults(func=cmd_add)

    lst = verbs.add_parser("list", help="list images")
    add_json_flag(lst)
    remote.add_server_flag(lst)
    lst.set_defaults(func=cmd_list)

    show = verbs.add_parser("show", help="show one image")
    show.add_argument("label")
    add_json_flag(show)
    remote.add_server_flag(show)
    show.set_defaults(func=cmd_show)

    rm = verbs.add_parser("remove", help="remove an image, its uploaded bundles (fg-moab-image) "
                                         "and files no other image uses")
    rm.add_argument("label")
    rm.add_argument("--version", metavar="N",
                    help="remove only this kept version (not the current one)")
    rm.add_argument("--force", action="store_true", help="even if nodes use it")
    rm.set_defaults(func=cmd_remove)

    hist = verbs.add_parser(
        "history", help="list the kept versions of an image",
        description="List the kept versions of LABEL: number, when and by whom it was added, "
                    "kernel/initrd/root filesystem (sha256 prefix and size), which one is "
                    "current (*), how many nodes run it now and how many reached ready on it.")
    hist.add_argument("label")
    add_json_flag(hist)
    remote.add_server_flag(hist)
    hist.set_defaults(func=cmd_history)

    back = verbs.add_parser(
        "rollback", help="make an earlier version current again",
        description="Make a kept version of LABEL current again, in one step. Running nodes "
                    "keep what they booted; the next boot of LABEL gets this version. Exit 2 "
                    "for a version that is not kept or is already current.")
    back.add_argument("label")
    back.add_argument("--version", metavar="N",
                      help="the version to restore (default: the newest one older than the "
                           "current one)")
    remote.add_server_flag(back)
    back.set_defaults(func=cmd_rollback)


def cmd_add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    catalog = Catalog(cfg)
    image = catalog.add(
        args.label, args.kernel, args.initrd, args.rootfs, os_name=args.os_name, arch=args.arch,
        mode=args.mode, cmdline=args.cmdline, prov_seconds=args.prov_seconds, from_user=True)
    if catalog.pruned:  # versions uploaded with fg-moab-image take their bundles along
        from pxe.repository import Repository

        Repository(cfg, catalog.conn).sweep_bundles(image.label)
    print(f"added image {image.label} version {image.version} "
          f"(kernel sha256 {image.kernel_sha[:12]})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = remote.for_args(args)
    images = remote.images(client) if client else Catalog(load_config(args)).all()
    if args.json:
        print_json([i.public() for i in images])
        return 0
    print_table(("LABEL", "VERSION", "OS", "ARCH", "MODE", "KERNEL", "INITRD", "ROOTFS"),
                [(i.label, i.version, i.os_name, i.arch, i.mode, i.kernel_sha[:12],
                  (i.initrd_sha or "")[:12], (i.rootfs_sha or "")[:12]) for i in images])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    validate.label(args.label, "image label")  # bad input (2), not an unknown image (1)
    client = remote.for_args(args)
    image = remote.image(client, args.label) if client else Catalog(load_config(args)).get(args.label)
    if args.json:
        print_json(image.public())
        return 0
    for key, value in image.public().items():
        print(f"{key:<13} {'-' if value in (None, '') else value}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    version = version_number(args.version)
    if version is not None:
        from pxe.repository import Repository

        still = Repository(load_config(args)).delete(args.label, force=args.force,
                                                     version=version)
        print(f"removed version {args.version} of image {args.label}"
              + (f" (forced; still run by {', '.join(still)})" if still else ""))
        return 0
    from pxe.repository import Repository

    bundles = Repository(load_config(args)).remove_image(args.label, force=args.force)
    print(f"removed image {args.label}" + (f" and its {len(bundles)} uploaded bundle file(s)"
                                           if bundles else ""))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    validate.label(args.label, "image label")
    client = remote.for_args(args)
    versions = (remote.RemoteRepository(client).history(args.label) if client
                else Catalog(load_config(args)).history(args.label))
    if args.json:
        print_json([v.public() for v in versions])
        return 0
    print_table(HISTORY_HEADERS, history_rows(versions))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from pxe.repository import Repository

    version = version_number(args.version)
    client = remote.for_args(args)  # the service applies the same owner/admin rule
    repo = remote.RemoteRepository(client) if client else Repository(load_config(args))
    old, new = repo.rollback(args.label, version)
    print(f"image {args.label}: version {new} is current again (was {old}); running nodes keep "
          "theirs, the next boot gets it")
    return 0
