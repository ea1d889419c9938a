"""`pxe-stage images add|list|show|remove`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pxe import remote
from pxe.cli.common import add_json_flag, load_config, print_json, print_table
from pxe.images import Catalog


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="OS image catalog (the scheduler's OSLIST)",
                       description="Manage OS images: kernel, initrd, root filesystem.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    add = verbs.add_parser(
        "add", help="add an image (files are copied, content-addressed)",
        description="Add an image owned by root. Inputs must be regular files (no symbolic "
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

    rm = verbs.add_parser("remove", help="remove an image and files no other image uses")
    rm.add_argument("label")
    rm.add_argument("--force", action="store_true", help="even if nodes use it")
    rm.set_defaults(func=cmd_remove)


def cmd_add(args: argparse.Namespace) -> int:
    image = Catalog(load_config(args)).add(
        args.label, args.kernel, args.initrd, args.rootfs, os_name=args.os_name, arch=args.arch,
        mode=args.mode, cmdline=args.cmdline, prov_seconds=args.prov_seconds, from_user=True)
    print(f"added image {image.label} (kernel sha256 {image.kernel_sha[:12]})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = remote.for_args(args)
    images = remote.images(client) if client else Catalog(load_config(args)).all()
    if args.json:
        print_json([i.public() for i in images])
        return 0
    print_table(("LABEL", "OS", "ARCH", "MODE", "KERNEL", "INITRD", "ROOTFS"),
                [(i.label, i.os_name, i.arch, i.mode, i.kernel_sha[:12],
                  (i.initrd_sha or "")[:12], (i.rootfs_sha or "")[:12]) for i in images])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    client = remote.for_args(args)
    image = remote.image(client, args.label) if client else Catalog(load_config(args)).get(args.label)
    if args.json:
        print_json(image.public())
        return 0
    for key, value in image.public().items():
        print(f"{key:<13} {'-' if value in (None, '') else value}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    Catalog(load_config(args)).remove(args.label, force=args.force)
    print(f"removed image {args.label}")
    return 0
