"""One image build, start to finish: request -> root tree -> node side -> squashfs -> bundle.

Steps (each shown by pxe.imagegen.progress):

  debian: check the package list (mmdebstrap --simulate) -> bootstrap (mmdebstrap) ->
  oci:    unpack the container image ->
  both:   kernel modules + node agent + init (+ the Slurm node side with -slurm:
          pxe.imagegen.slurm) -> customization scripts (-customize DIR) ->
          provisioning initramfs for the kernel -> squashfs -> bundle (-o, by temp + rename)

All work happens in one fresh directory (``-workdir``, default: next to the output, so the last
step is a rename on one file system) that is removed at the end, success or not: a failed build
leaves nothing behind (and never deletes through a mount point left under it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pxe import bundle, customize, validate
from pxe.errors import DynprovError, InputError
from pxe.imagegen import debian, oci, pack, slurm
from pxe.imagegen.progress import Progress

MIB = 1 << 20
# Free space a Debian build needs in the work directory, before the packages: minbase is about
# 180 MB unpacked (120 MB slim) plus its squashfs and the bundle; each package adds its own.
DEBIAN_MIN_FREE = 600 * MIB
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
CHECK_MAX = 500


@dataclass(frozen=True)
class Request:
    label: str
    output: Path
    os: str = "debian"
    version: str = "bookworm"
    arch: str = "amd64"
    packages: tuple[str, ...] = ()
    from_oci: Path | None = None
    check: str = ""
    cmdline: str = ""
    kernel_root: Path | None = None
    all_modules: bool = False
    cache: Path | None = debian.DEFAULT_CACHE
    workdir: Path | None = None
    mirror: str = debian.MIRROR
    security_mirror: str | None = debian.SECURITY_MIRROR
    components: tuple[str, ...] = ("main",)
    slim: bool = True
    customize_dir: Path | None = None
    groups: tuple[str, ...] = ()
    compressor: str = "zstd"
    prov_seconds: int = 600
    force: bool = False
    config: Path | None = None  # the site config: refuse a label already in its repository
    slurm: bool = False         # add slurmd, munge and the Slurm node side (pxe.imagegen.slurm)
    slurm_conf: Path | None = None
    slurm_server: str = ""
    also_labels: tuple[str, ...] = ()  # the same tree packed again as these labels (own IMAGE_ID)


@dataclass
class Result:
    output: Path
    label: str
    os_name: str
    bundle_bytes: int
    rootfs_bytes: int
    kernel: str
    kernel_source: str
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)
    customized: list[str] = field(default_factory=list)
    cache_debs: tuple[int, int] = (0, 0)
    also: list[Path] = field(default_factory=list)


def also_output(req: Request, label: str) -> Path:
    """Where -also-label LABEL's bundle goes: LABEL.bundle beside -o."""
    return Path(req.output).parent / f"{label}.bundle"


SUPPORTED_OS = ("debian",)


def check_request(req: Request) -> debian.Request | None:
    """Every input checked before anything is written; returns the Debian request (or None for
    -from-oci)."""
    validate.label(req.label, "image label")
    check_command(req.check)
    if req.cmdline:
        validate.cmdline(req.cmdline)
        if any(word.startswith("init=") for word in req.cmdline.split()):
            raise InputError("-cmdline must not set init= (the image starts "
                             f"{pack.INIT_PATH}, which starts the image's own init)")
    if req.compressor not in pack.COMPRESSORS:
        raise InputError(f"unknown -comp {req.compressor!r} (known: {', '.join(pack.COMPRESSORS)})")
    if not 30 <= req.prov_seconds <= 86400:
        raise InputError(f"-prov-seconds {req.prov_seconds} is outside 30..86400")
    for group in req.groups:
        validate.label(group, "node group")
    if req.groups and req.customize_dir is None:
        raise InputError("-group needs -customize DIR (the directory of customization scripts)")
    if req.customize_dir is not None and not Path(req.customize_dir).is_dir():
        raise InputError(f"-customize {req.customize_dir}: not a directory")
    if req.kernel_root is not None:
        from pxe import initramfs

        initramfs.kernel_tree(Path(req.kernel_root))
    if (req.slurm_conf or req.slurm_server) and not req.slurm:
        raise InputError("-slurm-conf and -slurm-server go with -slurm")
    if req.slurm:
        slurm.controller(req.slurm_server)
        slurm.conf_files(req.slurm_conf)
    out = Path(req.output)
    if out.exists() and not req.force:
        raise InputError(f"{out} exists (use -force to replace it)")
    for other in req.also_labels:
        validate.label(other, "image label (-also-label)")
        if other == req.label or req.also_labels.count(other) > 1:
            raise InputError(f"-also-label {other}: each label once")
        if req.customize_dir is not None:
            raise InputError("-also-label cannot go with -customize (the scripts are run for "
                             "one label)")
        if also_output(req, other).exists() and not req.force:
            raise InputError(f"{also_output(req, other)} exists (use -force to replace it)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory for -o")
    if req.from_oci is not None:
        if req.packages:
            raise InputError("-packages goes with -os (install packages in the container image "
                             "before exporting it)")
        oci.check(req.from_oci)
        return None
    if req.os.lower() not in SUPPORTED_OS:
        raise InputError(f"unknown OS {req.os!r} (supported: {', '.join(SUPPORTED_OS)}; or bring "
                         "any Linux as a container image with -from-oci)")
    return debian.Request(
        suite=debian.suite(req.version), arch=debian.arch(req.arch),
        packages=tuple(debian.packages(wanted_packages(req))),
        components=tuple(req.components), mirror=debian.mirror(req.mirror),
        security_mirror=debian.mirror(req.security_mirror, "security mirror")
        if req.security_mirror else None, slim=req.slim)


