"""`fg-image-generate`: build an image bundle from a package list or a container image.

The original design's first step ("from a client machine, generate an image with the packages we
want"), single-dash options as in the other fg-* commands, --long forms too:

    fg-image-generate -os debian -version bookworm -arch amd64 -packages openmpi-bin,python3
                      -label L [-o FILE]
    fg-image-generate -from-oci TARBALL -label L [-o FILE]

The result is a bundle for `fg-moab-image -upload` (docs/images.md). Logic: pxe.imagegen.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "fg-image-generate"

EPILOG = """\
Examples:
  fg-image-generate -os debian -version bookworm -packages openmpi-bin,python3 \\
      -check 'mpirun --version' -label deb12-mpi
  docker save myimage:latest -o myimage.tar
  fg-image-generate -from-oci myimage.tar -label myimage
  sudo fg-moab-image -upload -image deb12-mpi.bundle

What the image does on a node: the provisioning initramfs fetches its squashfs root, mounts it
with a RAM overlay and starts /usr/lib/dynprov/init, which checks that the requested packages
are installed, runs the -check command, and has the node agent report "ready" (or "failed" with
the reason) from inside the image; then it starts the image's own init (systemd if installed,
else a root shell on the console).

Kernel: the image's own (add linux-image-amd64 to -packages), else -kernel-root DIR, else
Debian's current kernel package, fetched once into /var/cache/dynprov (tools/fetch-kernel). The
bundle carries the provisioning initramfs built for that kernel.

