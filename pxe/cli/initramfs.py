"""`pxe-stage initramfs build|modules`: the provisioning initramfs (busybox, modules, /init)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pxe.cli.common import add_json_flag, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("initramfs", help="build the provisioning initramfs",
                       description="The initramfs an image boots with: busybox-static, the NIC "
                                   "and disk modules (modules.dep order) and dynprov's /init.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    build = verbs.add_parser("build", help="build the initramfs (newc cpio, compressed)")
    _kernel_args(build)
    build.add_argument("-o", "--output", required=True, type=Path, metavar="FILE")
    build.add_argument("--compress", default="gzip", choices=("gzip", "xz", "none"))
    build.add_argument("--busybox", type=Path, default=None,
                       help="static busybox to use (default /bin/busybox)")
    build.set_defaults(func=cmd_build)

    mods = verbs.add_parser("modules", help="show the modules and the order /init loads them")
    _kernel_args(mods)
    add_json_flag(mods)
    mods.set_defaults(func=cmd_modules)


def _kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel-root", required=True, type=Path, metavar="DIR",
                   help="unpacked kernel package with lib/modules/VERSION/modules.dep "
                        "(tools/fetch-kernel prints one)")
    p.add_argument("--kernel-version", metavar="VERSION",
                   help="which kernel, when DIR has several")
    p.add_argument("--modules", metavar="LIST",
                   help="comma-separated NIC/disk modules (dependencies come along); default: "
                        "e1000, e1000e, virtio, ata_piix, ahci, sd_mod, squashfs, loop, "
                        "overlay, vfat")


def _modules(args: argparse.Namespace) -> list[str]:
    from pxe import initramfs

    if args.modules is None:
        return list(initramfs.DEFAULT_MODULES)
    return initramfs.parse_module_list(args.modules)


def cmd_build(args: argparse.Namespace) -> int:
    from pxe import initramfs

    result = initramfs.build(args.kernel_root, args.output, modules=_modules(args),
                             version=args.kernel_version,
                             busybox=args.busybox or initramfs.BUSYBOX,
                             compression=args.compress)
    print(f"wrote {result.output} ({result.size // 1024} KiB, kernel {result.kernel_version}, "
          f"{len(result.modules)} modules)")
    return 0


def cmd_modules(args: argparse.Namespace) -> int:
    from pxe import initramfs

    kernel = initramfs.kernel_tree(args.kernel_root, args.kernel_version)
    paths = initramfs.resolve_modules(kernel, _modules(args))
    if args.json:
        print_json({"kernel": kernel.version, "modules": paths})
        return 0
    for path in paths:
        print(path)
    return 0