def wanted_packages(req: Request) -> list[str]:
    """-packages, plus slurmd and munge with -slurm (not twice)."""
    extra = [p for p in slurm.PACKAGES if req.slurm and p not in
             {name.split("=")[0] for name in req.packages}]
    return [*req.packages, *extra]


def check_command(text: str) -> str:
    if len(text) > CHECK_MAX or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError(f"-check: one line of printable characters, at most {CHECK_MAX}")
    return text


def label_in_use(label: str, config_path: Path | None) -> str | None:
    """Where ``label`` is already used in this site's image repository, or None. Without a
    readable site config (a client machine) there is nothing to check against."""
    from pxe import config

    path = config.locate(str(config_path) if config_path else None)
    if not path.is_file():
        if config_path is not None:
            raise InputError(f"{path}: no such configuration file")
        return None
    cfg = config.load(path)
    from pxe import repository

    repo_dir = repository.settings(cfg).repository_dir
    if (repo_dir / "bundles" / f"{label}.bundle").exists():
        return f"the image repository ({repo_dir})"
    db_path = cfg.db_path
    if cfg.state.url:  # PostgreSQL: read through the toolkit (no schema made for a read)
        from pxe import db

        try:
            conn = db.connect(cfg.database, create=False)
            try:
                row = conn.execute("SELECT 1 FROM images WHERE label = ?", (label,)).fetchone()
            finally:
                conn.close()
        except (db.Error, DynprovError):
            return None
        return "the image catalog (the PostgreSQL state store)" if row else None
    if not Path(db_path).is_file():
        return None
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            row = conn.execute("SELECT 1 FROM images WHERE label = ?", (label,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return f"the image catalog ({db_path})" if row else None


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _need_space(directory: Path, need: int, what: str) -> None:
    have = free_bytes(directory)
    if have < need:
        raise DynprovError(f"not enough disk space for {what} in {directory}: {have // MIB} MiB "
                           f"free, about {need // MIB} MiB needed (use -workdir DIR on a larger "
                           "file system)")


# -- the work directory ---------------------------------------------------------------------------
def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (mmdebstrap mounts /proc, /sys, /dev in its tree)."""
    base = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                point = line.split()[4].encode().decode("unicode_escape")
                if point == base or point.startswith(base + "/"):
                    found.append(point)
    except OSError:
        pass
    return found


def remove_workdir(path: Path) -> None:
    """Remove the work directory, but never through a mount point: unmount first, and if that
    fails, leave it and say so."""
    if not path.exists():
        return
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=60)
    left = mounts_under(path)
    if left:
        raise DynprovError(f"{path}: still mounted ({', '.join(left)}); not removed: unmount "
                           "and delete it by hand")
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def workdir(parent: Path, label: str) -> Iterator[Path]:
    try:
        path = Path(tempfile.mkdtemp(prefix=f".fg-image-generate.{label}.", dir=parent))
    except OSError as exc:
        raise DynprovError(f"cannot create a work directory in {parent}: "
                           f"{exc.strerror or exc}") from None
    os.chmod(path, 0o755)  # mmdebstrap's apt sandbox user must be able to reach the tree
    try:
        yield path
    finally:
        remove_workdir(path)


# -- the build -------------------------------------------------------------------------------------
def generate(req: Request, progress: Progress | None = None) -> Result:
    """Build the bundle ``req.output``; raise InputError / DynprovError with nothing left."""
    t0 = time.monotonic()
    deb = check_request(req)
    for label in (req.label, *req.also_labels):
        where = label_in_use(label, req.config)
        if where:
            raise InputError(f"image label {label!r} is already in use in {where}: choose "
                             "another -label (or fg-moab-image -delete -label it first)")
    scripts = customize.select(Path(req.customize_dir), req.groups) if req.customize_dir else []
    if deb is not None:
        debian.need_root()
    steps = (2 if deb else 1) + 4 + (1 if scripts else 0) + len(req.also_labels)
    progress = progress or Progress(steps, quiet=True)
    progress.total = steps
    parent = Path(req.workdir) if req.workdir else Path(req.output).absolute().parent
    if not parent.is_dir():
        raise InputError(f"-workdir {parent}: not a directory")
    if deb is not None:
        _need_space(parent, DEBIAN_MIN_FREE, "a Debian build")
    else:
        assert req.from_oci is not None
        _need_space(parent, 3 * Path(req.from_oci).stat().st_size + 64 * MIB,
                    "the container image")
    try:
        with workdir(parent, req.label) as work:
            result = _build(req, deb, scripts, work, progress)
    except OSError as exc:
        if exc.errno in _FULL:
            raise DynprovError(f"no space left on device while building {req.label} "
                               f"({exc.strerror}); nothing was written: use -workdir DIR on a "
                               "larger file system") from None
        raise DynprovError(f"building {req.label} failed: {exc}") from None
    result.seconds = time.monotonic() - t0
    result.steps = dict(progress.times)
    return result


def _build(req: Request, deb: debian.Request | None, scripts: Sequence[customize.Script],
           work: Path, progress: Progress) -> Result:
    tree = work / "root"
    owners = None
    cache_debs = (0, 0)
    if deb is not None:
        log = work / "mmdebstrap.log"
        with debian.cache_dir(req.cache, deb.suite, deb.arch, progress) as cache:
            with progress.step(f"check the packages in Debian {deb.suite}"):
                debian.run(deb, Path("/dev/null"), log, simulate=True, progress=progress)
            with progress.step(f"bootstrap Debian {deb.suite} {deb.variant}"
                               f"{' + ' + ','.join(deb.packages) if deb.packages else ''}"):
                debian.run(deb, tree, log, cache=cache, progress=progress)
            cache_debs = debian.cache_stats(cache)
        os_name = bundle.os_release_name(tree) or f"debian-{debian.SUITES[deb.suite]}"
        arch = debian.ARCHES[deb.arch]
    else:
        assert req.from_oci is not None
        with progress.step(f"unpack the container image {Path(req.from_oci).name}"):
            unpacked = oci.unpack(Path(req.from_oci), tree)
        owners = None if os.geteuid() == 0 else unpacked.owners
        os_name = unpacked.os_name or "linux"
        arch = unpacked.arch
        if arch != "x86_64":
            raise InputError(f"-from-oci: the container image is {arch}; only x86_64 images "
                             "can be booted here")
    with progress.step("add the kernel modules, node agent and init"):
        kernel = _kernel(req, tree, work)
        pack.add_modules(tree, kernel, req.all_modules)
        pack.add_node_side(tree, label=req.label, os_name=os_name, packages=deb.packages
                           if deb else wanted_packages(req), check=req.check)
        if req.slurm:
            slurm.add(tree, ctld=req.slurm_server, conf=slurm.conf_files(req.slurm_conf))
    customized: list[str] = []
    if scripts:
        with progress.step(f"customize ({len(scripts)} script(s))"):
            customized = customize.run(scripts, tree, label=req.label, arch=arch,
                                       mode="stateless", log_path=work / "customize.log")
    with progress.step(f"provisioning initramfs for kernel {kernel.tree.version}"):
        initrd = work / "initrd.img"
        pack.provisioning_initrd(kernel, initrd)
        kernel_file = work / "vmlinuz"
        shutil.copyfile(pack.vmlinuz(kernel), kernel_file)
    rootfs = work / "rootfs.squashfs"
    with progress.step(f"squashfs ({req.compressor})"):
        pack.squash(tree, rootfs, req.compressor, owners)
    rootfs_of = {req.label: rootfs}
    for other in req.also_labels:  # one build, several labels: only IMAGE_ID differs
        with progress.step(f"squashfs of {other} (the same tree, IMAGE_ID={other})"):
            pack.put_file(tree, "etc/os-release", pack.os_release(
                pack.read_text(tree, "etc/os-release"), other, os_name).encode())
            rootfs_of[other] = pack.squash(tree, work / f"rootfs.{other}.squashfs",
                                           req.compressor, owners)
    outputs = {req.label: Path(req.output), **{o: also_output(req, o) for o in req.also_labels}}
    with progress.step(f"bundle {', '.join(p.name for p in outputs.values())}"):
        remove_workdir(tree)  # room for the bundle on a tight disk
        cmdline = " ".join(x for x in ("console=tty0 console=ttyS0,115200", req.cmdline,
                                       f"init={pack.INIT_PATH}") if x)
        written: list[Path] = []
        try:
            for label, output in outputs.items():
                bundle.build_bundle(output, label=label, kernel=kernel_file, initrd=initrd,
                                    rootfs=rootfs_of[label], os_name=os_name, arch=arch,
                                    mode="stateless", cmdline=cmdline,
                                    prov_seconds=req.prov_seconds)
                written.append(output)
        except BaseException:
            for path in written:  # all or nothing
                path.unlink(missing_ok=True)
            raise
    return Result(output=Path(req.output), label=req.label, os_name=os_name,
                  bundle_bytes=Path(req.output).stat().st_size,
                  rootfs_bytes=rootfs.stat().st_size, kernel=kernel.tree.version,
                  kernel_source=kernel.source, seconds=0.0, customized=customized,
                  cache_debs=cache_debs, also=list(outputs.values())[1:])


def _kernel(req: Request, tree: Path, work: Path) -> pack.Kernel:
    from pxe import initramfs

    if req.kernel_root is not None:
        return pack.Kernel(initramfs.kernel_tree(Path(req.kernel_root)), "given")
    own = pack.image_kernel(tree, work / "image-kernel")
    return own or pack.cached_kernel()