Debian builds need root (mmdebstrap's root mode) and the Debian package archive (-mirror).
Downloaded packages are kept in -cache (default /var/cache/dynprov/apt) for the next build.
A label already in this site's image repository is refused (when the site config is readable).

Exit status: 0 ok, 1 failed, 2 bad usage or input."""


def build_parser() -> argparse.ArgumentParser:
    from pxe.imagegen import debian, pack

    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, add_help=False, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate a bootable image bundle (squashfs root, kernel, provisioning "
                    "initramfs, node agent) from a package list or an exported container image.")
    p.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    src = p.add_argument_group("what to build (a Debian release, or -from-oci)")
    src.add_argument("-os", "--os", default="debian", help="operating system (default debian)")
    src.add_argument("-version", "--version", default="bookworm",
                     help="release: bullseye, bookworm (default), trixie, sid, or 11, 12, 13")
    src.add_argument("-arch", "--arch", default="amd64", help="architecture (default amd64)")
    src.add_argument("-packages", "--packages", metavar="P1,P2", action="append", default=[],
                     help="Debian packages to install (comma-separated, repeatable; NAME=VERSION ok)")
    src.add_argument("-from-oci", "--from-oci", type=Path, metavar="TARBALL",
                     help="build from an exported container image (docker save / podman save / "
                          "OCI layout tar) instead")
    p.add_argument("-label", "--label", required=True,
                   help="image label: [A-Za-z0-9._-], what users write in msub -l os=LABEL")
    p.add_argument("-o", "-output", "--output", type=Path, metavar="FILE",
                   help="the bundle to write (default LABEL.bundle)")
    p.add_argument("-also-label", "--also-label", action="append", default=[], metavar="LABEL",
                   help="also write LABEL.bundle beside -o: the same build packed again with its "
                        "own label (repeatable; e.g. two Slurm features from one build)")
    p.add_argument("-force", "--force", action="store_true", help="replace -o if it exists")
    node = p.add_argument_group("on the node")
    node.add_argument("-check", "--check", default="", metavar="CMD",
                      help="a command the node runs at boot, before reporting ready (e.g. "
                           "'mpirun --version'); its exit status and first lines are reported")
    node.add_argument("-cmdline", "--cmdline", default="", help="extra kernel command line")
    node.add_argument("-prov-seconds", "--prov-seconds", type=int, default=600,
                      help="expected provisioning time (default 600)")
    node.add_argument("-kernel-root", "--kernel-root", type=Path, metavar="DIR",
                      help="an unpacked kernel package (boot/vmlinuz-V, lib/modules/V)")
    node.add_argument("-all-modules", "--all-modules", action="store_true",
                      help="copy all kernel modules into the image (default: NICs, disks, "
                           "squashfs/overlay only; not needed for the image's own kernel)")
    sl = p.add_argument_group("Slurm (the node joins the cluster at boot)")
    sl.add_argument("-slurm", "--slurm", action="store_true",
                    help="add slurmd, munge and dynprov's Slurm node side: at boot the node "
                         "fetches the munge key with its one-time token, then starts munged and "
                         "slurmd, before reporting ready")
    sl.add_argument("-slurm-conf", "--slurm-conf", type=Path, metavar="FILE",
                    help="the site's slurm.conf to put into the image (helpers.conf beside it "
                         "too); default: none, slurmd fetches it from slurmctld (configless)")
    sl.add_argument("-slurm-server", "--slurm-server", default="", metavar="HOST[:PORT]",
                    help="slurmctld for configless slurmd (default: the provisioning server's "
                         "host)")
    cust = p.add_argument_group("customization")
    cust.add_argument("-customize", "--customize", type=Path, metavar="DIR",
                      help="run the customization scripts of DIR/all/ (and DIR/GROUP/) on the "
                           "tree (rules: docs/images.md); the site's own run again at upload")
    cust.add_argument("-group", "--group", action="append", default=[], metavar="GROUP",
                      help="also run DIR/GROUP/ (repeatable)")
    deb = p.add_argument_group("Debian archive and build")
    deb.add_argument("-mirror", "--mirror", default=debian.MIRROR, metavar="URL",
                     help=f"Debian mirror (default {debian.MIRROR})")
    deb.add_argument("-security-mirror", "--security-mirror", default=debian.SECURITY_MIRROR,
                     metavar="URL", help="security updates mirror ('none': no security suite)")
    deb.add_argument("-components", "--components", default="main",
                     help="archive components (default main)")
    deb.add_argument("-keep-docs", "--keep-docs", action="store_true",
                     help="keep manuals, docs and translations (default: left out)")
    deb.add_argument("-cache", "--cache", type=Path, default=debian.DEFAULT_CACHE, metavar="DIR",
                     help=f"package cache (default {debian.DEFAULT_CACHE})")
    deb.add_argument("-no-cache", "--no-cache", action="store_true", help="no package cache")
    deb.add_argument("-workdir", "--workdir", type=Path, metavar="DIR",
                     help="where to build (default: the output's directory); removed after")
    deb.add_argument("-comp", "--comp", default="zstd", choices=pack.COMPRESSORS,
                     help="squashfs compressor (default zstd)")
    p.add_argument("-config", "--config", metavar="FILE",
                   help="site configuration, to refuse a label already in its repository")
    p.add_argument("-quiet", "--quiet", action="store_true", help="no progress display")
    p.add_argument("-json", "--json", action="store_true", help="print the result as JSON")
    from pxe.cli.guard import add_debug_flag

    add_debug_flag(p)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP (a batch system's time limit, `timeout`, a closed terminal): raised where
    the build is, so its clean-up runs (mmdebstrap killed, /proc, /sys, /dev unmounted, the
    work directory removed) instead of dying with mounts left under the working directory."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _stop_cleanly_on_signals() -> None:
    import signal

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signum, signal.SIG_IGN)  # once: the clean-up itself is not interrupted
        raise _Terminated(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def main(argv: Sequence[str] | None = None) -> int:
    from pxe.cli import guard

    def body(args: list[str]) -> int:
        parsed = build_parser().parse_args(args)
        _stop_cleanly_on_signals()
        try:
            return _run(parsed)
        except _Terminated as stop:
            print(f"{PROG}: {stop}; nothing was written", file=sys.stderr)
            return 128 + stop.signum
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
            return 130

    return guard.run(PROG, body, argv)


def _run(args: argparse.Namespace) -> int:
    from pxe.imagegen import build, debian
    from pxe.imagegen.progress import Progress

    packages = debian.packages(",".join(args.packages)) if args.packages else []
    security = None if args.security_mirror == "none" else args.security_mirror
    req = build.Request(
        label=args.label, output=args.output or Path(f"{args.label}.bundle"), os=args.os,
        version=args.version, arch=args.arch, packages=tuple(packages), from_oci=args.from_oci,
        check=args.check, cmdline=args.cmdline, kernel_root=args.kernel_root,
        all_modules=args.all_modules, cache=None if args.no_cache else args.cache,
        workdir=args.workdir, mirror=args.mirror, security_mirror=security,
        components=tuple(debian.components(args.components)), slim=not args.keep_docs,
        customize_dir=args.customize, groups=tuple(args.group), compressor=args.comp,
        prov_seconds=args.prov_seconds, force=args.force,
        config=Path(args.config) if args.config else None, slurm=args.slurm,
        slurm_conf=args.slurm_conf, slurm_server=args.slurm_server,
        also_labels=tuple(args.also_label))
    result = build.generate(req, Progress(0, quiet=args.quiet))
    if args.json:
        import json

        json.dump({"output": str(result.output), "label": result.label,
                   "os_name": result.os_name, "bundle_bytes": result.bundle_bytes,
                   "rootfs_bytes": result.rootfs_bytes, "kernel": result.kernel,
                   "kernel_source": result.kernel_source, "seconds": round(result.seconds, 1),
                   "steps": {k: round(v, 1) for k, v in result.steps.items()},
                   "customized": result.customized,
                   "cache_debs": result.cache_debs[0],
                   "also": [str(path) for path in result.also]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"wrote {result.output}: image {result.label} ({result.os_name}, kernel "
              f"{result.kernel} [{result.kernel_source}]), {result.bundle_bytes / 1e6:.1f} MB "
              f"(squashfs root {result.rootfs_bytes / 1e6:.1f} MB) in {result.seconds:.0f} s")
        for path in result.also:
            print(f"wrote {path}: the same image as {path.name.removesuffix('.bundle')}")
        if result.customized:
            print(f"customized with {', '.join(result.customized)}")
        print(f"next: sudo fg-moab-image -upload -image {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
